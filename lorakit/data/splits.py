"""The contract between data prep and the stages that read its splits (training, calibration, evaluation).

A prepared-data folder holds, besides the tokenized dataset, the rendered text of every example of each split
(``train.texts.jsonl`` / ``val.texts.jsonl``, one ``{"text": ...}`` per line, in split order). Perplexity and
quantization calibration read text, not token ids, because they must tokenize with the model under test (and
refuse a tokenizer that differs from the baseline's), not with whatever tokenizer prep used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.errors import InputError

PREP_META = "prep.json"
SPLITS = ("train", "val")


def split_texts_path(prep_dir: str | os.PathLike[str], split: str) -> Path:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return Path(prep_dir) / f"{split}.texts.jsonl"


def read_texts(prep_dir: str | os.PathLike[str], split: str = "val") -> list[str]:
    """The rendered texts of one split of a prepared-data folder, in order."""
    path = split_texts_path(prep_dir, split)
    if not (Path(prep_dir) / PREP_META).exists():
        raise InputError(f"{prep_dir} is not a prepared-data folder (no {PREP_META}); create one with `lorakit prep`")
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"{path}:{lineno} is not a JSON object with a 'text' field; the folder is corrupt") from None
    except FileNotFoundError:
        raise InputError(f"{path} is missing; re-create the prepared-data folder with `lorakit prep`") from None
    if not texts:
        raise InputError(f"{path} holds no examples; the {split} split is empty")
    return texts
