"""The contract between data prep and the stages that read its splits (training, calibration, evaluation).

A prepared-data folder holds, besides the tokenized dataset, the rendered text of every example of each split
(``train.texts.jsonl`` / ``val.texts.jsonl`` / ``test.texts.jsonl``, one ``{"text": ...}`` per line, in split
order; instruction and chat examples also carry ``prompt_end``, the character offset where the answer starts, and
``reference``, the answer itself). Perplexity and quantization calibration read text, not token ids, because they
must tokenize with the model under test (and refuse a tokenizer that differs from the baseline's), not with
whatever tokenizer prep used.

Who reads which split: training and calibration read ``train``; the gate and any search read ``val``; the final
scorecard reports ``test``, which nothing else has seen. Folders made before the test split existed (or with
``--test-fraction 0``) have none: :func:`pick_report_split` then falls back to ``val`` and says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.errors import InputError

PREP_META = "prep.json"
SPLITS = ("train", "val", "test")


def split_texts_path(prep_dir: str | os.PathLike[str], split: str) -> Path:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return Path(prep_dir) / f"{split}.texts.jsonl"


def has_split(prep_dir: str | os.PathLike[str], split: str) -> bool:
    """Whether the folder holds a non-empty ``split`` (its texts file exists and has at least one example)."""
    path = split_texts_path(prep_dir, split)
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as fh:
        return any(line.strip() for line in fh)


def pick_report_split(prep_dir: str | os.PathLike[str], preferred: str = "test") -> tuple[str, str | None]:
    """(split, note): the split a final report should use, and a note when it is not ``preferred``.

    The test split is the only one neither training, calibration nor the gate has seen; a folder without one
    (made before lorakit wrote it, or with ``--test-fraction 0``) is reported on ``val`` instead, and the note
    says so, so that a report never presents a number measured on gate data as a held-out one.
    """
    if not (Path(prep_dir) / PREP_META).exists():
        raise InputError(f"{prep_dir} is not a prepared-data folder (no {PREP_META}); create one with `lorakit prep`")
    if has_split(prep_dir, preferred):
        return preferred, None
    if preferred == "test" and has_split(prep_dir, "val"):
        return "val", (f"{prep_dir} has no test split (made before lorakit wrote one, or with --test-fraction 0); "
                       "reporting the val split, which the gate also uses — re-run `lorakit prep` for a held-out test")
    raise InputError(f"{prep_dir} has no non-empty {preferred} split; re-run `lorakit prep` with a "
                     f"--{preferred}-fraction above 0")


def read_records(prep_dir: str | os.PathLike[str], split: str) -> list[dict]:
    """The JSON objects of one split's texts file (``text`` and, for instruction/chat, ``prompt_end`` + ``reference``)."""
    path = split_texts_path(prep_dir, split)
    if not (Path(prep_dir) / PREP_META).exists():
        raise InputError(f"{prep_dir} is not a prepared-data folder (no {PREP_META}); create one with `lorakit prep`")
    out: list[dict] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec.get("text"), str):
                        raise TypeError
                except (json.JSONDecodeError, AttributeError, TypeError):
                    raise InputError(f"{path}:{lineno} is not a JSON object with a 'text' field; the folder is corrupt") from None
                out.append(rec)
    except FileNotFoundError:
        raise InputError(f"{path} is missing; re-create the prepared-data folder with `lorakit prep`") from None
    return out


def read_texts(prep_dir: str | os.PathLike[str], split: str = "val") -> list[str]:
    """The rendered texts of one split of a prepared-data folder, in order."""
    texts = [rec["text"] for rec in read_records(prep_dir, split)]
    if not texts:
        raise InputError(f"{split_texts_path(prep_dir, split)} holds no examples; the {split} split is empty")
    return texts
