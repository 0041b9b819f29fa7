"""How an HF Llama checkpoint maps onto llama.cpp's GGUF: hyper-parameter keys, tensor names, the Q/K row order.

llama.cpp's ``llama`` architecture is the only one lorakit writes. Its conventions, learned from llama.cpp's
``convert_hf_to_gguf.py`` and gguf-py's ``constants``/``tensor_mapping`` (and checked here by reading the result
back with transformers' own GGUF loader):

- tensors are renamed (``model.layers.N.self_attn.q_proj.weight`` -> ``blk.N.attn_q.weight`` ...);
- ``q_proj``/``k_proj`` rows are reordered per head: HF's rotary embedding rotates the two *halves* of a head
  (``rotate_half``), llama.cpp's rotates *adjacent pairs*, so row ``h·d + j`` of a head of size ``d`` moves to the
  position of pair ``(j mod d/2)``, element ``j div d/2``. The attention scores are unchanged because Q and K get
  the same permutation and RoPE is applied consistently on each side;
- tied embeddings: no ``output.weight`` is written; llama.cpp then uses ``token_embd.weight`` for the logits.
"""

from __future__ import annotations

import re

import numpy as np

from lorakit.errors import InputError

# HF name inside one decoder layer -> GGUF name inside ``blk.N``.
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SKIPPED = (".rotary_emb.inv_freq",)  # recomputed by every runtime from the rope settings


def check_llama_config(config: dict, source: str) -> None:
    """Refuse, with the reason, every checkpoint this mapping would write wrongly."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type != "llama" or (archs and archs != ["LlamaForCausalLM"]):
        raise InputError(
            f"{source} is a {model_type or 'unknown'} model ({', '.join(archs) or 'no architectures'}); lorakit "
            "writes GGUF for Llama-architecture models (LlamaForCausalLM) only; use llama.cpp's "
            "convert_hf_to_gguf.py for other architectures"
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise InputError(
            f"{source} is already quantized ({method}); GGUF export needs full-precision weights: export the merged "
            "model (lorakit merge --output-kind model), not its GPTQ/AWQ checkpoint"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise InputError(f"{source} has attention/MLP biases, which lorakit's Llama GGUF export does not write")
    rope = rope_settings(config)
    if rope["type"] not in ("default", "linear"):
        raise InputError(f"{source} uses rope scaling {rope['type']!r}; lorakit's GGUF export supports the default "
                         "rope and linear scaling only")


def rope_settings(config: dict) -> dict:
    """theta, scaling type and factor, from either transformers 5 (``rope_parameters``) or 4 (``rope_scaling``)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = params.get("factor", scaling.get("factor"))
    return {"theta": float(theta), "type": str(kind), "factor": None if factor is None else float(factor)}


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def write_hparams(writer, config: dict, vocab_size: int) -> None:
    """The ``llama.*`` keys llama.cpp reads to build the graph."""
    import gguf

    d = head_dim(config)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(vocab_size))
    writer.add_rope_dimension_count(d)
    if d != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(d)
        writer.add_value_length(d)
    rope = rope_settings(config)
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def gguf_name(hf_name: str, tied: bool) -> str | None:
    """The GGUF tensor name of an HF tensor; None for tensors llama.cpp does not store."""
    if hf_name.endswith(_SKIPPED) or (tied and hf_name == "lm_head.weight"):
        return None
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"blk.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    raise InputError(f"tensor {hf_name} has no place in llama.cpp's Llama layout; the checkpoint is not a plain "
                     "LlamaForCausalLM (refusing rather than dropping weights)")


def rotary_rows_to_pairs(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder Q/K rows from HF's half-split rotary layout to llama.cpp's interleaved pairs (see module doc)."""
    out_features = weight.shape[0]
    d = out_features // n_heads
    if d * n_heads != out_features or d % 2:
        raise InputError(f"a Q/K weight with {out_features} rows does not split into {n_heads} heads of even size")
    # rows of one head: [half 0: j=0..d/2-1, half 1: j=0..d/2-1] -> [(j, half) for j] ; i.e. (2, d/2) -> (d/2, 2)
    return weight.reshape(n_heads, 2, d // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def prepare_tensor(hf_name: str, weight: np.ndarray, config: dict) -> np.ndarray:
    """The array llama.cpp expects for ``hf_name`` (Q/K rows reordered; everything else as stored)."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return rotary_rows_to_pairs(weight, int(config["num_attention_heads"]))
    if hf_name.endswith("self_attn.k_proj.weight"):
        return rotary_rows_to_pairs(weight, int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    return weight
