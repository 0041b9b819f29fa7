"""A merge applied in memory: the base loaded once, each candidate's W + Σ wᵢ·ΔWᵢ written into its weights.

Why: a merge-weight search evaluates many candidates. Writing each as a model folder and loading it again would
cost a full copy of the weights per trial; here the adapted weights of one loaded base are overwritten in place
from a pristine copy of the original ones, so a trial costs one GEMM per module plus the evaluation.

The arithmetic is the one ``merge_adapters(..., output_kind="model")`` does, call for call: for factorable
(linear) merges one ``addmm`` with :func:`lorakit.merge.linear.concat_factors` (B_cat·diag(wᵢ·scalingᵢ)·A_cat), for
the others the same ``method.combine`` on the same deltas with the same per-module context (so DARE draws the
same masks). A trial's weights therefore equal the folder ``lorakit merge --output-kind model`` writes with the
same parameters (``tests/test_merge_search.py`` checks it to 1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters import Adapter
from lorakit.merge.linear import concat_factors
from lorakit.merge.method import MergeMethod, ModuleContext


class InMemoryMerge:
    """The base model (float32, eval mode) whose adapted weights can be set to any merge of ``adapters``."""

    def __init__(self, base_dir: Path, adapters: list[Adapter], device: torch.device):
        from transformers import AutoModelForCausalLM

        self.adapters = adapters
        self.base_dir = Path(base_dir)
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device).eval()
        self.names = sorted(adapters[0].modules)
        self._weights = {name: self.model.get_submodule(name).weight for name in self.names}
        # The original weights, kept once: every trial starts from these, never from the previous trial's sum.
        self._original = {name: w.detach().clone() for name, w in self._weights.items()}
        self._digests = tuple(a.digest for a in adapters)

    @torch.no_grad()
    def apply(self, method: MergeMethod, weights: Sequence[float], params: dict[str, Any],
              adapters: Sequence[Adapter] | None = None) -> None:
        """Set every adapted weight to W + method(w₁·ΔW₁, …); nothing is read from disk. ``adapters``: the updates
        to combine instead of the loaded ones, the same modules (RegMean's re-projected adapters, which the merge
        search weighs like plain ones)."""
        for name in self.names:
            modules = [a.modules[name] for a in (adapters or self.adapters)]
            target, original = self._weights[name], self._original[name]
            if method.factorable:
                A, B = concat_factors(modules, weights)
                A, B = A.to(self.device), B.to(self.device)
                if modules[0].fan_in_fan_out:
                    torch.addmm(original, A.T, B.T, out=target)
                else:
                    torch.addmm(original, B, A, out=target)
            else:
                deltas = [m.delta() for m in modules]
                ctx = ModuleContext(name, int(params.get("seed") or 0), self._digests)
                delta = modules[0].to_weight_layout(method.combine(deltas, list(weights), ctx, params))
                torch.add(original, delta.to(self.device), out=target)

    @torch.no_grad()
    def restore(self) -> None:
        """The base model again (every adapted weight back to its original value)."""
        for name in self.names:
            self._weights[name].copy_(self._original[name])

    def merged_weight(self, name: str) -> torch.Tensor:
        """The current weight of module ``name`` (stored layout), on the CPU."""
        return self._weights[name].detach().cpu()
