"""Load the base for training (NF4 4-bit via bitsandbytes, or full precision), attach LoRA, and guard the CPU trap.

The compute dtype (``bnb_4bit_compute_dtype`` for NF4, the weights' dtype for plain LoRA) comes from
:func:`lorakit.compute.resolve_compute_dtype` for the train stage: bfloat16 only where it is fast. On a CPU
without bfloat16 units one NF4 micro-batch of SmolLM2-135M took 67 s in bfloat16 and 4.5 s in float32.

The trap (shared NOTES): on CPUs with AVX512-BF16, bitsandbytes repacks every 4-bit weight the first time a
``Linear4bit`` runs in eval mode on an input without grad. After that, training goes through a kernel without a
correct backward and LoRA gradients are silently wrong. Whether it repacks depends only on bitsandbytes' own
CPUID check (``bitsandbytes.functional.has_avx512bf16``), not on the compute dtype and not on
``ATEN_CPU_CAPABILITY``: it was measured to repack with float32 compute too, and under torch's AVX2 kernels (see
tests/test_train.py). Training never evaluates before it trains, and :func:`assert_not_repacked` checks the flag
before optimizer steps, so the failure is loud instead of silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters import TIED_TARGETS
from lorakit.compute import dtype_name, resolve_compute_dtype
from lorakit.errors import InputError, LorakitError
from lorakit.train.options import QUANT_MODES
from lorakit.runtime import resolve_device

SHORT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def pick_device(device: str) -> str:
    return resolve_device(device)


def parse_targets(target: str | list[str]) -> str | list[str]:
    """``all-linear`` (PEFT: every linear layer but the output head) or a list like ``q,v`` / ``q_proj,v_proj``."""
    if isinstance(target, str):
        if target.strip().lower() == "all-linear":
            return "all-linear"
        names = [t.strip() for t in target.split(",") if t.strip()]
    else:
        names = list(target)
    if not names:
        raise InputError("--target is empty; pass all-linear or a list such as q,k,v,o")
    return [SHORT_TARGETS.get(n, n) for n in names]


def check_tied_targets(targets: str | list[str], tied: bool, base_label: str) -> None:
    if not tied or isinstance(targets, str):
        return
    bad = [t for t in targets if t.split(".")[-1] in TIED_TARGETS]
    if bad:
        raise InputError(
            f"--target {','.join(bad)} on base {base_label}, whose output head is tied to the input embedding: the "
            "update would change both, and merging would be wrong; train without it (all-linear leaves it out)"
        )


def linear_names(model: torch.nn.Module, *, with_head: bool = False) -> list[str]:
    """The last name part of every linear layer; without the output head, what PEFT's ``all-linear`` adapts."""
    head = None if with_head else model.get_output_embeddings()
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


@dataclass
class LoadedModel:
    model: torch.nn.Module
    device: str
    quant: str
    compute_dtype: str
    gradient_checkpointing: bool
    trainable_params: int
    target_modules: list[str]


def load_for_training(base_dir: Path, *, quant: str, device: str, r: int, alpha: float, dropout: float,
                      targets: str | list[str], rslora: bool, seed: int,
                      gradient_checkpointing: bool | None, compute_dtype: str = "auto", variant: str = "lora",
                      init: str = "default", layers: list[int] | None = None) -> LoadedModel:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from lorakit.train.variants import after_init, lora_config_kwargs

    if quant not in QUANT_MODES:
        raise InputError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    on_cuda = device.startswith("cuda")
    dtype = resolve_compute_dtype(compute_dtype, "train", device)
    gc = on_cuda if gradient_checkpointing is None else bool(gradient_checkpointing)
    if quant == "nf4":
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb, device_map={"": device},
                                                     dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
        if gc:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    compute = dtype_name(dtype)
    model.config.use_cache = False
    torch.manual_seed(seed)  # LoRA A init
    layer_kwargs = {}
    if layers is not None:  # PEFT takes layers_to_transform only with a list of module names
        targets = linear_names(model) if targets == "all-linear" else targets
        layer_kwargs = {"layers_to_transform": list(layers)}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_rslora=rslora,
                        bias="none", task_type="CAUSAL_LM", **layer_kwargs, **lora_config_kwargs(variant, init))
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        names = linear_names(model, with_head=True)
        raise InputError(f"--target {targets}: {str(exc).splitlines()[0]}; linear layers of this model: {', '.join(names)}") from None
    after_init(model, init, base_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    resolved = sorted(model.peft_config["default"].target_modules)
    return LoadedModel(model, device, quant, compute, gc, trainable, resolved)


def repacked_modules(model: torch.nn.Module) -> list[str]:
    """4-bit layers whose weights bitsandbytes repacked for CPU inference (their backward is then wrong)."""
    out = []
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            out.append(name)
    return out


class CpuRepackError(LorakitError):
    """The 4-bit weights were repacked for CPU inference before training; gradients would be wrong."""

    exit_code = 1


def assert_not_repacked(model: torch.nn.Module) -> None:
    bad = repacked_modules(model)
    if bad:
        raise CpuRepackError(
            f"{len(bad)} 4-bit layer(s) (first: {bad[0]}) were repacked for CPU inference by an eval/no-grad pass "
            "before training; LoRA gradients would be wrong. Reload the model and train before evaluating it"
        )


def dropout_off(model: torch.nn.Module) -> None:
    """Disable dropout only, keeping every other module in training mode (no 4-bit CPU repacking)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
