"""The release scorecard: does the release still do every task? Task accuracy and perplexity of the base, each
task's adapter, the merged and the quantized model; retention and quantized accuracy drop; the gate's checks.

Importing the package is light (the judge and its defaults, which the CLI and the run config read); the scoring
code, which needs torch, loads on first use of one of its names.
"""

from typing import Any

from lorakit.scorecard.judge import (
    DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_RETENTION, JUDGED_SPLIT, ScorecardCheck, failure_line, judge_scorecard,
)

_CORE = ("PREDICTIONS_JSON", "SCORECARD_JSON", "SCORECARD_MD", "SCORECARD_PNG", "Scorecard", "ScorecardTask",
         "build_scorecard", "read_scorecard", "write_scorecard")

__all__ = [*_CORE, "DEFAULT_MAX_ACCURACY_DROP", "DEFAULT_MIN_RETENTION", "JUDGED_SPLIT", "ScorecardCheck",
           "failure_line", "judge_scorecard"]


def __getattr__(name: str) -> Any:
    if name in _CORE:
        from lorakit.scorecard import core

        return getattr(core, name)
    raise AttributeError(f"module 'lorakit.scorecard' has no attribute {name!r}")
