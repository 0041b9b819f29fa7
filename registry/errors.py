"""Registry failures, each one line that says what to do; exit codes follow ``lorakit.errors``."""

from __future__ import annotations

from lorakit.errors import EXIT_REJECTED, InputError, LorakitError


class UnknownReferenceError(InputError):
    """A reference names no registered version (exit 2)."""


class CorruptArtifactError(LorakitError):
    """Stored bytes no longer match their digest: refuse to hand them out (exit 1)."""

    exit_code = 1


class RegistryBusyError(LorakitError):
    """Another process holds the registry's write lock (exit 1: retry later)."""

    exit_code = 1


class PromotionRefusedError(LorakitError):
    """The production alias needs a passing gate verdict, or --force with a recorded reason (exit 3)."""

    exit_code = EXIT_REJECTED
