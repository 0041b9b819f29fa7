"""Calibration data: which texts, sampled how, tokenized with which tokenizer.

The texts come from a prepared-data folder's **train** split (``lorakit.data.splits.read_texts(prep, "train")``)
so that the validation split, which the perplexity gate measures, never shapes the quantized weights; or from a
plain text file (blank-line separated paragraphs) or a ``.jsonl`` file of ``{"text": ...}`` lines.

Sampling is deterministic: the texts are shuffled with ``random.Random(seed)``, tokenized with the model's own
tokenizer, joined with the EOS token into one stream and cut into consecutive blocks of ``seq_len`` tokens; the
first ``n_samples`` blocks are the calibration set.

General text in the mix (``general``, ``general_fraction``): a share of the blocks comes from text outside every
task (by default lorakit's general-English corpus), so that the quantization keeps the directions ordinary
language uses, not only those of short task answers; the release gate checks exactly that. Those blocks are cut
from the general text's documents **in reverse order** (last document first), while the gate scores the first
tokens of the same corpus in order (:mod:`lorakit.gate.general`). From lorakit's corpus, the documents the gate's
default window reads (its first ``DEFAULT_GENERAL_MAX_TOKENS`` tokens) are never taken: a calibration asking for
more general text than the rest holds is an error, not a silent overlap, so the gate's general text never shapes
the weights.

How many blocks: an explicit ``n_samples`` (``--n-samples``) the data cannot fill is an error, never a silently
smaller set. Without one (``n_samples=None``) the target is :data:`DEFAULT_N_SAMPLES`; when the data gives fewer
blocks, all of them are used, with a warning and a note in ``lorakit_quant.json``, as long as there are at least
:data:`MIN_AUTO_SAMPLES` (a policy floor, not a measured quality threshold: below it the user should decide,
with more text, a shorter ``--seq-len`` or an explicit ``--n-samples``).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.data.formats import IGNORE_INDEX, tokenize_prepped
from lorakit.data.splits import PREP_META, read_records, split_texts_path
from lorakit.errors import InputError
from lorakit.io.digests import sha256_file

CALIB_SPLIT = "train"
# 128 blocks (of QuantizeOptions.seq_len 256), half of them general text: on the default release's merged model the
# group-16 quantization on 128 blocks lost no more than 0.5 exact-match points on any task's 200 val questions, on 64
# blocks 3.5 on number-words (bench/results/quantize_accuracy_all.json, ``variants.*n128*`` against ``*general50``).
DEFAULT_N_SAMPLES = 128
MIN_AUTO_SAMPLES = 16


@dataclass
class Calibration:
    blocks: torch.Tensor  # int64 [n_samples, seq_len]
    source: str
    source_kind: str  # "prep" or "file"
    source_digest: str
    tokens_digest: str
    n_texts: int
    tokens_read: int
    n_samples_requested: int | None = None  # None: not asked for; the default or what the data gives
    note: str | None = None  # set when fewer than the default blocks were used
    general: dict | None = None  # the general-text share of the blocks (source, digest, blocks, fraction)
    # bool [n_samples, seq_len]: True on the tokens of an example's answer (as training's loss mask marks them);
    # None when the source has no answers (text data, a text file). Scale tuning can train on these alone.
    answer_mask: torch.Tensor | None = None

    def summary(self) -> dict:
        return {"general": self.general, "source": self.source, "kind": self.source_kind, "split": CALIB_SPLIT if self.source_kind == "prep"
                else None, "source_sha256": self.source_digest, "tokens_sha256": self.tokens_digest,
                "n_samples": int(self.blocks.shape[0]), "seq_len": int(self.blocks.shape[1]),
                "n_samples_requested": self.n_samples_requested,
                "n_samples_rule": ("requested" if self.n_samples_requested is not None else
                                   f"default {DEFAULT_N_SAMPLES}, or every block the data gives when fewer "
                                   f"(at least {MIN_AUTO_SAMPLES})"),
                "n_texts": self.n_texts, "tokens_read": self.tokens_read,
                "sampling": "shuffle texts with random.Random(seed), join with EOS, first n_samples blocks",
                "answer_tokens": None if self.answer_mask is None else int(self.answer_mask.sum())}


def _file_texts(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"calibration file {path} is not UTF-8 text; pass a text file or a prepared-data folder") from None
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"{path}:{lineno} is not a JSON object with a 'text' field") from None
        return texts
    return [p.strip() for p in raw.split("\n\n") if p.strip()]


def load_texts(calib: str | Path | None) -> tuple[list[str], str, str, str]:
    """(texts, source, kind, sha256 of the file read)."""
    texts, _, source, kind, digest = _load_source(calib)
    return texts, source, kind, digest


def _load_source(calib: str | Path | None) -> tuple[list[str], list[int | None] | None, str, str, str]:
    """(texts, where each text's answer starts (prep folders; None for a file), source, kind, sha256)."""
    if calib is None:
        raise InputError("quantization needs calibration text; pass --calib with a prepared-data folder "
                         "(`lorakit prep`) or a text file")
    path = Path(calib).expanduser()
    if path.is_dir():
        if not (path / PREP_META).exists():
            raise InputError(f"--calib {path} is a folder but not a prepared-data folder (no {PREP_META}); "
                             "pass a `lorakit prep` output or a text file")
        records = read_records(path, CALIB_SPLIT)
        return ([r["text"] for r in records], [r.get("prompt_end") for r in records], str(path), "prep",
                sha256_file(split_texts_path(path, CALIB_SPLIT)))
    if not path.is_file():
        raise InputError(f"--calib {path} does not exist; pass a prepared-data folder or a text file")
    return _file_texts(path), None, str(path), "file", sha256_file(path)


def _token_stream(texts: list[str], order: list[int], tokenizer, need: int,
                  prompt_ends: list[int | None] | None = None) -> tuple[list[int], list[bool] | None]:
    """The texts in ``order``, tokenized and joined with EOS, until ``need`` tokens are there (or the texts end);
    with ``prompt_ends``, also which tokens are answer tokens (training's loss mask: the tokens inside
    ``[prompt_end, len(text))``), else None."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    answer: list[bool] | None = None if prompt_ends is None else []
    for i in order:
        end = None if prompt_ends is None else prompt_ends[i]
        if end is None:
            ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
            flags = [False] * len(ids)
        else:  # tokenized whole, as plain calibration does; the ids are the same, the labels mark the answer
            tok = tokenize_prepped(texts[i], end, tokenizer)
            ids, flags = tok.input_ids, [label != IGNORE_INDEX for label in tok.labels]
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
            flags = flags + [False]
        if answer is not None:
            answer.extend(flags)
        if len(stream) >= need:
            break
    return stream, answer


def general_stream(general: str | Path, tokenizer, n_tokens: int, *, purpose: str = "calibration"
                   ) -> tuple[list[int], dict]:
    """``n_tokens`` tokens of general text, read from its documents last first (the gate reads them first first)
    and never from the leading documents the release gate scores; what was read, for the record. ``purpose`` names
    the reader in the error when the text is too short."""
    from lorakit.gate.general import resolve_general_text

    path = resolve_general_text(general)
    if path is None:
        raise InputError(f"{purpose} general text is 'none'")
    texts, source, _, digest = load_texts(path)
    reserved = _gate_documents(texts, tokenizer) if Path(path).resolve() == Path(resolve_general_text("default")).resolve() else 0
    stream, _ = _token_stream(texts, list(reversed(range(reserved, len(texts)))), tokenizer, n_tokens)
    if len(stream) < n_tokens:
        held = f" outside the {reserved} document(s) the release gate scores" if reserved else ""
        raise InputError(f"{purpose} general text {source} gives {len(stream)} tokens{held}, fewer than the "
                         f"{n_tokens} it needs; ask for less, or pass a longer text")
    return stream[:n_tokens], {"source": source, "sha256": digest, "documents": "last first",
                               "n_documents": len(texts), "gate_documents_left_out": reserved}


def general_blocks(general: str | Path, tokenizer, n_blocks: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    """``n_blocks`` blocks of general text (:func:`general_stream`)."""
    from lorakit.gate.general import resolve_general_text

    if resolve_general_text(general) is None:
        raise InputError("calibration general text is 'none'; pass a fraction of 0 to calibrate on the tasks only")
    try:
        stream, info = general_stream(general, tokenizer, n_blocks * seq_len)
    except InputError as exc:
        raise InputError(f"{exc} (the general share of the calibration, {n_blocks} x {seq_len}: lower the general "
                         "fraction or n_samples)") from None
    blocks = torch.tensor(stream, dtype=torch.int64).view(n_blocks, seq_len)
    return blocks, {"source": info["source"], "sha256": info["sha256"], "n_samples": n_blocks,
                    "documents": "last first", "n_documents": info["n_documents"],
                    "gate_documents_left_out": info["gate_documents_left_out"]}


def _gate_documents(texts: list[str], tokenizer) -> int:
    """How many leading documents the release gate's default general-text window reads (its first
    ``DEFAULT_GENERAL_MAX_TOKENS`` tokens, documents joined with one EOS): calibration leaves them out."""
    from lorakit.gate.general import DEFAULT_GENERAL_MAX_TOKENS

    read = 0
    for i, text in enumerate(texts):
        read += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if read >= DEFAULT_GENERAL_MAX_TOKENS:
            return i + 1
    return len(texts)


def build_calibration(calib: str | Path | None, tokenizer, *, n_samples: int | None, seq_len: int,
                      seed: int, general: str | Path | None = None, general_fraction: float = 0.0) -> Calibration:
    """The calibration blocks; ``n_samples=None`` takes the default or, when the data is shorter, what it gives.

    With ``general`` and ``general_fraction`` > 0, round(fraction x blocks) of them are general text (see the
    module docstring) and the rest come from ``calib``; the general blocks follow the task blocks.
    """
    if (n_samples is not None and n_samples < 1) or seq_len < 8:
        raise InputError(f"--n-samples must be >= 1 and --seq-len >= 8 (got {n_samples}, {seq_len})")
    if not 0 <= general_fraction < 1:
        raise InputError(f"the general-text fraction of calibration must be in [0, 1) (got {general_fraction}); "
                         "0 = the tasks only")
    total = DEFAULT_N_SAMPLES if n_samples is None else int(n_samples)
    n_general = round(total * general_fraction) if general is not None else 0
    if n_general and n_general >= total:
        n_general = total - 1  # at least one block of the tasks' own data
    gen_blocks, gen_info = (general_blocks(general, tokenizer, n_general, seq_len) if n_general
                            else (None, None))
    want = total - n_general
    texts, prompt_ends, source, kind, digest = _load_source(calib)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    stream, answer = _token_stream(texts, order, tokenizer, want * seq_len, prompt_ends)
    available = len(stream) // seq_len
    note = None
    share = f" (its share; {n_general} more are general text)" if n_general else ""
    if available < want:
        if n_samples is None and available >= MIN_AUTO_SAMPLES:
            note = (f"calibration data {source} gives {len(stream)} tokens = {available} blocks of {seq_len}, fewer "
                    f"than the {f'{want} wanted{share}' if n_general else f'default {DEFAULT_N_SAMPLES}'}; calibrating on all "
                    f"{available} (pass --n-samples to "
                    "choose, or add text)")
            want = available
        elif n_samples is None:
            raise InputError(
                f"calibration data {source} gives {len(stream)} tokens = {available} blocks of {seq_len}, fewer than "
                f"the {MIN_AUTO_SAMPLES} lorakit uses at least when --n-samples is not given; add text, lower "
                f"--seq-len, or pass --n-samples {max(available, 1)} to accept fewer"
                + ("" if available else f" (with a --seq-len below {len(stream)})")
            )
        else:
            raise InputError(
                f"calibration data {source} gives {len(stream)} tokens = {available} blocks of {seq_len}, but "
                f"--n-samples {n_samples} needs {want * seq_len} of it{share}; add text, or lower --n-samples/--seq-len "
                f"(e.g. --n-samples {max(available, 1)} --seq-len {seq_len})" if available else
                f"calibration data {source} gives only {len(stream)} tokens, less than one block of --seq-len "
                f"{seq_len}; add text or lower --seq-len"
            )
    blocks = torch.tensor(stream[: want * seq_len], dtype=torch.int64).view(want, seq_len)
    mask = (None if answer is None or not any(answer) else
            torch.tensor(answer[: want * seq_len], dtype=torch.bool).view(want, seq_len))
    if gen_blocks is not None:
        blocks = torch.cat([blocks, gen_blocks])
        if mask is not None:  # general text has no answers
            mask = torch.cat([mask, torch.zeros_like(gen_blocks, dtype=torch.bool)])
        gen_info["fraction"] = round(n_general / int(blocks.shape[0]), 4)
    tokens_digest = hashlib.sha256(blocks.to(torch.int32).numpy().tobytes()).hexdigest()
    return Calibration(blocks, source, kind, digest, tokens_digest, len(texts), len(stream),
                       n_samples_requested=n_samples, note=note, general=gen_info, answer_mask=mask)
