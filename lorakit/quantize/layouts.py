"""The two on-disk layouts lorakit writes and reads: AWQ "GEMM" (4-bit) and GPTQ v1 (4 or 8 bits).

Both store integers packed into int32 words, fp16 scales per (group, output channel) and packed zero points;
they differ in the packing axis and order. The unpackers exist so tests (and anyone auditing a checkpoint) can
check that the stored integers dequantize to the declared grid, whichever tool wrote them.
"""

from __future__ import annotations

import torch

from lorakit.quantize.grid import GroupQuant

# AWQ GEMM interleaves eight 4-bit values per int32 in this order (AutoAWQ's kernels expect it).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding unsigned 32-bit patterns -> the same bits as int32."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_last(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack ``values`` [..., n] (0 <= v < 2^bits) into int32 [..., n*bits/32] along the last axis."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(*values.shape[:-1], values.shape[-1] // per, per)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return _to_int32((v << shifts).sum(dim=-1))


def _unpack_last(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    v = (words.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)
    if order is not None:  # v[..., i] holds element order[i]
        out = torch.empty_like(v)
        out[..., list(order)] = v
        v = out
    return v.reshape(*words.shape[:-1], words.shape[-1] * per).to(torch.int32)


def pack_awq(gq: GroupQuant) -> dict[str, torch.Tensor]:
    """AWQ GEMM: qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out]."""
    if gq.bits != 4:
        raise ValueError("the AWQ GEMM layout stores 4-bit weights only")
    return {
        "qweight": pack_qweight("awq", gq.q.t(), 4),
        "qzeros": _pack_last(gq.zeros.t().contiguous(), 4, AWQ_ORDER),
        "scales": gq.scales.t().contiguous().half(),
    }


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> GroupQuant:
    q = _unpack_last(qweight, 4, AWQ_ORDER).t().contiguous()
    zeros = _unpack_last(qzeros, 4, AWQ_ORDER).t().contiguous()
    return GroupQuant(q, scales.float().t().contiguous(), zeros, 4, group_size)


def pack_gptq(gq: GroupQuant) -> dict[str, torch.Tensor]:
    """GPTQ v1: qweight int32 [in*b/32, out] (packed along the input), qzeros int32 [in/g, out*b/32] holding z − 1,
    scales fp16 [in/g, out], g_idx int32 [in] (groups in natural order, no act-order)."""
    in_f = gq.q.shape[1]
    if torch.any(gq.zeros < 1):
        # v1 stores z − 1; z = 0 would wrap to 2^b − 1 and the loader's +1 would overflow the field.
        raise ValueError("GPTQ v1 cannot store a zero point of 0; quantize with min_zero=1 for this layout")
    return {
        "qweight": pack_qweight("gptq", gq.q.t(), gq.bits),
        "qzeros": _pack_last((gq.zeros - 1).t().contiguous(), gq.bits),
        "scales": gq.scales.t().contiguous().half(),
        "g_idx": (torch.arange(in_f, dtype=torch.int32) // gq.group_size),
    }


def pack_qweight(kind: str, q: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``qweight`` of a ``kind`` ("gptq" or "awq") checkpoint holding the codes ``q`` [in, out] (each in
    ``[0, 2^bits)``): the one definition of each layout's word order, which :func:`pack_gptq` and :func:`pack_awq`
    use and learnt rounding (:mod:`lorakit.quantize.tune`) writes back in place of a checkpoint's own."""
    if kind == "gptq":
        return _pack_last(q.t().contiguous(), bits).t().contiguous()
    return _pack_last(q.contiguous(), 4, AWQ_ORDER)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                bits: int) -> GroupQuant:
    """Read a GPTQ v1 tensor set (natural group order required: g_idx = arange(in) // g)."""
    q = _unpack_last(qweight.t().contiguous(), bits)  # [out, in]
    zeros = (_unpack_last(qzeros, bits) + 1).t().contiguous()  # v1 stores z − 1
    in_f = q.shape[1]
    n_groups = scales.shape[0]
    group_size = in_f // n_groups
    if not torch.equal(g_idx.to(torch.int64), torch.arange(in_f) // group_size):
        raise ValueError("act-order (desc_act) checkpoints permute groups; unpack them with g_idx")
    return GroupQuant(q, scales.float().t().contiguous(), zeros, bits, group_size)
