"""``prepare_dataset``: raw data files -> a prepared-data folder that training, calibration and the gate read.

The folder holds, per split (``train``, ``val``, ``test``): ``<split>.parquet`` (fixed-length rows of ``input_ids``,
``labels``, ``position_ids`` and, for padded rows, ``attention_mask``) and ``<split>.texts.jsonl`` (the rendered
text of every example, see :mod:`lorakit.data.splits`), plus ``prep.json`` saying how it was made. The split is
made on examples, before packing, with a seeded permutation of the distinct example *inputs* (the rendered prompt;
the whole text for text data), so two examples with the same input never land in different splits, and the same
inputs and seed always give the same folder (byte for byte, except the timing fields of prep.json). ``val`` takes
the first ``val_fraction`` of the permutation and ``test`` the next ``test_fraction`` (with ``test_fraction=0`` the
split is the one lorakit made before it had a test split).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.options import PREP
from lorakit.progress import bar as progress_bar

import lorakit
from lorakit.data.formats import FORMATS, IGNORE_INDEX, Tokenized, check_columns, detect_format, has_chat_template, \
    render_record, tokenize_rendered
from lorakit.data.packing import Row, pack_rows, pad_rows
from lorakit.data.sources import Source, load_source
from lorakit.data.splits import PREP_META, SPLITS, split_texts_path
from lorakit.data.tokenizer import load_tokenizer
from lorakit.errors import InputError
from lorakit.io.atomic import atomic_dir, check_output_free, read_json, write_json
from lorakit.io.digests import file_manifest, manifest_digest, sha256_file

ROW_COLUMNS = ("input_ids", "labels", "position_ids", "attention_mask", "tokens")


def rows_path(prep_dir: str | os.PathLike[str], split: str) -> Path:
    return Path(prep_dir) / f"{split}.parquet"


@dataclass
class SplitCounts:
    examples: int = 0  # examples in the split (after --drop-long)
    rows: int = 0  # training rows (packed rows hold several examples)
    tokens: int = 0  # real tokens (no padding)
    loss_tokens: int = 0  # tokens with a label
    padding_fraction: float = 0.0  # padding slots / all slots of the rows
    truncated: int = 0  # examples cut to --max-length
    dropped_long: int = 0  # examples over --max-length left out (--drop-long)
    no_loss_tokens: int = 0  # examples whose response was cut away entirely; left out of the rows, kept in texts


@dataclass
class PrepRecord:
    """Everything ``prep.json`` holds; serialises 1:1 (``asdict``) and reads back with :func:`read_prep`."""

    sources: list[dict[str, Any]]
    format: str
    format_detected: bool
    tokenizer: dict[str, Any]
    template: str  # chat_template | alpaca | none (text)
    max_length: int
    pack: bool
    row_length: int
    val_fraction: float
    seed: int
    drop_long: bool
    counts: dict[str, SplitCounts]
    warnings: list[str]
    data_digest: str  # digest of the data files (everything but prep.json): what training records as prep_digest
    files: dict[str, str]
    wall_time_s: float
    versions: dict[str, str]
    test_fraction: float = 0.0  # folders made before the test split existed read back as 0 (no test split)
    lorakit_version: str = lorakit.__version__
    stage: str = "prep"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_prep(prep_dir: str | os.PathLike[str]) -> PrepRecord:
    """Read ``prep.json`` of a prepared-data folder (an InputError names the folder if it is not one)."""
    path = Path(prep_dir) / PREP_META
    if not path.exists():
        raise InputError(f"{prep_dir} is not a prepared-data folder (no {PREP_META}); create one with `lorakit prep`")
    raw = read_json(path, "prepared-data metadata")
    try:
        raw["counts"] = {k: SplitCounts(**v) for k, v in raw["counts"].items()}
        return PrepRecord(**raw)
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path} does not match this lorakit version's prep.json ({exc}); re-run `lorakit prep`") from None


@dataclass
class PrepResult:
    output: Path
    metadata: dict[str, Any]
    format: str
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _choose_format(sources: list[Source], fmt: str) -> tuple[str, bool]:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise InputError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
        for s in sources:
            check_columns(s, fmt)
        return fmt, False
    found = {s.name: detect_format(s) for s in sources}
    if len(set(found.values())) > 1:
        listing = ", ".join(f"{k} is {v}" for k, v in found.items())
        raise InputError(f"the inputs have different formats ({listing}); prepare them separately or pass --format")
    return next(iter(found.values())), True


def _held_out(n: int, fraction: float) -> int:
    k = round(n * fraction)
    return 1 if fraction > 0 and k == 0 else k


def _split(keys: list[str], val_fraction: float, test_fraction: float, seed: int) -> tuple[list[int], ...]:
    """(train, val, test) example indices; examples with the same ``keys`` (input) always share a split.

    The seeded permutation is over distinct inputs in first-seen order, so data without duplicate inputs splits
    exactly (same examples, same order) as the permutation of examples lorakit used before the test split.
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    members = list(groups.values())
    order = list(range(len(members)))
    random.Random(seed).shuffle(order)
    n_val, n_test = _held_out(len(order), val_fraction), _held_out(len(order), test_fraction)
    if len(order) - n_val - n_test < 1:
        raise InputError(f"only {len(order)} distinct example input(s): --val-fraction {val_fraction} and "
                         f"--test-fraction {test_fraction} leave none for training; add data or lower them")
    pick = lambda part: [i for g in part for i in members[g]]  # noqa: E731 - in permutation order, as before
    return pick(order[n_val + n_test:]), pick(order[:n_val]), pick(order[n_val:n_val + n_test])


def _check_params(max_length: int, val_fraction: float, test_fraction: float = 0.0) -> None:
    if int(max_length) < 8:
        raise InputError(f"--max-length must be at least 8 tokens, got {max_length}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise InputError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if float(val_fraction) + float(test_fraction) >= 1.0:
        raise InputError(f"--val-fraction {val_fraction} + --test-fraction {test_fraction} must stay below 1 so "
                         "that examples remain for training")


def _write_rows(path: Path, rows: list[Row], pack: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "input_ids": [r.input_ids for r in rows],
        "labels": [r.labels for r in rows],
        "position_ids": [r.position_ids for r in rows],
        "tokens": [[r.n_tokens] for r in rows],  # real (non-padding) tokens of the row, for tokens/s
    }
    if not pack:
        columns["attention_mask"] = [r.attention_mask for r in rows]
    table = pa.table({k: pa.array(v, type=pa.list_(pa.int32())) for k, v in columns.items()})
    pq.write_table(table, path, compression="zstd")


def _write_texts(path: Path, examples: list[Tokenized]) -> None:
    """One JSON line per example: its rendered text and, for instruction/chat data, where the answer starts
    (``prompt_end``, a character offset into ``text``) and the answer itself (``reference``) for task accuracy."""
    with open(path, "w", encoding="utf-8") as fh:
        for ex in examples:
            line: dict[str, Any] = {"text": ex.text}
            if ex.rendered is not None and ex.rendered.prompt_end is not None:
                line["prompt_end"] = ex.rendered.prompt_end
                line["reference"] = ex.rendered.reference
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")


def prepare_dataset(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    format: str = PREP.format,
    base: str | os.PathLike[str] | None = None,
    max_length: int = PREP.max_length,
    pack: bool = PREP.pack,
    val_fraction: float = PREP.val_fraction,
    test_fraction: float = PREP.test_fraction,
    seed: int = PREP.seed,
    drop_long: bool = PREP.drop_long,
    force: bool = False,
    progress: bool = True,
) -> PrepResult:
    """Read, render, tokenize, mask, split and pack/pad ``sources`` into a prepared-data folder at ``output``.

    Every input problem raises :class:`InputError` before anything is written. Over-long examples are truncated
    (or left out with ``drop_long``) and counted in ``prep.json``; nothing is dropped without being counted.
    """
    started = time.perf_counter()
    output = Path(output)
    if not sources:
        raise InputError("no data given; pass one or more data files (or bundled:reverse-words)")
    _check_params(max_length, val_fraction, test_fraction)
    check_output_free(output, force)
    loaded = [load_source(s) for s in sources]
    fmt, detected = _choose_format(loaded, format)
    tok_info = load_tokenizer(base)
    tok = tok_info.tokenizer
    if fmt == "chat" and not has_chat_template(tok):
        raise InputError(
            f"chat data needs a chat template, but the tokenizer of {tok_info.model_dir} has none; pass --base with a "
            "model whose tokenizer has one, or convert the data to instruction/text format"
        )
    template = "none" if fmt == "text" else ("chat_template" if has_chat_template(tok) else "alpaca")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise InputError(f"the tokenizer of {tok_info.model_dir} has neither a pad nor an EOS token; add one")

    records = [r for s in loaded for r in s.records]
    bar = progress_bar(records, desc="tokenizing", unit="ex", disable=not progress)
    examples: list[Tokenized] = [tokenize_rendered(render_record(r, fmt, tok), fmt, tok, max_length) for r in bar]
    warnings: list[str] = []
    split_idx = _split([ex.rendered.input_key for ex in examples], val_fraction, test_fraction, seed)

    split_examples: dict[str, list[Tokenized]] = {}
    counts: dict[str, SplitCounts] = {}
    for split, idx in zip(SPLITS, split_idx):
        c = SplitCounts()
        kept: list[Tokenized] = []
        for i in idx:
            ex = examples[i]
            if ex.truncated and drop_long:
                c.dropped_long += 1
                continue
            c.truncated += ex.truncated
            kept.append(ex)
        c.examples = len(kept)
        split_examples[split] = kept
        counts[split] = c
    if not split_examples["train"]:
        raise InputError(f"every training example is longer than --max-length {max_length} and --drop-long left none; "
                         "raise --max-length or drop --drop-long")
    longest = max(len(ex.input_ids) for exs in split_examples.values() for ex in exs)
    row_length = max_length if pack else longest

    rows: dict[str, list[Row]] = {}
    for split, exs in split_examples.items():
        c = counts[split]
        trainable = [ex for ex in exs if any(l != IGNORE_INDEX for l in ex.labels)]
        c.no_loss_tokens = len(exs) - len(trainable)
        rows[split] = (pack_rows if pack else pad_rows)(trainable, row_length, pad_id)
        c.rows = len(rows[split])
        c.tokens = sum(len(ex.input_ids) for ex in trainable)
        c.loss_tokens = sum(sum(l != IGNORE_INDEX for l in ex.labels) for ex in trainable)
        slots = c.rows * row_length
        c.padding_fraction = (slots - c.tokens) / slots if slots else 0.0
        first = next((ex.origin for ex in exs if ex.truncated), None)
        if c.truncated:
            warnings.append(f"{split}: {c.truncated} example(s) longer than {max_length} tokens were truncated "
                            f"(first: {first}); pass --drop-long to leave them out or raise --max-length")
        if c.dropped_long:
            warnings.append(f"{split}: {c.dropped_long} example(s) longer than {max_length} tokens were left out (--drop-long)")
        if c.no_loss_tokens:
            warnings.append(f"{split}: {c.no_loss_tokens} example(s) lost their whole response to truncation and carry "
                            "no loss; they are not in the training rows (raise --max-length)")
    if not rows["train"]:
        raise InputError("no training example has any response token within --max-length; raise --max-length")
    if not split_examples["val"]:
        warnings.append("the validation split is empty (--val-fraction 0); the perplexity gate and calibration need one")
    if not split_examples["test"]:
        warnings.append("the test split is empty (--test-fraction 0); final reports fall back to the val split, "
                        "which the gate also sees")

    with atomic_dir(output, force=force) as tmp:
        for split in SPLITS:
            _write_rows(rows_path(tmp, split), rows[split], pack)
            _write_texts(split_texts_path(tmp, split), split_examples[split])
        files = file_manifest(tmp)
        record = PrepRecord(
            sources=[{"name": s.name, "path": str(s.path.resolve()) if s.path else None, "kind": s.kind,
                      "sha256": sha256_file(s.path) if s.path else None, "examples": len(s.records)} for s in loaded],
            format=fmt, format_detected=detected,
            tokenizer={"id": tok_info.id, "digest": tok_info.digest, "model_dir": str(tok_info.model_dir),
                       "pad_token_id": pad_id, "has_chat_template": has_chat_template(tok)},
            template=template, max_length=int(max_length), pack=bool(pack), row_length=int(row_length),
            val_fraction=float(val_fraction), test_fraction=float(test_fraction), seed=int(seed), drop_long=bool(drop_long), counts=counts,
            warnings=warnings, data_digest=manifest_digest(files, "prep-data"), files=files,
            wall_time_s=round(time.perf_counter() - started, 3), versions=_versions(),
        )
        write_json(tmp / PREP_META, record.to_json())
    return PrepResult(output, record.to_json(), fmt, counts, warnings)


def _versions() -> dict[str, str]:
    import pyarrow
    import transformers

    return {"transformers": transformers.__version__, "pyarrow": pyarrow.__version__}
