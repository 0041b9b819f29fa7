"""Post-training quantization (GPTQ via GPTQModel, AWQ in plain torch) into standard checkpoint layouts.

This package is the only place in lorakit that imports ``gptqmodel`` (lazily, in ``gptqmodel_backend``), so the
backend can be swapped without touching the rest of lorakit.
"""

from lorakit.quantize.core import QuantResult, quantize_model
from lorakit.quantize.metadata import QUANT_META, QuantMeta, QuantParams, read_quant_meta

__all__ = ["QUANT_META", "QuantMeta", "QuantParams", "QuantResult", "quantize_model", "read_quant_meta"]
