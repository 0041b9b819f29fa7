"""Synthetic PEFT adapters with random, non-zero factors: inputs for merge tests, benchmarks and the demo.

A freshly initialised LoRA has B = 0 (no update), which would make every merge trivially "exact". These
adapters are real PEFT folders (saved by PEFT itself) whose A and B are both random, so ΔW ≠ 0. The same need in
memory (a LoRA model whose gradients are compared across code paths) is :func:`randomize_lora_b` and
:func:`lora_grad_vector`.
"""

from __future__ import annotations

import os
from pathlib import Path


def make_random_adapter(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    r: int = 8,
    alpha: float = 16,
    target_modules: list[str] | str = "all-linear",
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int = 0,
    scale: float = 0.02,
    model=None,
) -> Path:
    """Save a LoRA adapter for ``base_dir`` with N(0, scale²) entries in A and B (PEFT layout)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(out_dir)
    # get_peft_model injects layers in place; undo it so a caller's model can be reused for the next adapter.
    peft_model.unload()
    return Path(out_dir)


def randomize_lora_b(model, scale: float, seed: int = 1) -> None:
    """Draw every ``lora_B`` of an in-memory PEFT model from N(0, scale²): B = 0 at init would make every A gradient
    vanish, so a gradient comparison would prove nothing about A."""
    import torch

    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def lora_grad_vector(model):
    """Every trainable parameter's gradient, float64, in name order, as one vector (for relative-error checks)."""
    import torch

    return torch.cat([p.grad.reshape(-1).double() for _, p in sorted(model.named_parameters()) if p.requires_grad])
