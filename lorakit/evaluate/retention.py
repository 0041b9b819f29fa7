"""Retention: how much of an adapter's gain over the base a merged model keeps on that adapter's own task.

    retention = (score_merged - score_base) / (score_adapter - score_base)

for a score where higher is better (accuracy); for a loss (NLL, log-perplexity) the signs flip, which is the same
formula on ``-loss``. 1.0 means the merge kept the whole gain, 0 means it kept none, above 1 means the merge did
better than the adapter alone. One definition shared by the release scorecard, the gate's ``min_retention`` check
and the merge-weight search, so the three can never disagree about what "kept" means.

An adapter whose gain is not above ``min_gain`` did not learn its task: retention is undefined there (the ratio
would divide by ~0 or flip sign), and callers must report the training problem instead of a number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Retention:
    """One task's retention and the three scores it came from (``value`` is None when the adapter did not learn)."""

    base: float
    adapter: float
    merged: float
    higher_is_better: bool
    gain: float               # adapter over base, in the "higher is better" direction
    value: float | None

    @property
    def learned(self) -> bool:
        return self.value is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retention(base: float, adapter: float, merged: float, *, higher_is_better: bool,
              min_gain: float = 0.0) -> Retention:
    """Retention of ``merged`` relative to ``adapter``'s gain over ``base``.

    ``higher_is_better`` is True for accuracy, False for NLL. ``min_gain`` is the smallest gain (in the score's own
    units, positive) that counts as learning: an accuracy gain of 0 or an NLL that did not drop gives ``value``
    None. Non-finite scores are refused, because a NaN would otherwise pass any ``>=`` threshold as False silently.
    """
    for name, x in (("base", base), ("adapter", adapter), ("merged", merged)):
        if not math.isfinite(x):
            raise ValueError(f"retention needs finite scores; {name} is {x}")
    sign = 1.0 if higher_is_better else -1.0
    gain = sign * (adapter - base)
    value = sign * (merged - base) / gain if gain > min_gain else None
    return Retention(base=base, adapter=adapter, merged=merged, higher_is_better=higher_is_better, gain=gain,
                     value=value)
