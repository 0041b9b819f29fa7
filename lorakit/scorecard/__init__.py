"""The release scorecard: does the release still do every task? Task accuracy and perplexity of the base, each
task's adapter, the merged and the quantized model; retention and quantized accuracy drop; the gate's checks."""

from lorakit.scorecard.core import (
    PREDICTIONS_JSON, SCORECARD_JSON, SCORECARD_MD, SCORECARD_PNG, Scorecard, ScorecardTask, build_scorecard,
    read_scorecard, write_scorecard,
)
from lorakit.scorecard.judge import (
    DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_RETENTION, JUDGED_SPLIT, ScorecardCheck, failure_line, judge_scorecard,
)

__all__ = [
    "PREDICTIONS_JSON", "SCORECARD_JSON", "SCORECARD_MD", "SCORECARD_PNG", "Scorecard", "ScorecardTask",
    "build_scorecard", "read_scorecard", "write_scorecard",
    "DEFAULT_MAX_ACCURACY_DROP", "DEFAULT_MIN_RETENTION", "JUDGED_SPLIT", "ScorecardCheck", "failure_line",
    "judge_scorecard",
]
