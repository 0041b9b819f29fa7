"""Portable releases: a model as one llama.cpp GGUF file, an adapter that every runtime applies the same way.

Importing the package is light (the run config reads :mod:`lorakit.export.types`); the writers, which need numpy
and torch, load on first use.
"""

from typing import Any

from lorakit.export.types import GGUF_TYPES

_GGUF = ("ExportResult", "export_gguf", "export_gguf_folder", "read_export_meta")

__all__ = ["GGUF_TYPES", *_GGUF, "export_portable_adapter"]


def __getattr__(name: str) -> Any:
    if name in _GGUF:
        from lorakit.export import gguf

        return getattr(gguf, name)
    if name == "export_portable_adapter":
        from lorakit.export import portable

        return portable.export_portable_adapter
    raise AttributeError(f"module 'lorakit.export' has no attribute {name!r}")
