"""TIES, DARE and magnitude pruning: one family of sparsified task arithmetic on the deltas ΔWᵢ.

Every operation here acts on each adapter's full update ΔWᵢ = scalingᵢ·BᵢAᵢ of a module, never on A and B
separately (which is what PEFT does, and why its results are not what the papers describe). Randomness (DARE)
comes from a per-module, per-adapter generator derived from ``--seed``, the module name and the adapter's
content digest (see :func:`stream_seed`), so an adapter's mask does not depend on the order of the adapters or
modules, on which other adapters are merged with it, or on how many modules are merged in one call.

- ``magnitude_prune``: keep the max(1, floor(density·n)) largest-|·| entries of each ΔWᵢ (n entries), then
  Σ wᵢ·ΔŴᵢ.
- ``dare_linear``: keep each entry with probability ``density`` and rescale by 1/density, then Σ wᵢ·ΔŴᵢ.
- ``ties``: magnitude-trim each ΔWᵢ, elect a sign per entry from Σ wᵢ·ΔŴᵢ, sum only the weighted entries
  that agree with it (optionally divided by the sum of the agreeing weights: ``--normalize``).
- ``dare_ties``: DARE instead of magnitude trimming, then the same sign election.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from lorakit.merge.linear import weighted_sum
from lorakit.merge.method import MergeMethod, ModuleContext, Param

DENSITY = Param("density", float, required=True, help="fraction of each delta's entries to keep, in (0, 1]")
SEED = Param("seed", int, default=0, help="seed of DARE's random masks (deterministic per module)")
NORMALIZE = Param("normalize", bool, default=False, help="divide by the sum of the agreeing weights")


def stream_seed(seed: int, module: str, adapter_digest: str, occurrence: int = 0) -> int:
    """The documented seeding rule of DARE's masks.

    The first 8 bytes (big-endian) of sha256 of ``"{seed}/{module}/{adapter_digest}/{occurrence}"``, top bit
    cleared (``torch.Generator.manual_seed`` takes 63 bits). ``occurrence`` counts earlier inputs with the same
    digest (the same adapter given twice gets two independent masks; which copy gets which does not matter).
    """
    key = f"{int(seed)}/{module}/{adapter_digest}/{int(occurrence)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def module_generator(seed: int, module: str, adapter_digest: str, occurrence: int = 0) -> torch.Generator:
    """The random stream of one adapter at one module: a CPU generator seeded by :func:`stream_seed`."""
    g = torch.Generator(device="cpu")
    g.manual_seed(stream_seed(seed, module, adapter_digest, occurrence))
    return g


def trim_count(density: float, n: int) -> int:
    """How many of ``n`` entries magnitude trimming keeps: max(1, floor(density·n)).

    This is the convention of PEFT's ``magnitude_based_pruning`` and mergekit's ``sparsify.magnitude``
    (``int(density * n)`` on the float product), so a lorakit TIES or magnitude-prune merge equals theirs entry
    for entry; rounding instead would keep one entry more whenever the fraction of density·n is >= 0.5.
    """
    return max(1, int(density * n))


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the :func:`trim_count` entries of largest magnitude."""
    n = delta.numel()
    k = trim_count(density, n)
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.topk(delta.abs().flatten(), k, sorted=False).indices] = True
    return mask.view_as(delta)


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry independently with probability ``density``: ``torch.rand(shape) < density`` (float32)."""
    return torch.rand(shape, generator=generator) < density


def trim(deltas: Sequence[torch.Tensor], density: float) -> list[torch.Tensor]:
    return [d * magnitude_mask(d, density) for d in deltas]


def drop_and_rescale(deltas: Sequence[torch.Tensor], density: float, ctx: ModuleContext) -> list[torch.Tensor]:
    if len(ctx.adapters) != len(deltas):
        raise ValueError(f"DARE needs one adapter digest per delta at {ctx.name}, got {len(ctx.adapters)}")
    out = []
    for i, (d, digest) in enumerate(zip(deltas, ctx.adapters)):
        g = module_generator(ctx.seed, ctx.name, digest, ctx.adapters[:i].count(digest))
        out.append(d * dare_mask(d.shape, density, g) / density)
    return out


def sign_consensus(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    weighted = torch.stack([d * float(w) for d, w in zip(deltas, weights)])
    elected = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    merged = (weighted * agree).sum(dim=0)
    if normalize:
        w = torch.tensor([float(x) for x in weights], dtype=weighted.dtype).view(-1, *([1] * (weighted.dim() - 1)))
        divisor = (w * agree).sum(dim=0)
        safe = divisor.abs() > 1e-12
        merged = torch.where(safe, merged / torch.where(safe, divisor, torch.ones_like(divisor)), merged)
    return merged


def _magnitude_prune(deltas, weights, ctx: ModuleContext, p: dict[str, Any]) -> torch.Tensor:
    return weighted_sum(trim(deltas, p["density"]), weights)


def _dare_linear(deltas, weights, ctx: ModuleContext, p: dict[str, Any]) -> torch.Tensor:
    return weighted_sum(drop_and_rescale(deltas, p["density"], ctx), weights)


def _ties(deltas, weights, ctx: ModuleContext, p: dict[str, Any]) -> torch.Tensor:
    return sign_consensus(trim(deltas, p["density"]), weights, p["normalize"])


def _dare_ties(deltas, weights, ctx: ModuleContext, p: dict[str, Any]) -> torch.Tensor:
    return sign_consensus(drop_and_rescale(deltas, p["density"], ctx), weights, p["normalize"])


MAGNITUDE_PRUNE = MergeMethod("magnitude_prune", "keep the largest |entries| of each delta, then weighted sum",
                              _magnitude_prune, (DENSITY,))
DARE_LINEAR = MergeMethod("dare_linear", "random drop + 1/density rescale of each delta, then weighted sum",
                          _dare_linear, (DENSITY, SEED))
TIES = MergeMethod("ties", "trim by magnitude, elect signs, sum the agreeing weighted entries",
                   _ties, (DENSITY, NORMALIZE))
DARE_TIES = MergeMethod("dare_ties", "DARE drop + rescale, elect signs, sum the agreeing weighted entries",
                        _dare_ties, (DENSITY, SEED, NORMALIZE))
