"""Record what a `.ci/run` measured (its wall time and the end-to-end tests that ran) in docs/benchmarks.md.

    bash .ci/run 2>&1 | tee /tmp/ci.log
    .venv/bin/python -m bench.record_ci /tmp/ci.log --before-s 385 --before-note "CI of the previous landing"

`.ci/run` prints `ci: R of E end-to-end tests ran; wall time W s` and pytest's closing line; this reads
both from the log of one run (on this machine: CI runs on a machine of the same size) and writes the "ci"
section, next to the figure given for the run before the change (`--before-s`, with where it came from).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from bench._report import write_section


def parse(log: str) -> dict[str, object]:
    """The figures of one .ci/run log; ValueError when the log holds no finished run."""
    m = re.search(r"ci: (\d+) of (\d+) end-to-end tests ran; wall time (\d+) s", log)
    if not m:
        raise ValueError("no `ci: R of E end-to-end tests ran; wall time W s` line: did .ci/run finish?")
    closing = [ln.strip("= ") for ln in log.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    nodes = re.findall(r"^sandbox nodes: (.+)$", log, re.M)
    return {
        "ran": int(m[1]),
        "expected": int(m[2]),
        "wall_s": int(m[3]),
        "closing": closing[-1] if closing else "?",
        "nodes": nodes[-1] if nodes else "not said",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path, help="the output of one `bash .ci/run`")
    ap.add_argument("--before-s", type=int, required=True, help="CI wall time before the change, in seconds")
    ap.add_argument("--before-note", required=True, help="where the 'before' figure comes from")
    ap.add_argument("--before-ran", default="not counted", help="end-to-end tests that ran before, e.g. '121 of 121'")
    ap.add_argument("--no-write", action="store_true", help="print only")
    opts = ap.parse_args(argv)
    try:
        f = parse(opts.log.read_text(errors="replace"))
    except ValueError as exc:
        print(f"record_ci: {exc}", file=sys.stderr)
        return 1
    wall = int(f["wall_s"])  # type: ignore[call-overload]
    text = "\n".join(
        [
            "## CI: wall time and end-to-end tests that ran (`.ci/run`, recorded by `bench/record_ci.py`)",
            "",
            "| | wall time | end-to-end tests that ran |",
            "|---|---:|---:|",
            f"| before ({opts.before_note}) | {opts.before_s} s ({opts.before_s / 60:.1f} min) | {opts.before_ran} |",
            f"| after: `.ci/run` on a fresh clone | {wall} s ({wall / 60:.1f} min) | {f['ran']} of {f['expected']} |",
            "",
            f"pytest's closing line: `{f['closing']}`; sandbox nodes: {f['nodes']}. Budget: 20 min on 2 cores.",
        ]
    )
    print(text)
    if not opts.no_write:
        write_section("ci", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
