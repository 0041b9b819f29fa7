"""The options of the scorecard stage, declared once (:mod:`lorakit.options`): ``lorakit scorecard`` and the run
config's ``scorecard:`` section are built from :class:`ScorecardOptions`."""

from __future__ import annotations

from pydantic import Field

from lorakit.options import StageOptions


class ScorecardOptions(StageOptions):
    """What the release scorecard scores (``lorakit.scorecard.build_scorecard``): every task, every model, val and
    test."""

    # 50: generating answers dominates the stage's time (5 models x 2 splits per task); 50 questions per split
    # still resolve 2-point accuracy steps (the release's stage: bench/results/release_scorecard.json,
    # release.scorecard_wall_s).
    max_examples: int | None = Field(50, gt=0, description="Score at most the first N examples of each task and "
                                     "split, for exact match and perplexity alike (none = all).")


SCORECARD = ScorecardOptions()
