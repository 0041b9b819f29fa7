"""The options of the scorecard stage, declared once (:mod:`lorakit.options`): ``lorakit scorecard`` and the run
config's ``scorecard:`` section are built from :class:`ScorecardOptions`."""

from __future__ import annotations

from pydantic import Field

from lorakit.options import StageOptions


class ScorecardOptions(StageOptions):
    """What the release scorecard scores (``lorakit.scorecard.build_scorecard``): every task, every model, val and
    test."""

    max_examples: int | None = Field(None, gt=0, description="Score at most the first N examples of each task and "
                                     "split, for exact match and perplexity alike (none = all).")
