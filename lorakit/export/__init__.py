"""Portable releases: a model as one llama.cpp GGUF file, an adapter that every runtime applies the same way."""

from lorakit.export.gguf import GGUF_TYPES, ExportResult, export_gguf, export_gguf_folder, read_export_meta
from lorakit.export.portable import export_portable_adapter

__all__ = ["GGUF_TYPES", "ExportResult", "export_gguf", "export_gguf_folder", "export_portable_adapter", "read_export_meta"]
