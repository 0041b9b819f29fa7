"""The options of the train stage, declared once: ``lorakit train``, the run config's ``lora:`` section and
``lorakit.train.train_adapter`` take their defaults from :class:`TrainOptions` (:mod:`lorakit.options`).

The defaults are what the training sweep measured for the embedded release on CPU: learning rate 1e-3 for 40
optimizer steps of 2 x 2 packed rows of 512 tokens gave 93% / 59.5% exact match on the reverse-words /
number-words test splits of the bundled 2,000-example tasks (about 0.9 epoch), where the earlier default (2e-4,
one epoch of 400 examples) gave 0-7% and the same steps over 400 examples (4.5 epochs: memorised) 75% / 55%
(bench/results/train_sweep.json, ``release_point.<task>.<examples>.exact_match_test``). Two rows per micro-batch keeps CPU memory low: one
step of 8 packed rows of 256 tokens peaked at 8.3 GiB RSS without gradient checkpointing
(bench/results/train.json, ``memory``); activations, not logits, dominate.

80 steps, not 40: number-words' adapter answered 80%<!-- bench/results/train_sweep.json: number_mix.magnitudes.80.exact_match_test --> of its test questions after 80 steps (1.9 epochs) against
59.5%<!-- bench/results/train_sweep.json: number_mix.magnitudes.40.exact_match_test --> after 40 (its errors are magnitude errors, a skill it learns late: docs/data.md); the
adapters train side by side, so the release's training takes the longer of the two, about 80 x 10 s on a 2-core
AVX2 CPU.

Why one learning rate, not LoRA+ (``lora_plus_ratio``): at ratio 8 and the same 80 steps the adapters answer more
(number-words 93.5% of 200 test questions against 84.5% with one learning rate, 80% in an earlier float32 run,
bench/results/train_sweep.json ``lora_plus.number-words.*``), and a whole release trained that way passed every scorecard check, failing only the
quantized model's general-text check (bench/results/release_scorecard_bf16_loraplus8.json). But its adapters
forgot general English: perplexity on the shipped corpus +98% / +137% over the base (``release.general_text.vs_base``),
the merged model +61%, where the one-learning-rate release's merged model is +6.1%
(release_scorecard_bf16_gptq75.json). The gate compares the quantized model with the merged one, not the merged
model with the base, so that loss would ship unjudged; a default must not buy answers with the model's language.
LoRA+ stays an option (``--lora-plus-ratio``).

LoRA dropout is 0 (it was PEFT's customary 0.05): 40 steps are under one pass over the data, so there is nothing to
regularise against, and without dropout every micro-batch's shared prompt runs once (``lorakit.train.prefix``).
The release's adapters trained that way on a 2-core AVX2 CPU in 352 s / 381 s (reverse-words / number-words,
bench/results/release_scorecard_avx2.json: ``release.adapter_training.<task>.wall_time_s``) and answer 94% / 58% of
the test questions (``release.summary.<task>.test.exact_match.adapter``), where the sweep's dropout-0.05 adapters
above answered 93% / 59.5%.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lorakit.errors import InputError
from lorakit.options import Cli, StageOptions
from lorakit.runtime import DEFAULT_DEVICE

QUANT_MODES = ("nf4", "none")
VARIANTS = ("lora", "dora")
INITS = ("default", "loftq", "pissa", "olora")
BASE_CHANGING_INITS = ("pissa", "olora")  # they rewrite the base into a residual: a float base only
DEFAULT_MAX_STEPS = 80  # when neither max_steps nor epochs is given (the sweep above)


def parse_layer_spec(spec: str) -> tuple[str, int, int] | None:
    """``all`` -> None; ``top:N`` -> ("top", N, 0); ``A-B`` -> ("range", A, B). ValueError says the forms."""
    text = str(spec).strip().lower()
    if text == "all":
        return None
    forms = "all, top:N (the last N decoder layers) or A-B (0-based, inclusive)"
    head, sep, tail = text.partition(":")
    if sep and head == "top":
        if tail.isdigit() and int(tail) > 0:
            return ("top", int(tail), 0)
        raise ValueError(f"layers {spec!r}: top:N needs a positive whole N; the forms are {forms}")
    first, dash, last = text.partition("-")
    if dash and first.isdigit() and last.isdigit() and int(first) <= int(last):
        return ("range", int(first), int(last))
    raise ValueError(f"layers {spec!r} is not one of {forms}")


def layer_indices(spec: str, depth: int) -> list[int] | None:
    """The 0-based decoder layers ``spec`` adapts in a model of ``depth`` layers; None = every layer."""
    parsed = parse_layer_spec(spec)
    if parsed is None:
        return None
    kind, a, b = parsed
    if kind == "top":
        if a > depth:
            raise ValueError(f"layers top:{a}, but the base has {depth} decoder layers")
        return list(range(depth - a, depth))
    if b >= depth:
        raise ValueError(f"layers {a}-{b}, but the base's decoder layers are 0-{depth - 1}")
    return list(range(a, b + 1))


def without_default_layers(fields: dict) -> dict:
    """``fields`` without ``layers`` where it is the default ``all``: what was hashed before the option existed (a
    release's adapter stage folder, a checkpoint's resume fingerprint) hashes the same for the default."""
    return {k: v for k, v in fields.items() if not (k == "layers" and v == "all")}


def adapted_layers(spec: str, model_config: dict, base_name: str) -> list[int] | None:
    """``--layers`` against the base's depth, from its config.json: refused before any weight is read."""
    if parse_layer_spec(spec) is None:
        return None
    depth = model_config.get("num_hidden_layers")
    if not isinstance(depth, int):
        raise InputError(f"--layers {spec}: base {base_name}'s config.json gives no num_hidden_layers; "
                         "use --layers all")
    try:
        return layer_indices(spec, depth)
    except ValueError as exc:
        raise InputError(f"--layers: {exc} (base {base_name})") from None


class TrainOptions(StageOptions):
    """QLoRA (or plain LoRA) training of one adapter."""

    quant: Literal[QUANT_MODES] = Field(  # type: ignore[valid-type]
        "nf4", description="nf4: QLoRA (4-bit NF4 base, double quant, bitsandbytes); none: plain LoRA on the float base.")
    r: Annotated[int, Cli(decls=("--r",))] = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scaling alpha/r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout. 0 lets a micro-batch's shared prompt run "
                           "once (docs/train.md); any other value trains every copy of it (slower).")
    target: str = Field("all-linear", description="Modules to adapt: all-linear (never the output head) or a list "
                        "such as q,v or q_proj,v_proj.")
    layers: str = Field("all", description="Decoder layers that get adapters: all, top:N (the last N) or a range "
                        "such as 15-29 (0-based, inclusive). The frozen layers below the lowest adapted one need no "
                        "backward pass, so a step costs less (docs/train.md).")
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    variant: Literal[VARIANTS] = Field(  # type: ignore[valid-type]
        "lora", description="dora: DoRA (learned magnitude x normalised direction, PEFT use_dora); merges materialise it.")
    init: Literal[INITS] = Field(  # type: ignore[valid-type]
        "default", description="LoRA initialisation: loftq cancels the NF4 error (quant nf4 only); pissa/olora start "
        "from the base's principal directions (quant none only; saved converted to plain LoRA, rank 2r).")
    lora_plus_ratio: float | None = Field(None, gt=0, description="LoRA+: B learns this many times faster than A "
                                          "(16 is usual); none = one learning rate.")
    lr: float = Field(1e-3, ge=0, allow_inf_nan=False, description="Peak learning rate (linear warm-up and decay).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training rows, instead of max_steps.")
    max_steps: int | None = Field(None, gt=0, description=f"Optimizer steps; none = {DEFAULT_MAX_STEPS}, or 'epochs' "
                                  "when given.")
    batch_size: int = Field(2, gt=0, description="Packed rows per micro-batch.")
    grad_accum: int = Field(2, gt=0, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed of LoRA init, data order and dropout.")
    device: str = Field(DEFAULT_DEVICE, description="auto (CUDA when present), cpu or cuda[:N].")
    gradient_checkpointing: bool | None = Field(None, description="Recompute activations in the backward pass; none "
                                                "= on for CUDA, off on CPU (where it only costs time).")
    min_loss_drop: float | None = Field(0.01, ge=0, description="Sanity gate: required relative drop of the first "
                                        "batch's loss after training; none = no loss-fell check (finite loss and "
                                        "gradient checks stay on).")
    checkpoint_every: int | None = Field(50, gt=0, description="Steps between checkpoints (kept until the run "
                                         "succeeds, for --resume); none = no checkpoints.")

    @field_validator("layers")
    @classmethod
    def _layers_spec(cls, v: str) -> str:
        parse_layer_spec(v)  # the syntax; the range against the model's depth is checked when the base is read
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainOptions:
        # The rules of lorakit.train.variants.check_variant, so a run config is refused before any stage runs.
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give epochs or max_steps, not both")
        if self.init == "loftq" and self.quant != "nf4":
            raise ValueError("init 'loftq' cancels the NF4 quantization error and needs quant 'nf4'")
        if self.init in BASE_CHANGING_INITS and self.quant != "none":
            raise ValueError(f"init '{self.init}' rewrites the base into a residual and needs quant 'none'")
        if self.init in BASE_CHANGING_INITS and self.variant == "dora":
            raise ValueError(f"init '{self.init}' cannot be saved converted for variant 'dora'; use init 'default'")
        return self


TRAIN = TrainOptions()
