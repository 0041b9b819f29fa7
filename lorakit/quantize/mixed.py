"""Per-module precision ("mixed precision"): which linears keep more bits, and who can load the result.

A few linears dominate the quantization error (on SmolLM2-135M's releases, three ``mlp.down_proj`` an order of
magnitude above every other linear by ``lorakit.quantize.sensitivity``: ``ranking`` in
bench/results/keep_sensitive_*.json), so keeping just those at higher precision buys much of the output error back
for a few MB (``--keep-sensitive``; docs/quantize.md has what it did and did not buy). The two methods express
that differently, and the difference decides which loaders read the file:

* GPTQ, **unquantized** (16): the module is left out of quantization (GPTQModel ``dynamic`` with a ``-:`` skip
  rule) and stored as a plain ``weight``; the file also lists the quantized modules in
  ``quantization_config.modules_in_block_to_quantize``, which transformers' GPTQ loader (through optimum) reads to
  build the kept module as ``nn.Linear``. So plain transformers and GPTQModel.load read it, and vLLM does too
  unless the file splits a group of linears vLLM fuses (:data:`FUSED_IN_VLLM`).
* GPTQ, **8 bits**: through GPTQModel's ``dynamic`` per-module bit widths, written into
  ``quantization_config.dynamic``. GPTQModel.load and vLLM (GPTQ/Marlin with ``dynamic``) read it; plain
  ``transformers.from_pretrained`` (5.24) does **not** (it builds every layer at the global bit width and fails
  with a size mismatch).
* AWQ: the module is kept **unquantized in fp16** and named in ``quantization_config.modules_to_not_convert``,
  which transformers' AWQ loader (and vLLM's) honour, so the file stays loadable with plain transformers.

lorakit's own evaluation (``lorakit eval``/``gate``, dequantized path) reads every kind: it derives each layer's
bit width from its packed tensors and loads unquantized tensors as they are.
"""

from __future__ import annotations

import re

from lorakit.errors import InputError
from lorakit.quantize.checks import QUANTIZED_LINEARS

KEEP_BITS = {"gptq": 8, "awq": 16}  # the higher precision the quantization search keeps sensitive modules at
ALLOWED_BITS = {"gptq": (8, 16), "awq": (16,)}  # what each method's checkpoint can express per module
UNQUANTIZED = 16
LOADER_TRANSFORMERS = "transformers.AutoModelForCausalLM.from_pretrained (with gptqmodel installed{optimum})"
LOADER_GPTQMODEL = "gptqmodel.GPTQModel.load"
LOADER_VLLM = "vLLM ({what})"
LOADER_LORAKIT = "lorakit eval/gate (dequantized path)"


def check_module_bits(config: dict, method: str, bits: int, module_bits: dict[str, int] | None) -> dict[str, int]:
    """Validated overrides {module name: bits}; an InputError naming the bad entry otherwise."""
    if not module_bits:
        return {}
    n_layers = int(config["num_hidden_layers"])
    valid = {f"model.layers.{i}.{lin}" for i in range(n_layers) for lin in QUANTIZED_LINEARS}
    allowed = ALLOWED_BITS[method]
    out = {}
    for name, b in sorted(module_bits.items()):
        if name not in valid:
            raise InputError(f"--module-bits names {name!r}, which is not a quantized linear of this model; use "
                             f"names like model.layers.0.mlp.down_proj (layers 0..{n_layers - 1})")
        if int(b) not in allowed:
            how = ("8 (GPTQModel dynamic 8-bit) or 16 (left unquantized)" if method == "gptq"
                   else "16 (unquantized fp16)")
            raise InputError(f"--module-bits {name}={b}: {method} keeps a module at {how} only")
        out[name] = int(b)
    if bits >= 8 and out:
        raise InputError("--module-bits raises chosen modules above --bits; with --bits 8 there is nothing to raise")
    return out


def gptq_dynamic(module_bits: dict[str, int]) -> dict[str, dict[str, int]] | None:
    """GPTQModel ``dynamic`` overrides: one anchored regex per module (first match wins, so order is irrelevant);
    ``-:`` skips a module (left unquantized), ``+:`` sets its bits."""
    if not module_bits:
        return None
    return {(f"-:^{re.escape(name)}$" if b >= UNQUANTIZED else f"+:^{re.escape(name)}$"):
            ({} if b >= UNQUANTIZED else {"bits": b}) for name, b in sorted(module_bits.items())}


def modules_in_block_to_quantize(n_layers: int, module_bits: dict[str, int]) -> list[list[str]] | None:
    """The ``quantization_config.modules_in_block_to_quantize`` of a GPTQ file with unquantized modules, or None.

    transformers (through optimum's ``GPTQQuantizer.convert_model``) builds a quantized layer only for the linears
    whose name ends with an entry here, and vLLM reads the same key. A kind quantized in every layer is named by
    its in-block name (``self_attn.q_proj``); a kind kept unquantized in only some layers is listed by full name
    for the layers where it is quantized, so the list says exactly which modules hold packed weights.
    """
    kept = {name for name, b in module_bits.items() if b >= UNQUANTIZED}
    if not kept:
        return None
    names: list[str] = []
    for kind in QUANTIZED_LINEARS:
        quantized = [i for i in range(n_layers) if f"model.layers.{i}.{kind}" not in kept]
        if len(quantized) == n_layers:
            names.append(kind)
        else:
            names += [f"model.layers.{i}.{kind}" for i in quantized]
    return [names]


# The group sizes torch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``) accepts. GPTQModel 7.6 picks that
# kernel for a 4-bit GPTQ file on CPU whenever its TorchFused class lists the group size, and that list has 16: the
# first forward then fails ("expect qGroupSize to be 32, 64, 128 or 256"). A file at another group size names
# GPTQModel's portable torch kernel in ``quantization_config.backend``, which transformers reads when it loads.
CPU_INT4_KERNEL_GROUPS = (32, 64, 128, 256)
PORTABLE_BACKEND = "torch"


def loader_backend(layout: str, bits: int, group_size: int) -> str | None:
    """The ``quantization_config.backend`` a checkpoint needs for plain transformers to run it on CPU, or None.

    None leaves the kernel to the loader (the fast one where the shape allows). "torch" is slower on GPU than the
    kernels GPTQModel would pick there, so it is written only where the CPU kernel would fail; vLLM ignores the key.
    """
    if layout == "gptq-v1" and bits == 4 and group_size > 0 and group_size not in CPU_INT4_KERNEL_GROUPS:
        return PORTABLE_BACKEND
    return None


def _gptq_bits_vary(method: str, module_bits: dict[str, int]) -> bool:
    """A GPTQ file whose quantized modules differ in bit width (``dynamic`` bits), which plain transformers cannot
    build; modules left unquantized do not count (``modules_in_block_to_quantize`` expresses them)."""
    return method == "gptq" and any(b < UNQUANTIZED for b in module_bits.values())


# Linears vLLM fuses into one layer (qkv_proj, gate_up_proj) for Llama-style models. It loads a fused layer at one
# precision and refuses a checkpoint whose shards differ ("Detected some but not all shards ... are quantized";
# vllm/model_executor/layers/quantization/utils/gptq_utils.py), so a module kept apart from its group is not vLLM's.
FUSED_IN_VLLM = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def split_fused_groups(module_bits: dict[str, int]) -> list[str]:
    """The fused groups (``model.layers.3.self_attn.q/k/v``) whose members do not share one precision."""
    layers = sorted({int(name.split(".")[2]) for name in module_bits if name.startswith("model.layers.")})
    split = []
    for i in layers:
        for group in FUSED_IN_VLLM:
            if len({module_bits.get(f"model.layers.{i}.{lin}") for lin in group}) > 1:
                prefix = group[0].rsplit(".", 1)[0]
                split.append(f"model.layers.{i}.{prefix}." + "/".join(lin.rsplit(".", 1)[1].removesuffix("_proj")
                                                                       for lin in group))
    return split


def loaders(method: str, layout: str, module_bits: dict[str, int]) -> list[str]:
    """The loaders that read a checkpoint of this kind (the ones lorakit's tests exercise come first)."""
    vllm_loads = not split_fused_groups(module_bits)  # see FUSED_IN_VLLM

    def vllm(what: str) -> list[str]:
        return [LOADER_VLLM.format(what=what)] if vllm_loads else []

    if _gptq_bits_vary(method, module_bits):
        return [LOADER_GPTQMODEL, *vllm("GPTQ with per-module `dynamic` bits"), LOADER_LORAKIT]
    if layout == "awq-gemm":  # GPTQModel.load is not listed for fp16-kept modules: not verified
        return [LOADER_TRANSFORMERS.format(optimum=""), LOADER_LORAKIT,
                *vllm("AWQ, honours modules_to_not_convert")] + ([] if module_bits else [LOADER_GPTQMODEL])
    return [LOADER_TRANSFORMERS.format(optimum=" and optimum"), LOADER_LORAKIT, LOADER_GPTQMODEL,
            *vllm("GPTQ; honours modules_in_block_to_quantize" if module_bits else "GPTQ")]


def vllm_note(module_bits: dict[str, int]) -> str:
    """What how_to_load adds when vLLM cannot load the file, or nothing."""
    split = split_fused_groups(module_bits)
    if not split:
        return ""
    return (f" Not vLLM: it fuses q/k/v and gate/up into one layer each and needs one precision per fused layer; "
            f"this file splits {len(split)} ({split[0]}{', ...' if len(split) > 1 else ''}).")


def plain_transformers_loads(method: str, module_bits: dict[str, int]) -> bool:
    return not _gptq_bits_vary(method, module_bits)


def how_to_load(method: str, layout: str, module_bits: dict[str, int], backend: str | None = None) -> str:
    vllm = not split_fused_groups(module_bits)
    if _gptq_bits_vary(method, module_bits):
        cpu = (f" On CPU pass backend={backend!r} to GPTQModel.load: its int4 kernel takes group sizes "
               f"{'/'.join(map(str, CPU_INT4_KERNEL_GROUPS))} only.") if backend else ""
        return ("GPTQ with per-module bit widths (GPTQModel `dynamic` in quantization_config): load with "
                f"gptqmodel.GPTQModel.load(folder){' or vLLM' if vllm else ''}; plain transformers.from_pretrained "
                "does NOT load it. `lorakit eval`/`gate` read it (dequantized path)." + cpu + vllm_note(module_bits))
    if method == "gptq":
        kept = (f"; {len(module_bits)} modules are left unquantized (plain weights; the quantized ones are listed in "
                "quantization_config.modules_in_block_to_quantize)") if module_bits else ""
    else:
        kept = f"; {len(module_bits)} sensitive modules are kept in fp16 (modules_to_not_convert)" if module_bits else ""
    if backend:
        return (f"transformers.AutoModelForCausalLM.from_pretrained(folder) with gptqmodel installed (it reads "
                f"quantization_config.backend = {backend!r}: CPU's int4 kernel takes group sizes "
                f"{'/'.join(map(str, CPU_INT4_KERNEL_GROUPS))} only; GPTQ_TORCH_CACHE_WEIGHTS=1 makes it faster for "
                f"dense-weight memory); gptqmodel.GPTQModel.load(folder, backend={backend!r}) on CPU"
                f"{'; vLLM reads the same GPTQ layout' if vllm else ''}{kept}." + vllm_note(module_bits))
    if layout == "awq-gemm":
        return ("transformers.AutoModelForCausalLM.from_pretrained(folder) with gptqmodel installed; "
                f"{'vLLM and GPTQModel.load read' if vllm else 'GPTQModel.load reads'} the same AWQ GEMM layout{kept}."
                + vllm_note(module_bits))
    return ("transformers.AutoModelForCausalLM.from_pretrained(folder) with gptqmodel and optimum installed; "
            f"{'vLLM/SGLang and GPTQModel.load read' if vllm else 'GPTQModel.load reads'} the same GPTQ layout{kept}."
            + vllm_note(module_bits))


def _linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Every decoder linear of a Llama-style config by module name: (out_features, in_features)."""
    h, inter, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config.get("num_attention_heads") or 1
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    shapes = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h), "self_attn.v_proj": (kv * hd, h),
              "self_attn.o_proj": (h, heads * hd), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    return {f"model.layers.{i}.{lin}": shape for i in range(n_layers) for lin, shape in shapes.items()}


def _linear_bytes(out_f: int, in_f: int, b: int, group_size: int, method: str, bits: int) -> int:
    """One linear quantized to ``b`` bits: codes, scales, zeros (and GPTQ's g_idx)."""
    groups = in_f // group_size
    size = out_f * in_f * b // 8 + groups * out_f * 2 + groups * out_f * b // 8
    return size + (in_f * 4 if method == "gptq" or bits != 4 else 0)


def predicted_size_bytes(config: dict, *, method: str, bits: int, group_size: int,
                         module_bits: dict[str, int] | None = None, keep_sensitive: int = 0,
                         dtype_bytes: int = 2) -> int:
    """Bytes of the weights file a configuration will produce (tensor data; the small header excluded).

    Used to order a search by size and to skip what ``max_size_bytes`` rules out before spending minutes
    quantizing; the real size is recorded per trial. ``keep_sensitive`` K: which K linears stay unquantized is known
    only after calibration, so the K whose 16-bit copy would add the most are counted: an upper bound, which the
    real size meets when the kept ones are among the largest linears (SmolLM2's ``down_proj``s are).
    """
    module_bits = dict(module_bits or {})
    if keep_sensitive:
        growth = {}
        for name, (out_f, in_f) in _linear_shapes(config).items():
            b = module_bits.get(name, bits)
            if b < 16:
                growth[name] = out_f * in_f * dtype_bytes - _linear_bytes(out_f, in_f, b, group_size, method, bits)
        for name in sorted(growth, key=lambda n: (-growth[n], n))[:keep_sensitive]:
            module_bits[name] = 16
    h, n_layers = config["hidden_size"], config["num_hidden_layers"]
    total = 0
    for name, (out_f, in_f) in _linear_shapes(config).items():
        b = module_bits.get(name, bits)
        total += out_f * in_f * dtype_bytes if b >= 16 else _linear_bytes(out_f, in_f, b, group_size, method, bits)
    vocab = config["vocab_size"]
    total += vocab * h * dtype_bytes * (1 if config.get("tie_word_embeddings", True) else 2)
    total += (2 * n_layers + 1) * h * dtype_bytes  # norms
    return total
