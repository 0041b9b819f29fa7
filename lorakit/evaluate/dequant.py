"""Exact dequantization of GPTQ and AWQ packed weights into dense tensors.

Why: on CPU the int4 kernels are no faster than a dense matmul (bench/results/eval.json: GPTQ g32 on SmolLM2,
the dequantized path at 1.1x the default kernel's speed), and for shapes the default kernel refuses (SmolLM2 at
g128) only GPTQModel's slow torch backend is left. A 4-bit weight is fully defined by its integer code, its group's
zero point and its group's scale, so ``w = (q - z) · s`` computed once gives a dense ``nn.Linear`` that holds
*exactly* the values the kernel multiplies by. Evaluating that dense model is the same model; the remaining
difference to the kernel path is only the arithmetic order/precision of the matmul, and is measured in tests.

Layouts (as written by GPTQModel / AutoGPTQ and AutoAWQ, and loaded by ``transformers``):

GPTQ (``quant_method: gptq``)
    ``qweight`` int32 ``[in/pack, out]``: ``pack = 32/bits`` codes per int32, packed along the *input* dim, the
    code of input row ``i`` in bits ``[bits·(i % pack), bits·(i % pack + 1))`` of word ``i // pack``.
    ``qzeros`` int32 ``[groups, out/pack]``: zero points packed the same way along the *output* dim.
    ``scales`` fp16 ``[groups, out]``; ``g_idx`` int32 ``[in]``: the group of each input row (``i // group_size``
    when absent or without act-order). Checkpoint format v1 (``checkpoint_format: gptq``, the default on disk)
    stores ``zero - 1`` by subtracting ``0x11…1`` from the whole packed word (borrows included); adding it back
    on the whole word is the exact inverse, which is what the kernels do on load.
AWQ GEMM (``quant_method: awq``, ``version: gemm``)
    ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32 ``[in/g, out/8]``, eight 4-bit codes per word packed
    along the *output* dim, nibble ``k`` holding column ``8·word + AWQ_ORDER[k]`` with
    ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``; ``scales`` fp16 ``[in/g, out]``; ``w = (q - z) · s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import InputError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GPTQ_BITS = (2, 4, 8)  # widths whose codes never straddle a 32-bit word (3-bit does; refused with a hint)
_V1_ZERO_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


def _as_uint32(words: torch.Tensor) -> torch.Tensor:
    """int32 words as their unsigned bit patterns, held in int64 so shifts and masks are well defined."""
    return words.to(torch.int64) & 0xFFFFFFFF


def unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Split each int32 word into its ``32/bits`` codes, code ``k`` at bits ``[bits·k, bits·(k+1))``.

    The codes of one word become consecutive entries along ``dim`` (which grows by ``32/bits``).
    """
    pack = 32 // bits
    u = _as_uint32(words)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    codes = (u.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., pack] along a new last dim
    dim = dim % words.dim()
    codes = codes.movedim(-1, dim + 1)  # place each word's codes right after it along `dim`
    shape = list(words.shape)
    shape[dim] *= pack
    return codes.reshape(shape)


@dataclass(frozen=True)
class PackedLinear:
    """One quantized linear as its integers and its scales: ``w[o, i] = codes[i, o] · scales[group[i], o]``.

    ``codes`` [in, out] int64 holds ``q - z`` (the code minus its group's zero point), ``group`` [in] int64 the
    group of each input row, ``scales`` [groups, out] as stored, ``zeros`` [groups, out] the zero points and
    ``bits`` the code width (so ``q = codes + zeros[group]`` lies in ``[0, 2^bits)``). Dequantization multiplies
    them out; tuning after rounding (:mod:`lorakit.quantize.tune`) trains ``scales``, and optionally moves ``codes``
    within that range, so both read the layouts in one place.
    """

    codes: torch.Tensor
    group: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int

    def dense(self) -> torch.Tensor:
        """The dense ``[out, in]`` float32 weight."""
        w = self.codes.to(torch.float32) * self.scales[self.group].to(torch.float32)  # [in, out]
        return w.t().contiguous()


def gptq_packed(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq",
) -> PackedLinear:
    """A GPTQ linear's codes, groups and scales (see the module docstring for the layout)."""
    if bits not in GPTQ_BITS:
        raise InputError(f"GPTQ {bits}-bit weights cannot be dequantized exactly here (codes straddle words); "
                         "evaluate this model with --quant-path kernel")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise InputError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; expected gptq or gptq_v2")
    q = unpack_words(qweight, bits, dim=0)  # [in, out]
    if checkpoint_format == "gptq":
        # v1 stored (zero - 1) by subtracting the offset from whole words; add it back modulo 2^32.
        qzeros = ((_as_uint32(qzeros) + _V1_ZERO_OFFSET[bits]) & 0xFFFFFFFF)
    z = unpack_words(qzeros, bits, dim=1)  # [groups, out]
    n_in, n_out = q.shape
    if scales.shape[1] != n_out or z.shape[1] != n_out:
        raise InputError(f"GPTQ tensors disagree: qweight gives {n_out} outputs, scales {scales.shape[1]}, "
                         f"qzeros {z.shape[1]}; the checkpoint is corrupt")
    if g_idx is None:
        size = n_in if group_size in (-1, 0) else group_size
        g_idx = torch.arange(n_in) // size
    g_idx = g_idx.to(torch.int64)
    if g_idx.numel() != n_in or int(g_idx.max()) >= scales.shape[0]:
        raise InputError("GPTQ g_idx does not match qweight/scales; the checkpoint is corrupt")
    return PackedLinear(q - z[g_idx], g_idx, scales, z, bits)


def dequantize_gptq(*args, **kwargs) -> torch.Tensor:
    """The dense ``[out, in]`` float32 weight a GPTQ linear layer multiplies by (arguments: :func:`gptq_packed`)."""
    return gptq_packed(*args, **kwargs).dense()


def awq_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, bits: int = 4,
               group_size: int) -> PackedLinear:
    """An AWQ GEMM linear's codes, groups and scales (see the module docstring for the layout)."""
    if bits != 4:
        raise InputError(f"AWQ {bits}-bit weights are not supported; AWQ GEMM checkpoints are 4-bit")
    inverse = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])  # column c lives in nibble inverse[c]

    def unpack(words: torch.Tensor) -> torch.Tensor:
        nibbles = unpack_words(words, 4, dim=1)  # columns in nibble order within each word
        rows, cols = nibbles.shape
        return nibbles.reshape(rows, cols // 8, 8)[:, :, inverse].reshape(rows, cols)

    q = unpack(qweight)  # [in, out]
    z = unpack(qzeros)  # [groups, out]
    n_in, n_out = q.shape
    size = n_in if group_size in (-1, 0) else group_size
    group = torch.arange(n_in) // size
    if scales.shape != z.shape or scales.shape[0] != (n_in + size - 1) // size or scales.shape[1] != n_out:
        raise InputError(f"AWQ tensors disagree (qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
                         f"scales {list(scales.shape)}, group_size {group_size}); the checkpoint is corrupt")
    return PackedLinear(q - z[group], group, scales, z, bits)


def dequantize_awq(*args, **kwargs) -> torch.Tensor:
    """The dense ``[out, in]`` float32 weight an AWQ GEMM linear layer multiplies by (arguments: :func:`awq_packed`)."""
    return awq_packed(*args, **kwargs).dense()


def read_packed_linear(kind: str, tensors: dict[str, torch.Tensor], prefix: str, n_in: int, n_out: int, *,
                       checkpoint_format: str = "gptq") -> PackedLinear:
    """The packed linear ``prefix`` of a ``kind`` ("gptq" or "awq") checkpoint's tensors, its bits and group size
    read from the tensors' shapes (GPTQModel's ``dynamic`` may change them per module)."""
    qweight, qzeros, scales = (tensors[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales"))
    if kind == "gptq":
        bits = 32 * qweight.shape[0] // n_in
        packed = gptq_packed(qweight, qzeros, scales, tensors.get(f"{prefix}.g_idx"), bits=bits,
                             group_size=n_in // scales.shape[0], checkpoint_format=checkpoint_format)
    else:
        bits = 32 * qweight.shape[1] // n_out
        packed = awq_packed(qweight, qzeros, scales, bits=bits, group_size=n_in // scales.shape[0])
    if tuple(packed.codes.shape) != (n_in, n_out):
        raise InputError(f"{prefix} dequantizes to {[packed.codes.shape[1], packed.codes.shape[0]]}, the model "
                         f"expects {[n_out, n_in]}; the checkpoint is corrupt")
    return packed
