"""Answers that changed between two models on the same questions, and whether the change is more than noise.

Quantization moves a few answers near the edge each way. A drop in exact match counts only the net change, so a
2-point drop on 200 questions may be 4 answers lost and none gained (the quantization broke something) or 8 lost
and 4 gained (answers on the edge flipping both ways). McNemar's exact test tells them apart: if the quantized
model were as good as the merged one, each changed answer would be as likely lost as gained, so the number lost
follows Binomial(lost + gained, 1/2). The p-value is the chance of a split at least as lopsided as the one seen,
either way (two-sided, the textbook exact form). It is reported beside a drop; it does not replace the gate's
fixed bar.

Beside it, the drop's 95% interval says how precisely the split measured the drop at all. On 200 questions it
spans about 2 points each side of the drop whenever a handful of answers changed, so a 2.5-point drop there and a
0.5-point one can come from the same quantized model: the default release's six roundings of one merged model
dropped from -0.1 to 1.4 reverse-words points on 2,000 fresh questions each, and the roll at 0.85 there had dropped
2.5 on its 200 test questions (bench/results/quantize_spread_bf16_rw360_seed2_fresh2000.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb, sqrt
from typing import Sequence

Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class AnswerFlips:
    """``lost``: right before and wrong after; ``gained``: the reverse; ``p_value``: McNemar's exact two-sided test;
    ``questions``: how many were asked (the drop's interval needs it)."""

    lost: int
    gained: int
    p_value: float
    questions: int | None = None

    def to_dict(self) -> dict:
        out: dict = {"lost": self.lost, "gained": self.gained, "p_value": self.p_value}
        if self.questions:
            out.update(questions=self.questions, drop_ci95=list(drop_interval(self.lost, self.gained, self.questions)))
        return out


def drop_interval(lost: int, gained: int, questions: int) -> tuple[float, float]:
    """95% interval of the paired drop in exact match, (lost - gained) / questions: the normal approximation to the
    mean of the per-question differences (+1 lost, -1 gained, 0 unchanged)."""
    if questions <= 0 or lost < 0 or gained < 0 or lost + gained > questions:
        raise ValueError(f"need 0 <= lost + gained <= questions, got lost={lost}, gained={gained}, "
                         f"questions={questions}")
    mean = (lost - gained) / questions
    half = Z95 * sqrt(max((lost + gained) / questions - mean * mean, 0.0) / questions)
    return mean - half, mean + half


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
    return AnswerFlips(lost, gained, mcnemar_exact_p(lost, gained), len(before))


def describe_flips(changed: dict) -> str:
    """"8 answers lost and 4 gained (McNemar p 0.39; the drop's 95% interval -1.4 to +5.4 points)" (of 200 questions)
    from ``AnswerFlips.to_dict()`` (scorecards written before the p-value or the interval was recorded give less)."""
    text = f"{changed['lost']} answers lost and {changed['gained']} gained"
    notes = [] if changed.get("p_value") is None else [f"McNemar p {changed['p_value']:.2g}"]
    if changed.get("drop_ci95"):
        lo, hi = changed["drop_ci95"]
        notes.append(f"the drop's 95% interval {100 * lo:+.1f} to {100 * hi:+.1f} points")
    return f"{text} ({'; '.join(notes)})" if notes else text
