"""Scoring a generated answer against the reference: exact match after normalisation, and token-level F1.

Exact match is the strict number (a task is solved or not); token F1 gives partial credit to free-form answers
(the SQuAD definition: precision and recall of the multiset of normalised words). Both use the same
normalisation, which is recorded with every result because it changes the numbers:

- always: surrounding whitespace stripped and every whitespace run collapsed to one space;
- ``case_insensitive``: compared in lower case (``str.casefold``);
- ``strip_punctuation``: Unicode punctuation characters removed (categories P*), then whitespace collapsed again.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Normalization:
    case_insensitive: bool = False
    strip_punctuation: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "whitespace": "stripped and collapsed to single spaces"}


def normalize(text: str, norm: Normalization = Normalization()) -> str:
    if norm.case_insensitive:
        text = text.casefold()
    if norm.strip_punctuation:
        text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str, norm: Normalization = Normalization()) -> bool:
    return normalize(prediction, norm) == normalize(reference, norm)


def token_f1(prediction: str, reference: str, norm: Normalization = Normalization()) -> float:
    """Harmonic mean of word precision and recall (multiset overlap); 1.0 when both are empty, 0.0 when one is."""
    pred, ref = normalize(prediction, norm).split(), normalize(reference, norm).split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
