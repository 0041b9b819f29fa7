"""Which linears lose most to quantization: one cheap forward pass, before any minutes are spent quantizing.

For every quantized linear, the error of round-to-nearest quantization on the method's grid is measured where
it matters, on the module's output for real calibration activations: ``mean ‖x·(W − Q(W))ᵀ‖²`` over tokens.
That is the quantity GPTQ minimises per module (its Hessian-weighted error), computed for plain rounding, so
it ranks modules the same way GPTQModel's per-module loss log does (on SmolLM2-135M both put every
``mlp.down_proj`` far ahead), but for either method and in one forward pass (~seconds) instead of a full run.
The search (``lorakit.quantize.search``) keeps the highest-ranked modules at higher precision first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.quantize.checks import QUANTIZED_LINEARS
from lorakit.quantize.options import QUANTIZE
from lorakit.quantize.grid import fake_quantize


@dataclass
class Sensitivity:
    output_mse: dict[str, float]  # module -> mean squared output error of RTN quantization
    relative: dict[str, float]  # module -> that error / mean squared output
    tokens: int
    bits: int
    group_size: int
    sym: bool
    wall_s: float
    ranking: list[str] = field(default_factory=list)  # most sensitive first

    def to_dict(self, top: int = 20) -> dict:
        return {"measure": "mean ||x (W - RTN(W))^T||^2 per token on calibration activations",
                "tokens": self.tokens, "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "wall_s": round(self.wall_s, 2),
                "top": [{"module": m, "output_mse": self.output_mse[m], "relative": self.relative[m]}
                        for m in self.ranking[:top]]}


@torch.no_grad()
def module_sensitivity(model_dir: str | Path, blocks: torch.Tensor, *, bits: int = QUANTIZE.bits, group_size: int = QUANTIZE.group_size,
                       sym: bool = False, max_tokens: int = 4096, device: str = "cpu") -> Sensitivity:
    """Rank every quantized linear of ``model_dir`` by its RTN output error on ``blocks`` (calibration ids)."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    n_rows = max(1, min(blocks.shape[0], -(-max_tokens // blocks.shape[1])))
    err: dict[str, float] = {}
    ref: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.endswith(QUANTIZED_LINEARS):
            continue
        w = module.weight.detach().float()
        delta = (w - fake_quantize(w, bits, group_size, sym).float()).to(device)
        err[name], ref[name] = 0.0, 0.0

        def hook(_m, args, _out, name=name, delta=delta, w=w):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            err[name] += float((x @ delta.t()).pow(2).sum())
            ref[name] += float((x @ w.t()).pow(2).sum())

        handles.append(module.register_forward_hook(hook))
    try:
        for row in blocks[:n_rows]:
            model(row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    tokens = int(n_rows * blocks.shape[1])
    mse = {k: v / tokens for k, v in err.items()}
    rel = {k: err[k] / ref[k] if ref[k] > 0 else 0.0 for k in err}
    ranking = sorted(mse, key=lambda k: (-mse[k], k))
    return Sensitivity(mse, rel, tokens, bits, group_size, sym, time.perf_counter() - started, ranking)
