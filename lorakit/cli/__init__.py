"""The ``lorakit`` command line: one sub-command per pipeline stage, each a thin shell over the library."""

from lorakit.cli.main import main

__all__ = ["main"]
