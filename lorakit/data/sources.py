"""Read raw examples from local files (JSONL, JSON, CSV, Parquet, plain text) or a ``datasets`` hub name.

Every record keeps its origin (``file:line`` or ``file:row``), so any later complaint about an example points at
the exact place to fix it. Nothing is skipped silently: unreadable lines are errors, not warnings.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class RawRecord:
    fields: dict[str, Any]
    origin: str  # "path:line" for line-based files, "path:row N" otherwise


@dataclass
class Source:
    """One input as the user named it, with what was read from it."""

    name: str
    path: Path | None  # None for a hub dataset
    kind: str  # jsonl | json | csv | parquet | text | hub
    records: list[RawRecord]


def _read_jsonl(path: Path) -> list[RawRecord]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            out.append(RawRecord(obj, f"{path}:{lineno}"))
    return out


def _read_json(path: Path) -> list[RawRecord]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); fix the file (JSON Lines? name it .jsonl)") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path} is a JSON object; expected a list of examples (or an object holding exactly one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise InputError(f"{path} holds a JSON {type(obj).__name__}; expected a list of example objects")
    out = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise InputError(f"{path}: item {i} is a {type(item).__name__}; every example must be a JSON object")
        out.append(RawRecord(item, f"{path}:item {i}"))
    return out


def _maybe_json(value: Any) -> Any:
    """CSV cells are strings; a ``messages`` cell holds JSON."""
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_csv(path: Path) -> list[RawRecord]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        # reader.line_num is the physical line just read, which is right even for multi-line quoted cells.
        return [RawRecord({k: _maybe_json(v) for k, v in row.items() if k is not None}, f"{path}:{reader.line_num}")
                for row in reader]


def _read_parquet(path: Path) -> list[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants for corrupt files
        raise InputError(f"{path} is not a readable Parquet file ({exc}); re-export it") from None
    return [RawRecord(row, f"{path}:row {i}") for i, row in enumerate(table.to_pylist())]


def _read_text(path: Path) -> list[RawRecord]:
    """Plain text: one document per paragraph (blocks separated by blank lines)."""
    out, block, start = [], [], 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                if not block:
                    start = lineno
                block.append(line.rstrip("\n"))
            elif block:
                out.append(RawRecord({"text": "\n".join(block)}, f"{path}:{start}"))
                block = []
    if block:
        out.append(RawRecord({"text": "\n".join(block)}, f"{path}:{start}"))
    return out


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet, "text": _read_text}


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise InputError(f"{path}: unknown file type {suffix or '(no suffix)'}; use .jsonl, .json, .csv, .parquet or .txt")


def _load_hub(name: str) -> Source:
    """A ``datasets`` name (``org/name`` or ``org/name:split``), only when it is not a local path."""
    repo, _, split = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as exc:  # offline, unknown name, gated: all mean "cannot use this source"
        raise InputError(
            f"{name} is not a local file and could not be loaded with datasets.load_dataset "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
            "pass a local JSONL/JSON/CSV/Parquet/text file (no dataset hub is reachable offline)"
        ) from None
    records = [RawRecord(dict(row), f"{name}:row {i}") for i, row in enumerate(ds)]
    return Source(name, None, "hub", records)


def load_source(ref: str | os.PathLike[str]) -> Source:
    """Read one input; bundled datasets may be named ``bundled:<name>``."""
    from lorakit.data.bundled import BUNDLED_PREFIX, bundled_dataset_path

    text = str(ref)
    if text.startswith(BUNDLED_PREFIX):
        path = bundled_dataset_path(text)
    else:
        path = Path(text).expanduser()
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass the data files themselves (e.g. {path}/*.jsonl)")
    if not path.exists():
        known = JSONL_SUFFIXES + TEXT_SUFFIXES + (".json", ".csv", ".tsv", ".parquet", ".pq")
        looks_local = text.startswith((".", "/", "~")) or Path(text).suffix.lower() in known or text.count("/") > 1
        if looks_local:
            raise InputError(f"data file {text} does not exist; check the path")
        return _load_hub(text)
    kind = file_kind(path)
    if path.stat().st_size == 0:
        raise InputError(f"data file {path} is empty; pass a file with examples")
    try:
        records = _READERS[kind](path)
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; re-encode it as UTF-8") from None
    if not records:
        raise InputError(f"data file {path} holds no examples (only blank lines or an empty list)")
    return Source(text, path, kind, records)
