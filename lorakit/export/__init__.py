"""Portable releases: a model as one llama.cpp GGUF file, an adapter that every runtime applies the same way.

Importing the package is light (the run config reads :mod:`lorakit.export.types`); the writers, which need numpy
and torch, load on first use.
"""

from lorakit.export.types import GGUF_TYPES
from lorakit.lazy import lazy_exports

_writers, __getattr__ = lazy_exports(__name__, {
    "gguf": ("ExportResult", "export_gguf", "export_gguf_folder", "read_export_meta"),
    "portable": ("export_portable_adapter",),
})
__all__ = ["GGUF_TYPES", *_writers]
