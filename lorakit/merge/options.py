"""The options of the merge stage, declared once: ``lorakit merge``, the run config's ``merge:`` section and
the library's defaults come from :class:`MergeOptions` and :class:`MergeSearchOptions` (:mod:`lorakit.options`).

Light on purpose (no torch): the run config and the CLI read the method names from here;
:mod:`lorakit.merge.registry`, which owns the methods, checks at import that its static list is this one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, FiniteFloat

from lorakit.merge.objectives import DEFAULT_OBJECTIVE, OBJECTIVE_CHOICES
from lorakit.options import Cli, StageOptions
from lorakit.scorecard.options import SCORECARD

METHOD_NAMES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "regmean")
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]


def default_weights(n: int) -> list[float]:
    """1.0 per adapter: a 1/n merge scales each task's update by 1/n and kept about half of each adapter's val
    gain on the 400-example bundled tasks' adapters, 1.0 each over 80% (bench/results/merge_search.json,
    ``variants.*.val.worst_retention``); disjoint skills add (task arithmetic). On the current (2,000-example)
    adapters neither fixed choice keeps half of the weaker task's exact match and the accuracy search does better
    (bench/results/merge_search_accuracy.json, ``variants``; docs/merge.md)."""
    return [1.0] * n


class MergeOptions(StageOptions):
    """How LoRA adapters are combined into one update: ΔW = method(w₁·ΔW₁, …), ΔWᵢ = scalingᵢ·BᵢAᵢ."""

    method: MethodName = Field("linear", description="How updates are combined; every method works on the full "
                               "updates ΔWᵢ = scalingᵢ·BᵢAᵢ.")
    # Finite: a `.nan` weight in YAML would otherwise pass and fail only in the merge, after every adapter trained.
    weights: Annotated[list[FiniteFloat] | None, Cli(decls=("-w", "--weights"))] = Field(
        None, description="One weight per adapter (dataset), in order; none = 1.0 each (task arithmetic: every "
        "adapter's full update). Any finite value; they need not sum to 1, and a negative weight subtracts a task.")
    density: float | None = Field(None, gt=0, le=1, description="ties/dare_*/magnitude_prune: fraction of each "
                                  "update's entries kept.")
    seed: int | None = Field(None, description="dare_*: seed of the random drop masks (none = 0; deterministic).")
    normalize: bool | None = Field(None, description="ties/dare_ties: divide by the sum of agreeing weights.")
    regmean_alpha: float | None = Field(None, ge=0, le=1, description="regmean: scale of the Gram matrices' "
                                        "off-diagonal (none = 0.9, the paper's; 1 = plain least squares).")
    regmean_examples: int | None = Field(None, gt=0, description="regmean: training examples of each task whose "
                                         "layer inputs the merge keeps (none = 128).")
    regmean_anchor: float | None = Field(None, ge=0, allow_inf_nan=False, description="regmean: weight of a "
                                         "general-text anchor: the base's own layer outputs on lorakit's general "
                                         "corpus (never the documents the gate scores) join the fit as one more task "
                                         "with no update, so the merge keeps the base where general text reads the "
                                         "layers; 1 = as much as one task; none = 0 (off).")
    loftq_base: Literal["dequantized", "original"] | None = Field(
        None, description="LoftQ adapters (train init loftq) belong to the NF4-quantized base: dequantized merges "
        "into dequant(NF4(W)), exactly the model that was trained; original adds them to W anyway.")


class MergeSearchOptions(StageOptions):
    """Merge weights chosen by measurement (:mod:`lorakit.merge.search`): maximise the worst task's retention on
    the val splits (of NLL, or of greedy exact match with objective accuracy)."""

    methods: list[MethodName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["linear"], min_length=1, description="Methods searched (the trial budget is split "
        "between them).")
    objective: Literal[OBJECTIVE_CHOICES] = Field(  # type: ignore[valid-type]
        DEFAULT_OBJECTIVE, description="The score retention is measured on: nll (val NLL, cheap), accuracy (greedy "
        "exact match on the val examples: what the release promises, generation per trial; instruction or chat "
        "data), or auto: accuracy when every task's data has answers, else nll.")
    # 12: on the default release's adapters 12 accuracy trials of ~15 s each raised the worst task's val retention
    # from 0.44 (1/n) to 0.70 (bench/results/merge_search_accuracy.json: n_trials, trial_s_median,
    # variants.uniform.val.worst_retention, variants.searched.val.worst_retention)
    max_trials: int = Field(12, gt=0, description="Merges evaluated at most (the uniform 1/n baseline is the first).")
    time_budget_s: Annotated[float, Cli(decls=("--time-budget",))] = Field(
        3600.0, gt=0, description="Seconds; no trial starts after it.")
    target_retention: float | None = Field(None, description="Say whether the best worst-task retention reaches "
                                           "this (the best trial is written either way).")
    max_tokens: int | None = Field(None, gt=0, description="Score at most this many tokens of each split.")
    # the scorecard's default: in a release the search then scores the val examples the gate's retention check judges
    max_examples: int | None = Field(SCORECARD.max_examples, gt=0, description="Score the first N examples of each "
                                     "task's val and test split, with either objective (none = all).")


MERGE = MergeOptions()
MERGE_SEARCH = MergeSearchOptions()
