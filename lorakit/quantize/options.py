"""The options of the quantize stage, declared once: ``lorakit quantize``, the run config's ``quantize:`` section and
``lorakit.quantize.quantize_model`` take their defaults from :class:`QuantizeOptions` (:mod:`lorakit.options`).

The defaults are the measured release configuration of the embedded SmolLM2-135M release.

Why GPTQ 4-bit, group 32, with a zero point and act-order, calibrated on 3/4 general text: on the RegMean-merged
default release (bench/results/quantize_regmean.json, ``variants.*``; 50 questions per task and split, val and test)
it keeps the tasks' answers far better than AWQ at the same size (0.44x bf16): exact match lost against the merged
model, summed over both tasks' val and test splits, 12 points (``gptq-g32-asym-act-general75``) against AWQ group
32's 50 (``awq-g32-general50``), with mean KL per token on the tasks 0.034 / 0.024 against 0.075 / 0.049. It loses
a little more general English, +7.7% perplexity against +6.5%, and takes longer (GPTQModel: 2-4 minutes on a
2-core CPU, AWQ 1-2.5; ``quantize_s``). Half general text in the calibration cost more general English (+9.9%) for
about the same answers (10 points); 90% lost fewer answers (2 points) but more general English (+8.9%): at 50
questions a split one answer is 2 points, so the answers' ranking of these three is within noise and general text
decides. Group 128 does not divide SmolLM2's hidden size 576; group 64 lost more general English (AWQ: +15.4%,
``awq-general50``; GPTQ at group 64 in bench/results/calibration_mix.json). Group 16 (0.47x) is closer to the
merged model everywhere in KL, on general text 0.052 against 0.077 nats, yet still loses
+5.9% (bench/results/quantize_perlr.json: variants.gptq-g16-asym-act-general75.checks.general-text.degradation) of
general English and now +5.7% on reverse-words' perplexity (``...checks.reverse-words.degradation``), past the gate's
5% where group 32 is +3.3%: it buys no check, for 8 MB more.

No uniform 4-bit configuration measured meets the gate's 5% on general text, so the default release is rejected by
its own gate on that check; the gate says so rather than the default hiding it. Keeping the 12 most sensitive
linears at 8 bits on top (``gptq-g32-asym-act-general75-keep12``, 0.46x) comes closest (+6.5%, 2 points lost on
number-words val, none elsewhere), but a GPTQ file with per-module bits is read by GPTQModel and vLLM, not by plain
``transformers`` (:mod:`lorakit.quantize.mixed`), so it is not the default. AWQ at 8 bits passes every check
(``awq-8bit-general50`` in bench/results/calibration_mix.json: -0.02% on general text) at 0.63x the bf16 size, over
the 0.5x a 4-bit release is for: set ``method: awq, bits: 8`` to ship that trade. For other data or models, set
``target_degradation`` and let the search measure (``lorakit.quantize.search.quantize_to_target``).
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

# The keys of QuantizeOptions that only the search reads (lorakit.quantize.search.quantize_to_target).
SEARCH_KEYS = ("target_degradation", "max_trials", "time_budget_s")


class QuantizeOptions(StageOptions):
    """GPTQ or AWQ 4/8-bit post-training quantization of a full-precision model."""

    method: Literal["gptq", "awq"] = Field(
        "gptq", description="gptq: GPTQModel's GPTQ (Hessian-based rounding). awq: lorakit's activation-aware scaling.")
    bits: Literal[4, 8] = Field(4, description="Weight bits.")
    group_size: int = Field(
        32, description="Input channels sharing one scale/zero (16..1024, power of two). If it does not divide every "
        "layer's input size, the largest valid one below it is used (128 does not divide SmolLM2's 576).")
    sym: Annotated[bool | None, Cli(decls=("--sym/--asym",))] = Field(
        False, description="Symmetric grid (no zero point) or asymmetric with a zero point (the default, for both "
        "methods); none = each method's convention: --sym for gptq, --asym for awq.")
    desc_act: Annotated[bool | None, Cli(decls=("--desc-act/--no-desc-act",))] = Field(
        None, description="GPTQ act-order: quantize columns by decreasing activation size; none = on for gptq, off "
        "for awq (which has no act-order).")
    awq_scale_form: Literal["duo", "activation", "both"] = Field(
        "duo", description="awq: the scale form on the α grid: duo = x̄^α/w̄^(1−α) (AutoAWQ's default), activation = "
        "x̄^α (the paper's), both = let the output error pick per group (twice the search time). Which is better "
        "depends on the group size (bench/README.md, quantize).")
    n_samples: int | None = Field(
        None, gt=0, description="Calibration sequences; none = 64, or every one the data gives when fewer (at "
        "least 16; a warning says so and lorakit_quant.json records it). A number the data cannot fill is an error.")
    seq_len: int = Field(256, gt=0, description="Tokens per calibration sequence (64 x 256 is what the small bundled "
                         "tasks fill; 128 x 512 needs 65k calibration tokens).")
    seed: int = Field(0, description="Seed of the calibration text shuffle.")
    device: str = Field(DEFAULT_DEVICE, description="auto (CUDA when present), cpu or cuda[:N].")
    calib_general: str | None = Field(
        "default", description="General text mixed into calibration: 'default' = the general-English corpus shipped "
        "with lorakit (cut from its last documents), a .txt/.jsonl file, or none = the task data only.")
    calib_general_fraction: float = Field(
        0.75, ge=0, lt=1, description="Share of the calibration blocks taken from calib_general.")
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


def resolve_grid(method: str, sym: bool | None, desc_act: bool | None) -> tuple[bool, bool]:
    """``(sym, desc_act)`` as a quantization runs them: a value given stays (AWQ with act-order is refused where
    it is used), ``None`` is the method's convention (GPTQModel's symmetric grid, AWQ's zero point; act-order for
    GPTQ, where it is measured to keep answers, never for AWQ)."""
    return ((method == "gptq") if sym is None else bool(sym),
            (method == "gptq") if desc_act is None else bool(desc_act))


QUANTIZE = QuantizeOptions()
