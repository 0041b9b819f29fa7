"""``export_portable_adapter``: a PEFT LoRA adapter that every runtime applies with the same strength.

Runtimes disagree on LoRA scaling: PEFT applies alpha/√r with ``use_rslora``, SGLang ignores ``use_rslora`` (alpha/r),
llama.cpp's LoRA applies one alpha over the rank and knows no per-module ``rank_pattern``/``alpha_pattern``. So an
rsLoRA adapter at r=16 is applied 4x too weakly there, and a per-module alpha silently becomes the global one.

The portable form removes every one of those choices: each module's scaling is folded into its B factor
(B' = scaling·B, computed in float32), modules of lower rank are padded with zero rows of A and zero columns of B
up to the largest rank (B'·A is unchanged: the padded products are zero), and the config says ``r = lora_alpha =
that rank``, ``use_rslora: false``, no patterns. The update is then B'·A with scaling exactly 1 under any of the
conventions above. Factors are written in float32 so the fold itself does not round.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import InputError

_PREFIX = "base_model.model."
# Copied unchanged: the tokenizer an adapter may carry, and its training record (base digest, for lorakit merge).
_COPIED_FILES = ("lorakit_train.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model")


def portable_factors(module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, scaling·B) of one module in float32, zero-padded to ``rank``."""
    A = module.A.to(torch.float32)
    B = module.B.to(torch.float32) * module.scaling
    pad = rank - A.shape[0]
    if pad:
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
    return A.contiguous(), B.contiguous()


def export_portable_adapter(
    adapter: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    force: bool = False,
) -> Any:
    """Write ``adapter`` (a folder or registry reference) in the portable form described in the module docstring."""
    from lorakit import __version__
    from lorakit.adapters import CONFIG_FILE, WEIGHTS_FILE, load_adapter
    from lorakit.export.gguf import EXPORT_META, ExportResult
    from lorakit.io.atomic import atomic_dir, check_output_free, write_json
    from lorakit.io.safetensors_stream import save_file

    output = Path(output)
    check_output_free(output, force)
    start = time.perf_counter()
    source = load_adapter(adapter)
    if output.resolve() == source.path.resolve():
        raise InputError(f"output {output} is the input adapter; write the portable adapter to another folder")
    if source.dora:
        raise InputError(
            f"adapter {source.label} is a DoRA adapter: its magnitude vectors are not a scale a runtime applies, so it "
            "has no portable LoRA form; merge it into the model (lorakit merge --output-kind model) and export that"
        )
    rank = max(m.rank for m in source.modules.values())
    tensors: dict[str, torch.Tensor] = {}
    scalings: dict[str, float] = {}
    for name, module in sorted(source.modules.items()):
        A, B = portable_factors(module, rank)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B
        scalings[name] = module.scaling
    cfg = dict(source.config)
    cfg.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}, inference_mode=True)
    meta = {
        "lorakit_version": __version__, "format": "peft-portable", "source": str(adapter),
        "source_digest": source.digest, "rank": rank, "scaling": 1.0,
        "source_config": {k: source.config.get(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern",
                                                              "alpha_pattern")},
        "folded_scaling": {"min": min(scalings.values()), "max": max(scalings.values())},
        "padded_modules": sum(m.rank < rank for m in source.modules.values()),
        "dtype": "float32",
    }
    with atomic_dir(output, force=force) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, cfg)
        for name in _COPIED_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, tmp / name)
        meta["wall_time_s"] = round(time.perf_counter() - start, 3)
        write_json(tmp / EXPORT_META, meta)
    return ExportResult(output, meta)
