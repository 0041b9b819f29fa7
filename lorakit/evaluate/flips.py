"""Answers that changed between two models on the same questions, and whether the change is more than noise.

Quantization moves a few answers near the edge each way. A drop in exact match counts only the net change, so a
2-point drop on 200 questions may be 4 answers lost and none gained (the quantization broke something) or 8 lost
and 4 gained (answers on the edge flipping both ways). McNemar's exact test tells them apart: if the quantized
model were as good as the merged one, each changed answer would be as likely lost as gained, so the number lost
follows Binomial(lost + gained, 1/2). The p-value is the chance of a split at least as lopsided as the one seen,
either way (two-sided, the textbook exact form). It is reported beside a drop; it does not replace the gate's
fixed bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Sequence


@dataclass(frozen=True)
class AnswerFlips:
    """``lost``: right before and wrong after; ``gained``: the reverse; ``p_value``: McNemar's exact two-sided test."""

    lost: int
    gained: int
    p_value: float

    def to_dict(self) -> dict[str, float | int]:
        return {"lost": self.lost, "gained": self.gained, "p_value": self.p_value}


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value of ``lost`` against ``gained`` discordant answers (1.0 when none changed)."""
    if lost < 0 or gained < 0:
        raise ValueError(f"answer counts must be >= 0, got lost={lost}, gained={gained}")
    n = lost + gained
    tail = sum(comb(n, k) for k in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2**n)


def answer_flips(before: Sequence[bool], after: Sequence[bool]) -> AnswerFlips:
    """The answers ``after`` lost and gained against ``before`` (right/wrong per question, same questions in the
    same order), with the p-value of that split."""
    if len(before) != len(after):
        raise ValueError(f"the two models answered different numbers of questions ({len(before)} and {len(after)})")
    lost = sum(bool(b) and not a for b, a in zip(before, after))
    gained = sum(bool(a) and not b for b, a in zip(before, after))
    return AnswerFlips(lost, gained, mcnemar_exact_p(lost, gained))


def describe_flips(changed: dict) -> str:
    """"8 answers lost and 4 gained (McNemar p 0.39)" from ``AnswerFlips.to_dict()`` (scorecards written before
    the p-value was recorded give the counts alone)."""
    text = f"{changed['lost']} answers lost and {changed['gained']} gained"
    return text if changed.get("p_value") is None else f"{text} (McNemar p {changed['p_value']:.2g})"
