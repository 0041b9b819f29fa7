"""The general-text check: does the candidate keep ordinary language, outside every task?

A task's validation split is short templated answers; a quantization (or a merge) can keep those while losing
general English, which the task checks cannot see. This check measures perplexity, candidate vs baseline, on
text from outside every task: by default the general-English corpus shipped with lorakit
(:mod:`lorakit.data.general`), capped at its first :data:`DEFAULT_GENERAL_MAX_TOKENS` tokens so that every release
gate pays for the check a fixed, small cost whatever the corpus. Calibration takes its general text from the
corpus's *last* documents (:func:`lorakit.quantize.calibration.general_calibration_texts`), so the text the gate
scores never shaped the quantized weights.

The check's defaults are declared once in :class:`lorakit.gate.options.GateOptions`; the ``gate:`` section of the
run config and ``lorakit gate`` are built from it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import InputError
from lorakit.gate.options import GATE, GENERAL_DEFAULT
from lorakit.gate.verdict import CheckSpec

GENERAL_CHECK_NAME = "general text"
GENERAL_OFF = "none"  # the CLI's way to turn the check off (the config says null)
DEFAULT_GENERAL_MAX_DEGRADATION = GATE.general_max_degradation
DEFAULT_GENERAL_MAX_TOKENS = GATE.general_max_tokens


def resolve_general_text(source: str | os.PathLike[str] | None) -> str | None:
    """The path the check reads: ``"default"`` is the shipped corpus; ``None``/``"none"`` turn the check off.

    A path that does not exist is an :class:`InputError` now, not after hours of training.
    """
    if source is None or str(source).strip().lower() == GENERAL_OFF:
        return None
    if str(source) == GENERAL_DEFAULT:
        from lorakit.data.general import general_text_path

        return str(general_text_path())
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"general text {path} does not exist; pass a .txt/.jsonl file or a prepared-data folder, "
                         f"\"{GENERAL_DEFAULT}\" for the corpus shipped with lorakit, or \"{GENERAL_OFF}\"/null to "
                         "turn the check off")
    return str(path)


def general_check(source: str | os.PathLike[str] | None,
                  max_degradation: float = DEFAULT_GENERAL_MAX_DEGRADATION,
                  max_tokens: int | None = DEFAULT_GENERAL_MAX_TOKENS, split: str = "val") -> CheckSpec | None:
    """The gate's general-text check, or None when it is off. ``split`` applies only to a prepared-data folder."""
    path = resolve_general_text(source)
    if path is None:
        return None
    return CheckSpec(GENERAL_CHECK_NAME, path, max_degradation, "general", split, max_tokens=max_tokens)


__all__ = ["DEFAULT_GENERAL_MAX_DEGRADATION", "DEFAULT_GENERAL_MAX_TOKENS", "GENERAL_CHECK_NAME", "GENERAL_DEFAULT",
           "GENERAL_OFF", "general_check", "resolve_general_text"]
