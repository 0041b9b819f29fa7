"""Training variants from practice: DoRA, LoftQ / PiSSA / OLoRA initialisation, and LoRA+ learning rates.

The loop and the loader call these few hooks; everything variant-specific lives here so that a plain LoRA run
is untouched by them.

- DoRA (``variant="dora"``): PEFT's ``use_dora``; a learned magnitude per output row times the normalised
  direction W + s·B·A. Its update is not B·A, so merging materialises it (lorakit.adapters).
- PiSSA / OLoRA (``init``): PEFT's ``init_lora_weights="pissa"``/``"olora"``; they move the top singular
  (PiSSA) or QR (OLoRA) part of W into A, B and train on the residual base. The saved adapter is converted to
  plain LoRA relative to the original base with PEFT's ``path_initial_model_for_weight_conversion`` (rank 2r),
  so it merges like any LoRA adapter. Both need a full-precision base (``quant="none"``): on a 4-bit base the
  residual is re-quantized and no conversion is exact.
- LoftQ (``init="loftq"``, NF4 only): A, B start as the rank-r SVD of W − dequant(NF4(W)), so the 4-bit base plus
  the adapter starts as close to W as rank r allows. This is PEFT's ``replace_lora_weights_loftq`` computation
  (one SVD of the quantization residual), done here because PEFT's function moves the weights to CUDA
  unconditionally (peft 0.21.2, ``utils/loftq_utils.py`` ``_loftq_init_new``); unlike it, B is divided by the
  LoRA scaling so that scaling·B·A is the residual's best rank-r approximation for any alpha. The adapter belongs
  to the quantized base; merging it into the original weights is refused unless asked for.
- LoRA+ (``lora_plus_ratio``): B's learning rate is ratio x A's (the paper recommends 16); as in PEFT's
  ``create_loraplus_optimizer``, every parameter that is not a ``lora_B`` (A, DoRA magnitudes) keeps the base lr.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import InputError
from lorakit.train.options import BASE_CHANGING_INITS, INITS, VARIANTS

LR_SCALE = "lr_scale"  # param-group key: the loop sets group lr = scheduled lr x this
_BASE_CHANGING = BASE_CHANGING_INITS


def check_variant(variant: str, init: str, quant: str, lora_plus_ratio: float | None) -> None:
    """Refuse combinations the base or PEFT cannot train correctly, before anything is loaded."""
    if variant not in VARIANTS:
        raise InputError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if init not in INITS:
        raise InputError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if lora_plus_ratio is not None and not (float(lora_plus_ratio) > 0 and float(lora_plus_ratio) < float("inf")):
        raise InputError(f"--lora-plus-ratio must be a positive number (16 is the LoRA+ default), got {lora_plus_ratio}")
    if init == "loftq" and quant != "nf4":
        raise InputError(
            "--init loftq initialises the adapter to cancel the NF4 quantization error, but --quant none has no "
            "quantized base; use --quant nf4 with --init loftq, or another --init"
        )
    if init in _BASE_CHANGING and quant != "none":
        raise InputError(
            f"--init {init} rewrites the base weights into a residual, which a 4-bit base cannot hold exactly (PEFT "
            f"requires a float base for it); use --quant none with --init {init}, or --init loftq for a 4-bit base"
        )
    if init in _BASE_CHANGING and variant == "dora":
        # Tried with peft 0.21.2 on a tiny Llama: the converted DoRA adapter on the original base did not give the
        # trained model's logits (far outside float32 rounding), so the saved adapter would not be what was trained.
        raise InputError(
            f"--variant dora with --init {init}: PEFT's conversion of {init} factors to plain LoRA on the original base "
            "does not reproduce a trained DoRA model; use --init default with DoRA, or --variant lora with --init "
            f"{init}"
        )


def check_base(base_dir: Path, variant: str, quant: str, targets: str | list[str]) -> None:
    """DoRA on a 4-bit Conv1D (GPT-2-style fused layers) is not supported by PEFT: refuse before loading.

    The architecture is built on the meta device (no weights read), so this costs well under a second.
    """
    if variant != "dora" or quant != "nf4":
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    wanted = None if isinstance(targets, str) else {t.split(".")[-1] for t in targets}
    bad = [n for n, m in model.named_modules()
           if isinstance(m, Conv1D) and (wanted is None or n.split(".")[-1] in wanted)]
    if bad:
        raise InputError(
            f"--variant dora on a 4-bit base: {bad[0]} (and {len(bad) - 1} more) is a Conv1D layer, for which PEFT has "
            "no quantized DoRA; train with --quant none, or --variant lora"
        )


def lora_config_kwargs(variant: str, init: str) -> dict[str, Any]:
    """The PEFT ``LoraConfig`` fields of a variant (LoftQ is applied after injection, see :func:`after_init`)."""
    out: dict[str, Any] = {"use_dora": variant == "dora"}
    if init in _BASE_CHANGING:
        out["init_lora_weights"] = init
    return out


def after_init(model: torch.nn.Module, init: str, base_dir: Path) -> None:
    """LoftQ: set each 4-bit layer's A, B to the rank-r SVD of its quantization residual W − dequant(Q).

    W is read from the base folder one tensor at a time (the loaded model only holds the 4-bit weights).
    """
    if init != "loftq":
        return
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    from lorakit.io.safetensors_stream import read_tensor
    from lorakit.models.folder import tensor_index

    index = tensor_index(base_dir)
    done = 0
    for path, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        shard, info = index[f"{path.removeprefix('base_model.model.')}.weight"]
        with open(base_dir / shard, "rb") as fh:
            original = read_tensor(fh, info).double()
        qweight = module.get_base_layer().weight
        dq = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state).double()
        for name in module.lora_A:
            A, B = _rank_r(original - dq, module.r[name])
            module.lora_A[name].weight.data = A.to(module.lora_A[name].weight.dtype)
            module.lora_B[name].weight.data = (B / module.scaling[name]).to(module.lora_B[name].weight.dtype)
            if name in getattr(module, "lora_magnitude_vector", {}):
                # DoRA initialised its magnitude from B = 0; with the LoftQ factors m = ‖dequant(Q) + s·B·A‖ (rows)
                # keeps the starting model at dequant(Q) + s·B·A, as for plain LoRA.
                magnitude = module.lora_magnitude_vector[name].weight
                magnitude.data = torch.linalg.norm(dq + B.double() @ A.double(), dim=1).to(magnitude.dtype)
            done += 1
    if not done:
        raise InputError("--init loftq found no 4-bit LoRA layer to initialise; train with --quant nf4")


def _rank_r(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt()
    return (root[:, None] * Vh[:r]).float(), (U[:, :r] * root).float()


def lora_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def initial_state(model: torch.nn.Module, init: str) -> dict[str, torch.Tensor] | None:
    """The adapter right after a base-changing init: PEFT's conversion to plain LoRA needs it at save time."""
    if init not in _BASE_CHANGING:
        return None
    return {n: p.detach().clone() for n, p in lora_params(model).items()}


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    lora_plus_ratio: float | None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with LoRA+, ``lora_B`` weights in their own group at ratio x lr."""
    named = list(lora_params(model).items())
    if lora_plus_ratio is None:
        groups = [{"params": [p for _, p in named], LR_SCALE: 1.0}]
    else:
        ratio = float(lora_plus_ratio)
        groups = [{"params": [p for n, p in named if ".lora_B." not in n], LR_SCALE: 1.0, "name": "A"},
                  {"params": [p for n, p in named if ".lora_B." in n], LR_SCALE: ratio, "name": "B"}]
    for g in groups:
        g["lr"] = lr * g[LR_SCALE]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def save_adapter(model: torch.nn.Module, dest: Path, init: str, initial: dict[str, torch.Tensor] | None) -> None:
    """``save_pretrained``; a PiSSA/OLoRA adapter is converted to plain LoRA on the original base (rank 2r)."""
    if initial is None:
        model.save_pretrained(dest, safe_serialization=True)
        return
    params = lora_params(model)
    trained = {n: p.detach().clone() for n, p in params.items()}
    config = model.peft_config["default"]
    with tempfile.TemporaryDirectory(prefix="lorakit-init-") as tmp:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(initial[n])
            try:
                config.init_lora_weights = True
                model.save_pretrained(tmp, safe_serialization=True)
            finally:
                config.init_lora_weights = init
                for n, p in params.items():
                    p.copy_(trained[n])
        model.save_pretrained(dest, safe_serialization=True, path_initial_model_for_weight_conversion=tmp)
