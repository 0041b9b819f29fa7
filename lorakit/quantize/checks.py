"""What a model must satisfy before lorakit spends minutes quantizing it.

Every check runs before any output exists, so a bad input costs seconds and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import InputError
from lorakit.models.folder import read_model_config, shard_names

METHODS = ("gptq", "awq")
BITS = (4, 8)
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
# Decoder architectures whose blocks use Llama's module names (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
# input_layernorm, post_attention_layernorm): the AWQ scale search relies on them. Only llama is tested.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def check_method(method: str, bits: int, group_size: int) -> None:
    if method not in METHODS:
        raise InputError(f"--method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if bits not in BITS:
        raise InputError(f"--bits {bits} is out of range; choose 4 or 8")
    if group_size not in GROUP_SIZES:
        raise InputError(
            f"--group-size {group_size} is out of range; choose a power of two from {GROUP_SIZES[0]} to "
            f"{GROUP_SIZES[-1]} (128 is the common choice, 32 or 64 for better quality)"
        )


def check_model(model_dir: Path) -> dict:
    """The model's config, after refusing folders that are not an unquantized, supported HF causal LM."""
    config = read_model_config(model_dir)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise InputError(
            f"{model_dir} is already quantized ({method}); quantize the full-precision model it was made from "
            "(e.g. the output of `lorakit merge --output-kind model`)"
        )
    shard_names(model_dir)  # refuses folders without safetensors weights
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise InputError(
            f"{model_dir} is a {model_type or 'unknown'!s} model; lorakit quantize supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-style decoder blocks)"
        )
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        if not isinstance(config.get(key), int):
            raise InputError(f"{model_dir}/config.json has no integer {key}; the model folder is incomplete")
    return config


def linear_in_features(config: dict) -> dict[str, int]:
    """Input size of every quantized linear kind, from the config alone."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or h // heads
    return {"q/k/v_proj": h, "o_proj": heads * head_dim, "gate/up_proj": h, "down_proj": inter}


def resolve_group_size(config: dict, group_size: int, strict: bool) -> tuple[int, str | None]:
    """The group size to use and, when it had to change, the message saying why.

    A group must divide every quantized layer's input size, else the checkpoint cannot be packed or loaded
    (SmolLM2-135M's hidden size 576 is not a multiple of 128). Unless ``strict``, lorakit takes the largest
    supported power of two below the request that divides them all, and says so.
    """
    sizes = linear_in_features(config)
    bad = {name: n for name, n in sizes.items() if n % group_size}
    if not bad:
        return group_size, None
    valid = [g for g in GROUP_SIZES if g < group_size and all(n % g == 0 for n in sizes.values())]
    what = ", ".join(f"{name} has {n}" for name, n in bad.items())
    if strict or not valid:
        hint = f"pass --group-size {valid[-1]}" if valid else "no supported group size divides them"
        raise InputError(f"--group-size {group_size} does not divide every layer's input size ({what}); {hint}")
    chosen = valid[-1]
    return chosen, (f"group size {group_size} does not divide every layer's input size ({what}); "
                    f"using {chosen} instead")


# Rounding's memory, per (method, compute dtype): bytes per parameter of the decoder's linears and per other
# parameter (embeddings, norms), and bytes per calibration token per hidden unit (the layer states every block is
# replayed with). Measured peaks above the process's start (bench/results/quantize_memory.json, SmolLM2-135M whole or
# cut to 6 or 12 layers): GPTQ float32 9.75 bytes per added decoder parameter (float32_per_param_bytes) and 46.4 per
# calibration token and hidden unit (float32_per_calibration_token_per_hidden_bytes); GPTQ bfloat16 1.82 per added
# parameter (bfloat16_per_param_bytes); AWQ float32 13.6 (awq_float32_per_param_bytes: its integer codes wait for
# packing). Rounded up so the estimate covers every measured peak (runs.*.estimate_over_peak, 1.1x to 1.2x). AWQ
# holds the model in float32 whatever its compute dtype, and its 10 bytes per token and hidden unit (two float32
# copies of the states) are assumed: only GPTQ was measured at two calibration sizes. float16 counts as bfloat16.
ROUNDING_BYTES_PER_PARAM = {("gptq", "float32"): (10.5, 9.5), ("gptq", "bfloat16"): (2.5, 2.5),
                            ("awq", "float32"): (14.5, 4.5)}
ROUNDING_STATE_BYTES = {"gptq": 48, "awq": 10}
ROUNDING_HESSIAN_COPIES = 2  # GPTQ's Hessian and GPTAQ's input-error term; AWQ's input Gram matrices


def _rounding_constants(method: str, compute_dtype: str) -> tuple[tuple[float, float], int]:
    dtype = "bfloat16" if compute_dtype in ("bfloat16", "float16") and method == "gptq" else "float32"
    return ROUNDING_BYTES_PER_PARAM[method, dtype], ROUNDING_STATE_BYTES[method]


def rounding_memory_bytes(model_dir: Path, method: str, compute_dtype: str, *, n_samples: int,
                          seq_len: int) -> dict[str, int]:
    """What rounding ``model_dir`` holds at once, in bytes, from its weight headers and config (nothing loads): the
    model as the method holds it with what rounding keeps per weight (``weights``), the calibration blocks' layer
    states (``states``) and one decoder layer's Hessians (``hessians``, float32 in_features² per linear).

    Why it matters: without it, a base too large for the machine is found out by the operating system, after
    training and merging (with scale tuning on, :func:`lorakit.quantize.tune.check_memory` is checked as well)."""
    import math

    from lorakit.models.folder import tensor_index

    config = read_model_config(model_dir)
    config = config.get("text_config") or config
    linear = other = 0
    for name, (_, info) in tensor_index(model_dir).items():
        n = math.prod(info.shape)
        if ".layers." in name and any(f".{lin}." in name for lin in QUANTIZED_LINEARS):
            linear += n
        else:
            other += n
    h, inter = int(config.get("hidden_size", 0)), int(config.get("intermediate_size", 0))
    (per_linear, per_other), per_state = _rounding_constants(method, str(compute_dtype).removeprefix("torch."))
    return {"weights": int(per_linear * linear + per_other * other),
            "states": int(per_state * int(n_samples) * int(seq_len) * h),
            "hessians": ROUNDING_HESSIAN_COPIES * 4 * (6 * h * h + inter * inter)}


def check_rounding_memory(model_dir: Path, method: str, compute_dtype: str, *, n_samples: int, seq_len: int,
                          what: str = "lorakit quantize", available: int | None = None) -> None:
    """Refuse a quantization whose :func:`rounding_memory_bytes` exceed the memory available (``available``
    defaults to what the OS reports now), before any rounding; ``what`` names the step in the message."""
    from lorakit.runtime import memory_shortfall, memory_size

    need = rounding_memory_bytes(model_dir, method, compute_dtype, n_samples=n_samples, seq_len=seq_len)
    short = memory_shortfall(need, available)
    if short is None:
        return
    total, available = short
    raise InputError(
        f"{what}: {method.upper()} rounding in {compute_dtype} needs about {memory_size(total)} at once and "
        f"{memory_size(available)} of memory is available: {memory_size(need['weights'])} for the model and its "
        f"packed copy, {memory_size(need['states'])} of the {n_samples} calibration blocks' layer states, "
        f"{memory_size(need['hessians'])} of one layer's Hessians. Quantize on a CUDA device (route_gpu in a run "
        "config), on a machine with more free memory, or with fewer calibration blocks (--n-samples)")
