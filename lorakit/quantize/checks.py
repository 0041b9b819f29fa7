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
