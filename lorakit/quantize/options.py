"""The options of the quantize stage, declared once: ``lorakit quantize``, the run config's ``quantize:`` section and
``lorakit.quantize.quantize_model`` take their defaults from :class:`QuantizeOptions` (:mod:`lorakit.options`).

The defaults are the measured release configuration of the embedded SmolLM2-135M release.

Why GPTQ 4-bit, group 16, with a zero point, act-order, GPTAQ (alpha 0.5) and the clipping search, on 128 calibration
blocks, half of them general text. The bar is the gate's: general-text perplexity and mean KL within 5% (ln 1.05) of
the merged model, and no task losing more than 2 exact-match points on its val questions -- judged on all 200 of
them, since at the scorecard's first 50 one answer is the whole bar (bench/results/accuracy_sample_size_g32.json).
On the default release's merged model (bench/results/quantize_accuracy_all.json, ``variants.*``, every val and test
question): this setting (``gptq-g16-asym-act-gptaq50-clip-n128-general50``) is +3.6% on general text, mean KL 0.042,
and loses at most 0.5 points on any task; the same on 64 blocks (``...-general50``) lost 3.5 number-words points.
That model was a good draw: over four later cold releases (training seeds 0 and 1, bfloat16 and float32) this
setting lost up to 3.0 reverse-words points on val (bench/results/release_scorecard_bf16_seed1.json:
release.gate.scorecard_checks.1.value) and the gate rejected two of them; docs/release-status.md.
Group 32 with GPTAQ and clipping on 64 blocks of 3/4 general text, the default before (a cold release:
bench/results/release_scorecard_bf16_gptaq32.json), was +5.01% on general text (KL 0.059) and lost 2.5 number-words
points on all 200 (accuracy_sample_size_g32.json); plain GPTQ group 32 +7.8% (quantize_gptaq.json). The price of
group 16: a 0.47x bf16 file instead of 0.44x, a longer quantization, and torch's CPU int4 kernel takes groups of
32/64/128/256 only, so the file names GPTQModel's portable (slower, plain torch) kernel in its config, which
``transformers`` reads on load (:func:`lorakit.quantize.mixed.loader_backend`; vLLM ignores the key). Set
``group_size: 32`` to keep the fast CPU kernel at the cost measured above. Calibrating in float32 instead of
bfloat16 was not better (bench/results/quantize_calib_dtype.json).

Why GPTQ rather than AWQ (bench/results/quantize_regmean.json, ``variants.*``; 50 questions per task and split):
at the same size GPTQ keeps the tasks' answers far better -- exact match lost against the merged model, summed over
both tasks' val and test splits, 12 points (``gptq-g32-asym-act-general75``) against AWQ group 32's 50
(``awq-g32-general50``). Calibration mix: half general text cost more general English (+9.9%) for about the same
answers; 90% lost fewer answers but more general English (+8.9%). Group 128 does not divide SmolLM2's hidden size
576. Mixed precision (``module_bits``) is for other models: a GPTQ file with per-module bits is read by GPTQModel
and vLLM, not by plain ``transformers`` (:mod:`lorakit.quantize.mixed`). For other data or models, set
``target_degradation`` and let the search measure (``lorakit.quantize.search.quantize_to_target``).

Scale tuning (``tune_steps``) is off here and 100 steps in a release (``flows.config.QuantizeConfig``): a plain
``lorakit quantize`` stays minutes shorter, and a release, judged on its tasks' answers, buys them back. Measured on
the two releases of configs/steps240_search.yaml (bench/results/quantize_tuning_b1s240_seed{0,1}.json,
``variants.tune100-lr5e-04-general0``) and on cold releases of the default (docs/release-status.md). Tuned on the tasks' data (``tune_general_fraction`` 0) at 5e-4, the rejected seed-0 release's
reverse-words lost 0.0 val points instead of 3.0 and answered 94.5% of test against the merged model's 92.0%;
seed 1's moved by a point each way; general text stayed within the gate's bars. It costs 565-614 s per release
on 2 cores. Tuned on the rounding's mix of half general text it did not bring the answers back, and at 2e-3 the
held-out KL rose and the tuning was dropped (``variants.tune100``). In the default release's cold float32 run
(bench/results/release_scorecard_avx2_b1s240_tuned_seed0.json: release.quantization.tuning) it took 952 s and
reverse-words still lost 2.5 val points (release.gate.scorecard_checks.1.value): it narrows the 4-bit flips, it
does not remove them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from lorakit.gate.options import GATE
from lorakit.options import Cli, StageOptions
from lorakit.runtime import DEFAULT_DEVICE

# What a search aims at when asked without a target: the gate's own bar (a run config's `target_degradation`
# turns the search on).
RELEASE_TARGET_DEGRADATION = GATE.max_degradation
# AWQ tuning knobs of `lorakit quantize` and quantize_model (not run-config keys: the release uses these values).
AWQ_GRID = 20  # α values tried per group
# awq_scale_form -> the forms on the search grid (see lorakit.quantize.awq.search_scale)
AWQ_SCALE_FORMS = {"duo": ("duo",), "activation": ("activation",), "both": ("duo", "activation")}

# The error norm GPTQModel's clipping search (QuantizeConfig.mse) scores candidate ranges with when clip_search is on:
# the GPTQ reference implementation's value.
GPTQ_CLIP_NORM = 2.4
# GPTAQ's weight of the input-error correction when gptaq_alpha is none (GPTQ); measured (module docstring).
GPTAQ_ALPHA = 0.5

# The keys of QuantizeOptions that only the search reads (lorakit.quantize.search.quantize_to_target).
SEARCH_KEYS = ("target_degradation", "max_trials", "time_budget_s")
# The keys of scale tuning after rounding (lorakit.quantize.tune), passed on as one group.
TUNE_KEYS = ("tune_steps", "tune_lr", "tune_general_fraction", "tune_tokens", "tune_answer_weight", "tune_samples")


class QuantizeOptions(StageOptions):
    """GPTQ or AWQ 4/8-bit post-training quantization of a full-precision model."""

    method: Literal["gptq", "awq"] = Field(
        "gptq", description="gptq: GPTQModel's GPTQ (Hessian-based rounding). awq: lorakit's activation-aware scaling.")
    bits: Literal[4, 8] = Field(4, description="Weight bits.")
    group_size: int = Field(
        16, description="Input channels sharing one scale/zero (16..1024, power of two). If it does not divide every "
        "layer's input size, the largest valid one below it is used (128 does not divide SmolLM2's 576). Torch's CPU "
        "int4 kernel takes 32/64/128/256 only, so a 4-bit GPTQ file at 16 names GPTQModel's portable (slower) kernel in "
        "its config, which transformers reads; 32 keeps the fast one.")
    sym: Annotated[bool | None, Cli(decls=("--sym/--asym",))] = Field(
        False, description="Symmetric grid (no zero point) or asymmetric with a zero point (the default, for both "
        "methods); none = each method's convention: --sym for gptq, --asym for awq.")
    desc_act: Annotated[bool | None, Cli(decls=("--desc-act/--no-desc-act",))] = Field(
        None, description="GPTQ act-order: quantize columns by decreasing activation size; none = on for gptq, off "
        "for awq (which has no act-order).")
    gptaq_alpha: float | None = Field(
        None, ge=0, le=1, description="GPTQ: GPTAQ's asymmetric calibration (GPTQModel `gptaq`): each module's rounding "
        "also corrects the error the already quantized modules before it left in its inputs, that correction weighted "
        "alpha (0 = plain GPTQ). none = the measured 0.5 for gptq; awq has none. Same checkpoint layout either way.")
    clip_search: Annotated[bool, Cli(decls=("--clip-search/--no-clip-search",))] = Field(
        True, description="Search each group's clipping range instead of taking its min/max: gptq through GPTQModel's "
        "`mse` (a grid of shrunk ranges scored by the norm-2.4 rounding error, the GPTQ reference code's --mse; it "
        "lengthens quantization), awq through lorakit's per-group clipping search.")
    awq_scale_form: Literal["duo", "activation", "both"] = Field(
        "duo", description="awq: the scale form on the α grid: duo = x̄^α/w̄^(1−α) (AutoAWQ's default), activation = "
        "x̄^α (the paper's), both = let the output error pick per group (twice the search time). Which is better "
        "depends on the group size (bench/README.md, quantize).")
    keep_sensitive: int = Field(
        0, ge=0, description="Leave the K linears whose rounding hurts their output most unquantized (16-bit plain "
        "weights): ranked by lorakit.quantize.sensitivity, one forward pass over the calibration blocks, recorded in "
        "lorakit_quant.json. Plain transformers loads the file, vLLM too unless a group it fuses (q/k/v, gate/up) is "
        "split; on SmolLM2-135M three kept added 3.5 MB to 127 (bench/results/keep_sensitive_bf16_rw360_seed2.json) "
        "and kept no more of the tasks' answers (docs/quantize.md). Modules --module-bits names keep the higher of "
        "the two precisions. 0 = quantize every linear. 4-bit only.")
    n_samples: int | None = Field(
        None, gt=0, description="Calibration sequences; none = 128, or every one the data gives when fewer (at "
        "least 16; a warning says so and lorakit_quant.json records it). A number the data cannot fill is an error.")
    seq_len: int = Field(256, gt=0, description="Tokens per calibration sequence (128 x 256, half of them general "
                         "text, is what the small bundled tasks fill; 128 x 512 needs 65k calibration tokens).")
    seed: int = Field(0, description="Seed of the calibration text shuffle.")
    device: str = Field(DEFAULT_DEVICE, description="auto (CUDA when present), cpu or cuda[:N].")
    calib_general: str | None = Field(
        "default", description="General text mixed into calibration: 'default' = the general-English corpus shipped "
        "with lorakit (cut from its last documents), a .txt/.jsonl file, or none = the task data only.")
    calib_general_fraction: float = Field(
        0.5, ge=0, lt=1, description="Share of the calibration blocks taken from calib_general.")
    tune_steps: int = Field(
        0, ge=0, description="After rounding, tune each group's scale and the norm weights this many steps by "
        "distillation from the full-precision model on the calibration data (codes, zero points and layout "
        "unchanged: the file loads wherever it did); kept only if it lowers the KL on held-out blocks. 0 = off "
        "(a release's default is 100).")
    tune_lr: float = Field(5e-4, gt=0, description="Adam learning rate of scale tuning (on each scale's log); 2e-3 "
                           "raised the held-out KL on the release measured (docs/quantize.md).")
    tune_general_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of scale tuning's blocks taken from calib_general; 0 = the tasks' "
        "calibration data alone (measured to keep the tasks' answers where the rounding's mix did not: "
        "docs/quantize.md). The general text is then only watched: its KL before and after is recorded.")
    tune_tokens: Literal["answers", "all"] = Field(
        "all", description="Where scale tuning takes the KL: all = every position of its blocks; answers = only "
        "where the next token belongs to an example's answer (training's loss mask; its end included), the "
        "positions where a task's answer is decided. Data without answers (text) is tuned on every position, and "
        "lorakit_quant.json says so. On the default release, answers alone made the held-out KL worse and the tuning "
        "was dropped (docs/quantize.md).")
    tune_answer_weight: float = Field(
        1.0, ge=1, description="With tune_tokens all: each position where an answer token comes next counts this "
        "many times in scale tuning's KL, and the held-out check weighs it the same way; 1 = every position alike. "
        "Measured on the bundled release, it did not bring the answers closer than 1 does (docs/quantize.md).")
    tune_samples: int | None = Field(
        None, ge=2, description="Blocks of seq_len tokens scale tuning draws (every 8th held out to judge it), like "
        "the calibration's; null = n_samples. More blocks, fewer repeats of each in its steps: the step count, not "
        "the blocks, sets its time (docs/quantize.md).")
    target_degradation: float | None = Field(
        None, ge=0, description="Search instead of using the settings above as they are: the smallest configuration "
        "(group size, sym/asym, act-order, per-module precision), starting from the one above, whose perplexity is "
        "at most this fraction worse than the model's (e.g. 0.05). Every trial is recorded in lorakit_quant.json.")
    max_trials: int = Field(12, gt=0, description="Search bound: quantizations tried at most.")
    time_budget_s: Annotated[float, Cli(decls=("--time-budget",))] = Field(
        10800.0, gt=0, description="Search bound, seconds: no trial starts that would likely end past it.")

    @model_validator(mode="after")
    def _fraction_needs_text(self) -> QuantizeOptions:
        if self.calib_general is None and self.calib_general_fraction > 0 and \
                "calib_general_fraction" in self.model_fields_set:
            raise ValueError("calib_general_fraction needs general text: set calib_general (--calib-general default, "
                             "the shipped corpus) or leave the fraction out")
        return self

    def quantize_kwargs(self) -> dict:
        """The settings ``quantize_model`` takes (the search keys left out)."""
        return {k: v for k, v in self.given().items() if k not in SEARCH_KEYS}


def resolve_gptaq(method: str, gptaq_alpha: float | None) -> float:
    """The GPTAQ alpha a quantization runs with: a value given stays (AWQ with one above 0 is refused where it is
    used), ``None`` is the method's convention (:data:`GPTAQ_ALPHA` for GPTQ, 0 for AWQ)."""
    if gptaq_alpha is None:
        return GPTAQ_ALPHA if method == "gptq" else 0.0
    return float(gptaq_alpha)


def resolve_grid(method: str, sym: bool | None, desc_act: bool | None) -> tuple[bool, bool]:
    """``(sym, desc_act)`` as a quantization runs them: a value given stays (AWQ with act-order is refused where
    it is used), ``None`` is the method's convention (GPTQModel's symmetric grid, AWQ's zero point; act-order for
    GPTQ, where it is measured to keep answers, never for AWQ)."""
    return ((method == "gptq") if sym is None else bool(sym),
            (method == "gptq") if desc_act is None else bool(desc_act))


QUANTIZE = QuantizeOptions()
