"""The one exception type a user sees: a single line saying what, where and how to fix."""

from __future__ import annotations


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
