"""The one exception type a user sees: a single line saying what, where and how to fix."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """A problem the user can fix. Printed as one line, never with a traceback.

    `code` is the process exit status the CLI uses (the job's own status for a failed fit).
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


def did_you_mean(word: str, known: Iterable[str], fallback: str, cutoff: float = 0.6) -> str:
    """The hint after an unknown key or name: "did you mean X?" for a close match, else `fallback`
    (typically the list of known ones). One wording for aws_env_vars, invoke.yaml and job.toml."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=1, cutoff=cutoff)
    return f"did you mean {close[0]}?" if close else fallback


def aws_error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore error ("" when there is none). A connection dropped mid-request
    (botocore's ConnectionClosedError) carries `response = None`, not a missing attribute."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "") or "")
