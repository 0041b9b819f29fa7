"""The options of the scorecard stage, declared once (:mod:`lorakit.options`): ``lorakit scorecard`` and the run
config's ``scorecard:`` section are built from :class:`ScorecardOptions`."""

from __future__ import annotations

from pydantic import Field

from lorakit.options import StageOptions


class ScorecardOptions(StageOptions):
    """What the release scorecard scores (``lorakit.scorecard.build_scorecard``): every task, every model, val and
    test."""

    # 50: generating answers dominates the stage's time (5 models x 2 splits per task). Enough to show each model's
    # level in the table; not enough for a 2-point paired comparison, which reads judge_examples below (the release's
    # stage with both: bench/results/release_scorecard_bf16_steps120.json, release.scorecard_wall_s).
    max_examples: int | None = Field(50, gt=0, description="Score at most the first N examples of each task and "
                                     "split, for exact match and perplexity alike (none = all).")
    # At 50 questions one answer is 2 points, the whole of the gate's max_accuracy_drop; on the default release the
    # first 50 val answers passed a quantization that lost more than 2 points on all 200
    # (bench/results/accuracy_sample_size_g32.json); and one answer moves retention by ~2% of the gain, with a bar
    # at 0.9. What the gate judges gets the larger sample: every model's extra val answers, not the test split's.
    judge_examples: int | None = Field(None, gt=0, description="Every model answers the first N val examples of "
                                       "each task (none = all) for the gate's min_retention and max_accuracy_drop; "
                                       "the table's columns stay on the first max_examples.")


SCORECARD = ScorecardOptions()
