"""Write lorakit's own quantization results as a standard checkpoint folder (AWQ GEMM or GPTQ v1 layout)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.io.atomic import write_json
from lorakit.io.safetensors_stream import save_file
from lorakit.quantize.grid import GroupQuant
from lorakit.quantize.layouts import pack_awq, pack_gptq


def quantization_config(layout: str, bits: int, group_size: int, sym: bool, keep_fp: tuple[str, ...] = ()) -> dict:
    if layout == "awq-gemm":
        return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": ["lm_head", *keep_fp]}
    if keep_fp:
        raise ValueError("modules kept in fp16 are expressed only in the AWQ GEMM layout (modules_to_not_convert)")
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": sym,
            "checkpoint_format": "gptq", "format": "gptq", "lm_head": False}


def write_checkpoint(out_dir: Path, model, quantized: dict[str, GroupQuant], config: dict, layout: str, *,
                     bits: int, group_size: int, sym: bool, dtype: torch.dtype, keep_fp: tuple[str, ...] = ()) -> None:
    """Save ``model``'s tensors with each quantized linear replaced by its packed form, and the config.

    The unquantized tensors (embeddings, norms, lm_head) are stored in ``dtype``: float16, the convention of
    AWQ/GPTQ checkpoints whose GPU kernels compute in fp16 (fp32 would double the embedding's share of the size).
    """
    pack = pack_awq if layout == "awq-gemm" else pack_gptq
    tied = bool(config.get("tie_word_embeddings", True))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        module, _, kind = name.rpartition(".")
        if module in quantized:
            if kind == "weight":
                for key, value in pack(quantized[module]).items():
                    tensors[f"{module}.{key}"] = value.contiguous()
            else:  # a bias stays in the model's dtype
                tensors[name] = tensor.detach().to("cpu", dtype).contiguous()
            continue
        if tied and name == "lm_head.weight":
            continue  # shares storage with the input embedding; the loader re-ties it
        tensors[name] = tensor.detach().to("cpu", dtype).contiguous().clone()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = dict(config)
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).replace("torch.", "")
    config["quantization_config"] = quantization_config(layout, bits, group_size, sym, keep_fp)
    write_json(out_dir / "config.json", config)
