"""Errors that reach the user.

Every failure lorakit can predict is a :class:`LorakitError` carrying one actionable line: what is wrong,
with which input, and what to do next. The CLI prints that line and exits with the error's code, so scripts
and schedulers can tell a rejected release (exit 3) from bad input (exit 2) from a crash (exit 1).
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_REJECTED = 3


class LorakitError(Exception):
    """A predictable failure with a message meant for the user."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def __reduce__(self):
        """Pickle with the exit code (an error raised in a child process keeps it in the parent)."""
        return type(self), self.args, {"exit_code": self.exit_code}


class InputError(LorakitError):
    """An input file, folder or parameter is unusable; nothing was written."""


class IncompatibleAdaptersError(InputError):
    """Adapters cannot be combined (different base, targets, shapes or LoRA variants)."""


class OutputExistsError(InputError):
    """The output path already exists and ``--force`` was not given."""
