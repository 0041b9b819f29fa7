"""Linear merge: ΔW = Σ wᵢ·scalingᵢ·BᵢAᵢ, exactly.

Unlike PEFT's ``combination_type="linear"`` (which weights A and B separately and so adds cross terms BᵢAⱼ),
this is the weighted sum of the updates themselves. In factor space it is exact without any SVD: stacking
Aᵢ and wᵢ·scalingᵢ·Bᵢ gives a rank-Σrᵢ adapter whose B·A is the weighted sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorakit.adapters import LoraModule
from lorakit.merge.method import MergeMethod, ModuleContext


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], ctx: ModuleContext | None = None,
                 params: dict[str, Any] | None = None) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        out.add_(d, alpha=float(w))
    return out


def concat_factors(modules: Sequence[LoraModule], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A = Σ wᵢ·scalingᵢ·BᵢAᵢ; the scale is folded into B so the adapter's own scaling is 1."""
    A = torch.cat([m.A.float() for m in modules], dim=0)
    B = torch.cat([m.B.float() * (float(w) * m.scaling) for m, w in zip(modules, weights)], dim=1)
    return A, B


LINEAR = MergeMethod(
    name="linear",
    summary="weighted sum of the updates, Σ wᵢ·ΔWᵢ (exact; as an adapter, rank Σrᵢ unless --rank)",
    combine=weighted_sum,
    factorable=True,
)
