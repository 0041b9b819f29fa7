"""Independent references for merge tests: adapter updates computed by hand from the files, in float64.

Written without lorakit's adapter reader (scalings from adapter_config.json by hand, B @ A straight from the
safetensors), so a bug in lorakit's ``delta()`` cannot hide in a reference built from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def hand_scaling(adapter_dir: Path, module: str, r: int) -> float:
    """alpha/r (alpha/√r with rsLoRA), alpha taken from alpha_pattern when a key matches the module."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    alpha = cfg["lora_alpha"]
    for key, value in cfg.get("alpha_pattern", {}).items():
        if module.endswith(key):
            alpha = value
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def hand_deltas(adapter_dirs: list[Path], absolute: bool = False) -> dict[str, list[torch.Tensor]]:
    """module -> [scalingᵢ·BᵢAᵢ], in float64, straight from the files.

    ``absolute``: scalingᵢ·|Bᵢ|·|Aᵢ| instead, the scale of a float32 product's rounding error (for bounds).
    """
    out: dict[str, list[torch.Tensor]] = {}
    for d in adapter_dirs:
        t = load_file(Path(d) / "adapter_model.safetensors")
        for key in t:
            if key.endswith("lora_A.weight"):
                module = key[len("base_model.model."):-len(".lora_A.weight")]
                A = t[key].double()
                B = t[key.replace("lora_A", "lora_B")].double()
                if absolute:
                    A, B = A.abs(), B.abs()
                out.setdefault(module, []).append(hand_scaling(d, module, A.shape[0]) * (B @ A))
    return out
