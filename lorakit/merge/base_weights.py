"""The base weights a merge adds updates to: the stored ones, or for LoftQ adapters what NF4 made of them.

A LoftQ adapter starts as the rank-r SVD of W − dequant(NF4(W)) and then trains on the 4-bit base, so its update
belongs to dequant(NF4(W)): adding it to W counts the quantization error twice. ``--loftq-base dequantized``
merges into the dequantized base instead, every 4-bit layer replaced by its dequantized weight, which is exactly
the model that was trained (bitsandbytes' own quantization of this base, loaded as ``lorakit train --quant nf4``
loads it); ``--loftq-base original`` accepts the mismatch knowingly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.adapters import Adapter
from lorakit.errors import InputError

LOFTQ_BASES = ("dequantized", "original")


def check_loftq_base(adapters: list[Adapter], output_kind: str, loftq_base: str | None) -> str | None:
    """The base LoftQ adapters are merged into; refuses the original fp base unless it was asked for."""
    if loftq_base is not None and loftq_base not in LOFTQ_BASES:
        raise InputError(f"--loftq-base must be one of {', '.join(LOFTQ_BASES)}, got {loftq_base!r}")
    loftq = [a for a in adapters if a.loftq]
    if not loftq:
        if loftq_base is not None:
            raise InputError("--loftq-base applies to LoftQ adapters (lorakit train --init loftq), and none of the "
                             "inputs is one; leave it out")
        return None
    if output_kind == "model" and loftq_base is None:
        raise InputError(
            f"adapter {loftq[0].label} was initialised with LoftQ for the NF4-quantized base: its update cancels the "
            "quantization error, so adding it to the original weights counts that error twice; pass --loftq-base "
            "dequantized (merge into the dequantized NF4 base it was trained on) or --loftq-base original (accept the "
            "mismatch)"
        )
    return loftq_base


class Nf4Dequantized:
    """The base loaded in 4-bit as ``lorakit train --quant nf4`` loads it; each 4-bit layer dequantized on request.

    The storage settings (NF4, double quantization, bitsandbytes' default block size) must match
    ``lorakit.train.model.load_for_training``; the compute dtype does not matter, dequantization returns the
    dtype the weights were loaded in (float32).
    """

    def __init__(self, base_dir: Path):
        import bitsandbytes as bnb
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
        self._model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config,
                                                           device_map={"": "cpu"}, dtype=torch.float32)
        self._layers = {name: m for name, m in self._model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        self._bnb = bnb

    @property
    def names(self) -> set[str]:
        return set(self._layers)

    def weight(self, name: str) -> torch.Tensor:
        w = self._layers[name].weight
        return self._bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
