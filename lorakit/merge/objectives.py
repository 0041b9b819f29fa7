"""What a merge-weight search maximises: the worst task's retention of one score (:mod:`lorakit.merge.search`).

Declared here, apart from the search's torch code, so the CLI and the run config read the choices and the
default from one place without loading a model stack.
"""

from __future__ import annotations

DEFAULT_OBJECTIVE = "nll"
# objective -> (the trial's score key, higher is better, what the record says the objective is)
OBJECTIVES: dict[str, tuple[str, bool, str]] = {
    "nll": ("nll", False, "worst task's retention of val NLL: min over tasks of (nll_base - nll_merged) / "
                          "(nll_base - nll_adapter), lorakit.evaluate.retention with higher_is_better=False"),
    "accuracy": ("exact_match", True, "worst task's retention of val exact match (greedy answers, "
                                      "lorakit.evaluate.accuracy): min over tasks of (em_merged - em_base) / "
                                      "(em_adapter - em_base), lorakit.evaluate.retention with higher_is_better=True"),
}
