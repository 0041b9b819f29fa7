"""The gate's scorecard checks: ``min_retention``, ``max_accuracy_drop`` and ``max_general_forgetting``, on val.

- ``min_retention``: for every task, the merged model keeps at least this share of its adapter's gain over the
  base (``lorakit.evaluate.retention``, on exact match; on NLL for ``text`` data, which has no answers). An
  adapter with no gain fails with "the adapter for TASK did not learn it": retention is undefined there, and
  the fix is training, not merging.
- ``max_accuracy_drop``: for every task, exact match of the quantized model is at most this much (absolute)
  below the merged model's. The line gives the drop's 95% interval; a failure whose interval reaches inside the
  bar says the split is too small to tell (200 questions measure a drop to about 2 points either way), and how to
  measure closer. The verdict stays the fixed bar's.
- ``max_general_forgetting``: the merged model's perplexity on the general text is at most this fraction above the
  base's (``general_text.vs_base.merged``), once per release, when the scorecard scored general text: training and
  merging can cost the model its language while every task check and every quantized-vs-merged check passes.

The first two are judged on the scorecard's larger sample (``judged``: ``scorecard.judge_examples``, by default
every val example) when it has one, else on the table's examples (older scorecards; ``text`` data, on NLL).

The gate judges the **val** split only: it is the selection split (searches and the perplexity gate read it too),
so the test split stays an honest, held-out report. Each threshold may be None (reported, not judged).
Defaults are declared once in :class:`lorakit.gate.options.GateOptions`, as the run config and ``lorakit gate`` read them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lorakit.errors import InputError
from lorakit.evaluate.flips import describe_flips
from lorakit.gate.options import GATE

DEFAULT_MIN_RETENTION = GATE.min_retention
DEFAULT_MAX_ACCURACY_DROP = GATE.max_accuracy_drop
DEFAULT_MAX_GENERAL_FORGETTING = GATE.max_general_forgetting
GENERAL_TASK = "general text"  # the task name of the one release-wide check
JUDGED_SPLIT = "val"
# A score exactly at a threshold passes; float noise below this counts as the boundary (as the gate's BOUNDARY).
TOLERANCE = 1e-12


@dataclass
class ScorecardCheck:
    """One judged number of one task: which check, its value, threshold, result, and a one-line reason."""

    check: str  # "min_retention" | "max_accuracy_drop" | "max_general_forgetting"
    task: str  # a task, or GENERAL_TASK
    metric: str  # "exact_match" | "nll" | "ppl"
    value: float | None  # None: the adapter did not learn (retention undefined)
    threshold: float
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_threshold(value: float | None, name: str) -> float | None:
    """A threshold is None (report only) or a finite number ≥ 0; anything else is bad input."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} ({value!r}) is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{name} is {value}; pass a finite number ≥ 0 (e.g. 0.9 for min retention, 0.02 for a "
                         "2-point accuracy drop)")
    return value


def judge_scorecard(scorecard: dict[str, Any], *, min_retention: float | None = DEFAULT_MIN_RETENTION,
                    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
                    max_general_forgetting: float | None = DEFAULT_MAX_GENERAL_FORGETTING) -> list[ScorecardCheck]:
    """Every scorecard check of every task on the val split, in task order, then the general-text check (see
    module docstring)."""
    min_retention = check_threshold(min_retention, "min_retention")
    max_accuracy_drop = check_threshold(max_accuracy_drop, "max_accuracy_drop")
    max_general_forgetting = check_threshold(max_general_forgetting, "max_general_forgetting")
    out: list[ScorecardCheck] = []
    for task in task_names(scorecard):
        split = scorecard["tasks"][task]["splits"].get(JUDGED_SPLIT)
        if split is None:
            raise InputError(f"the scorecard has no {JUDGED_SPLIT} split for {task}; rebuild it with "
                             "`lorakit scorecard` (the gate judges val)")
        accuracy = split["accuracy_skipped"] is None
        metric = "exact_match" if accuracy else "nll"
        # the larger sample when the scorecard has one (scorecard.judge_examples), else the table's examples
        sample = split.get("judged") or {}
        if min_retention is not None:
            judged_retention = accuracy and "retention" in sample  # older scorecards judged the table only
            out.append(_retention_check(task, sample["retention"] if judged_retention else split["retention"][metric],
                                        metric, min_retention,
                                        sample["n_examples"] if judged_retention else split.get("n_examples")))
        if max_accuracy_drop is not None and accuracy and split.get("accuracy_drop") is not None:
            judged = sample if "accuracy_drop" in sample else {
                "n_examples": split.get("n_examples"), "accuracy_drop": split["accuracy_drop"],
                "merged": split["models"]["merged"]["exact_match"],
                "quantized": split["models"]["quantized"]["exact_match"]}
            drop = float(judged["accuracy_drop"])
            ok = drop <= max_accuracy_drop + TOLERANCE
            n = f", {judged['n_examples']} questions" if judged.get("n_examples") else ""
            changed = judged.get("answers_changed")
            flips = f", {describe_flips(changed)}" if changed else ""
            interval = (changed or {}).get("drop_ci95")
            unresolved = not ok and interval is not None and interval[0] <= max_accuracy_drop
            advice = ("; the interval reaches inside the bar, so this split cannot tell the release from one within "
                      "it: a larger val split (`lorakit prep --val-fraction`) measures the drop closer")
            out.append(ScorecardCheck(
                "max_accuracy_drop", task, metric, drop, max_accuracy_drop, ok,
                f"exact match on {task} ({JUDGED_SPLIT}{n}): merged {judged['merged']:.1%}, "
                f"quantized {judged['quantized']:.1%}: drop {drop * 100:+.1f} points{flips} "
                f"({'<=' if ok else '>'} {max_accuracy_drop * 100:.1f})" + (advice if unresolved else "")))
    general = scorecard.get("general_text") or {}
    loss = (general.get("vs_base") or {}).get("merged")
    if max_general_forgetting is not None and loss is not None:
        ppl = general["models"]
        ok = loss <= max_general_forgetting + TOLERANCE
        out.append(ScorecardCheck(
            "max_general_forgetting", GENERAL_TASK, "ppl", float(loss), max_general_forgetting, ok,
            f"perplexity on general text: base {ppl['base']['ppl']:.4g}, merged {ppl['merged']['ppl']:.4g}: "
            f"{loss:+.1%} ({'<=' if ok else '>'} {max_general_forgetting:.0%})"
            + ("" if ok else "; the merge or the adapters lost language: train more gently (fewer steps, lower lr) "
               "or merge differently")))
    return out


def task_names(scorecard: dict[str, Any]) -> list[str]:
    """The tasks in the order they were given (scorecard.json's keys are sorted on disk)."""
    return list(scorecard.get("task_order") or scorecard["tasks"])


def split_names(entry: dict[str, Any]) -> list[str]:
    """A task's scored splits, val first."""
    return sorted(entry["splits"], key=lambda s: (s != JUDGED_SPLIT, s))


def _retention_check(task: str, r: dict[str, Any], metric: str, threshold: float,
                     n_examples: int | None = None) -> ScorecardCheck:
    what = "exact match" if metric == "exact_match" else "NLL"
    fmt = (lambda x: f"{x:.1%}") if metric == "exact_match" else (lambda x: f"{x:.4f}")
    n = f", {n_examples} questions" if n_examples and metric == "exact_match" else ""
    scores = (f"{what} on {JUDGED_SPLIT}{n}: base {fmt(r['base'])}, adapter {fmt(r['adapter'])}, "
              f"merged {fmt(r['merged'])}")
    if r["value"] is None:
        return ScorecardCheck("min_retention", task, metric, None, threshold, False,
                              f"the adapter for {task} did not learn it ({scores}); train it longer or on "
                              "better data before merging")
    ok = r["value"] >= threshold - TOLERANCE
    return ScorecardCheck("min_retention", task, metric, float(r["value"]), threshold, ok,
                          f"the merged model keeps {r['value']:.1%} of the {task} adapter's gain "
                          f"({'>=' if ok else '<'} {threshold:.0%}; {scores})")


def failure_line(checks: list[ScorecardCheck]) -> str | None:
    """The first failed check as one line naming check and task, or None when all passed."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return None
    c = failed[0]
    more = f" (+{len(failed) - 1} more failed)" if len(failed) > 1 else ""
    return f"{c.check} failed on {c.task}: {c.message}{more}"
