"""What a merge-weight search maximises: the worst task's retention of one score (:mod:`lorakit.merge.search`).

Declared here, apart from the search's torch code, so the CLI and the run config read the choices and the
default from one place without loading a model stack.
"""

from __future__ import annotations

from collections.abc import Sequence

# objective -> (the trial's score key, higher is better, what the record says the objective is)
OBJECTIVES: dict[str, tuple[str, bool, str]] = {
    "nll": ("nll", False, "worst task's retention of val NLL: min over tasks of (nll_base - nll_merged) / "
                          "(nll_base - nll_adapter), lorakit.evaluate.retention with higher_is_better=False"),
    "accuracy": ("exact_match", True, "worst task's retention of val exact match (greedy answers, "
                                      "lorakit.evaluate.accuracy): min over tasks of (em_merged - em_base) / "
                                      "(em_adapter - em_base), lorakit.evaluate.retention with higher_is_better=True"),
}
AUTO = "auto"
OBJECTIVE_CHOICES = (AUTO, *OBJECTIVES)
# auto, because exact match is what a release promises (its gate checks retention of exact match), and NLL can
# point the other way: the bundled number-words adapter raises whole-text val NLL over the base's while its exact
# match rises from none (bench/results/merge_search_accuracy.json: nll_gain.number-words.lowers_nll,
# test_denominators). NLL remains for data without answers.
DEFAULT_OBJECTIVE = AUTO
ANSWER_FORMATS = ("instruction", "chat")  # prepared formats that carry reference answers


def resolve_objective(objective: str, formats: Sequence[str]) -> tuple[str, str | None]:
    """The objective a search runs, given each task's prepared format, and why when ``auto`` chose it.

    ``auto`` = accuracy when every task has reference answers (instruction or chat data), else nll: one task
    without answers (``text``) cannot be scored by exact match, and the worst-task objective needs every task."""
    if objective != AUTO:
        return objective, None
    plain = [f for f in formats if f not in ANSWER_FORMATS]
    if plain:
        return "nll", f"auto: nll, because some data has no reference answers (format {plain[0]})"
    return "accuracy", "auto: accuracy, because every task's data has reference answers"
