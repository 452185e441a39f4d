"""The one user-facing error type.

Library code raises `LoraError(message, hint)`; the CLI turns it into `error: …` / `hint: …` on
stderr and exit status 1 in one place (`loracli.cli`). Third-party exceptions are translated into
it by the module that calls the third party.
"""

from __future__ import annotations


class LoraError(Exception):
    """A problem the user can fix. `hint` names the next command or change to make."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, details: list[str] | None = None,
                 data=None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = list(details or [])
        self.data = data  # what the command found before failing (the `result` of its --json)

    def to_dict(self) -> dict:
        found = {"result": self.data} if self.data is not None else {}
        return {"error": self.message, "hint": self.hint, "details": self.details, **found}


class BusyError(LoraError):
    """Another process holds a lock we need (exit status 2, as cron wrappers expect)."""

    exit_code = 2
