"""Plain-text tables, the one formatter behind every table remotefit prints (`inv status`, `inv runs`,
`inv check`)."""

from __future__ import annotations

from collections.abc import Sequence


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> list[str]:
    """The header line, then one line per row: each column left-aligned to its widest cell (the header's
    included), columns two spaces apart, no trailing spaces. Every row has one cell per header. Pure."""
    lines = [headers, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
