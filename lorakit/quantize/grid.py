"""Group-wise integer grids: how a weight row is cut into groups and mapped to b-bit integers and back.

One definition shared by the AWQ search (fake quantization), the checkpoint packers and the tests, so what the
search optimises is exactly what is written: w ≈ (q − z)·s per group of ``group_size`` input channels, with s
stored in fp16 (the checkpoint's dtype) and z an integer in [0, 2^bits − 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SCALE = 1e-5  # an all-equal group would give s = 0; any positive s then represents it exactly


@dataclass
class GroupQuant:
    """Integers and grid parameters of one weight matrix [out, in]."""

    q: torch.Tensor  # int32 [out, in], values in [0, 2^bits − 1]
    scales: torch.Tensor  # float32 [out, in/g], exactly representable in fp16
    zeros: torch.Tensor  # int32 [out, in/g]
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.group_size)


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x: rounding a scale down would push a group's extreme weight off the grid."""
    h = x.half()
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def grid_params(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale (rounded to fp16) and integer zero point of ``w`` [out, in].

    ``min_zero=1`` is for the GPTQ v1 layout, which stores z − 1 and so cannot hold z = 0: the scale is then
    widened just enough that the group's maximum still fits above a zero point of 1.
    """
    out_f, in_f = w.shape
    maxq = 2**bits - 1
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    if sym:
        absmax = g.abs().amax(dim=-1)
        scales = (2 * absmax / maxq).clamp(min=MIN_SCALE)
        zeros = torch.full_like(scales, (maxq + 1) // 2)
    else:
        # The grid spans [min, max] of the group, widened to include 0 so zero weights stay exact.
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        scales = ((hi - lo) / maxq).clamp(min=MIN_SCALE)
        if min_zero:
            scales = torch.maximum(scales, hi / (maxq - min_zero))
    scales = _fp16_at_least(scales)  # the checkpoint stores fp16; quantize against the stored value
    if not sym:
        zeros = torch.clamp(torch.round(-lo / scales), min_zero, maxq)
    return scales, zeros.to(torch.int32)


def quantize_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                     group_size: int) -> torch.Tensor:
    """Nearest integers q in [0, 2^bits − 1] with w ≈ (q − z)·s."""
    return _rounded(w, scales, zeros, bits, group_size).to(torch.int32).view(w.shape)


def _rounded(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """q as float, shaped [out, groups, group_size]: the group view broadcasts s and z without copying them."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    return g.div(scales.unsqueeze(-1)).round_().add_(zeros.float().unsqueeze(-1)).clamp_(0, 2**bits - 1)


def _from_grid(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(q − z)·s on the group view [out, groups, group_size]; a new tensor (q is left as it is)."""
    return (q.float() - zeros.float().unsqueeze(-1)).mul_(scales.float().unsqueeze(-1))


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = q.shape
    return _from_grid(q.reshape(out_f, in_f // group_size, group_size), scales, zeros).view(out_f, in_f)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, sym: bool, min_zero: int = 0) -> GroupQuant:
    scales, zeros = grid_params(w, bits, group_size, sym, min_zero)
    return GroupQuant(quantize_to_grid(w, scales, zeros, bits, group_size), scales, zeros, bits, group_size)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, min_zero: int = 0) -> torch.Tensor:
    """``w`` rounded to its own grid (same dtype), as the search needs it: the same numbers as
    ``quantize_weight(...).dequantize()`` without materialising the integers (this runs per search candidate)."""
    scales, zeros = grid_params(w, bits, group_size, sym, min_zero)
    return _from_grid(_rounded(w, scales, zeros, bits, group_size), scales, zeros).view(w.shape).to(w.dtype)
