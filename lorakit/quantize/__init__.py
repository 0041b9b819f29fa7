"""Post-training quantization (GPTQ via GPTQModel, AWQ in plain torch) into standard checkpoint layouts.

This package is the only place in lorakit that imports ``gptqmodel`` (lazily, in ``gptqmodel_backend``), so the
backend can be swapped without touching the rest of lorakit. Importing the package is light (the run config
reads :mod:`lorakit.quantize.options`); the quantizing code, which needs torch, loads on first use.
"""

from typing import Any

_CORE = ("QuantResult", "quantize_model")
_META = ("QUANT_META", "QuantMeta", "QuantParams", "read_quant_meta")

__all__ = [*_META, *_CORE]


def __getattr__(name: str) -> Any:
    if name in _CORE:
        from lorakit.quantize import core

        return getattr(core, name)
    if name in _META:
        from lorakit.quantize import metadata

        return getattr(metadata, name)
    raise AttributeError(f"module 'lorakit.quantize' has no attribute {name!r}")
