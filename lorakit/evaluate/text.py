"""Evaluation text: where it comes from, and the one way it becomes the token stream that is scored.

The method is fixed because every choice here moves perplexity (chunking vs a sliding window alone moves it by
double-digit percents in the Hugging Face perplexity guide's GPT-2 example): each document is tokenized on its own *without* special tokens, documents are
joined with a single EOS token between them (none before the first or after the last, no BOS), and the stream
is cut to ``max_tokens`` if given. The text is tokenized once, with the baseline's tokenizer, and the same ids
are fed to every model of a comparison; a model whose tokenizer differs is refused (its ids would mean
something else).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorakit.errors import InputError

_IGNORED_TOKENIZER_KEYS = ("truncation", "padding")  # runtime settings that do not change which ids text gets


@dataclass
class EvalTexts:
    """Documents to evaluate on, and a description of where they came from."""

    texts: list[str]
    source: str
    source_kind: str  # "prep" | "jsonl" | "text" | "list"
    split: str | None

    @property
    def digest(self) -> str:
        """sha256 of the documents as a JSON list (order and boundaries included)."""
        return hashlib.sha256(json.dumps(self.texts, ensure_ascii=False).encode()).hexdigest()


@dataclass
class EvalTokens:
    """The token stream every model of a comparison is scored on, and what defines it."""

    ids: torch.Tensor  # int64 [n]
    texts: EvalTexts
    tokenizer_digest: str
    eos_token_id: int
    max_tokens: int | None

    @property
    def token_digest(self) -> str:
        return hashlib.sha256(self.ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        return {
            "source": self.texts.source,
            "source_kind": self.texts.source_kind,
            "split": self.texts.split,
            "n_documents": len(self.texts.texts),
            "text_digest": self.texts.digest,
            "tokenizer_digest": self.tokenizer_digest,
            "token_digest": self.token_digest,
            "eos_token_id": self.eos_token_id,
            "join": "documents tokenized without special tokens, joined with one EOS between documents, no BOS",
            "max_tokens": self.max_tokens,
            "tokens_total": int(self.ids.numel()),
        }


def read_eval_texts(data: str | os.PathLike[str] | list[str] | EvalTexts, split: str = "val",
                    max_texts: int | None = None) -> EvalTexts:
    """Documents from a prepared-data folder (its ``split``), a ``.jsonl`` of ``{"text"}``, or a text file.

    A plain text file is one document: splitting it on blank lines would be a second, silent choice of method.
    ``max_texts``: only the first N documents (a prepared split's first N examples, as task accuracy reads them).
    """
    out = _read_eval_texts(data, split)
    return out if max_texts is None else replace(out, texts=out.texts[: int(max_texts)])


def _read_eval_texts(data: str | os.PathLike[str] | list[str] | EvalTexts, split: str) -> EvalTexts:
    from lorakit.data.splits import read_texts

    if isinstance(data, EvalTexts):
        return data
    if isinstance(data, list):
        texts, out = data, EvalTexts(list(data), "<list>", "list", None)
    else:
        path = Path(data).expanduser()
        if path.is_dir():
            out = EvalTexts(read_texts(path, split), str(path), "prep", split)
            texts = out.texts
        elif not path.exists():
            raise InputError(f"evaluation data {data} does not exist; pass a prepared-data folder or a text file")
        elif path.suffix == ".jsonl":
            texts = []
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            texts.append(json.loads(line)["text"])
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise InputError(f"{path}:{lineno} is not a JSON object with a 'text' field") from None
            out = EvalTexts(texts, str(path), "jsonl", None)
        else:
            try:
                texts = [path.read_text(encoding="utf-8")]
            except UnicodeDecodeError:
                raise InputError(f"evaluation data {path} is not UTF-8 text; pass a text file or a prepared-data folder") from None
            out = EvalTexts(texts, str(path), "text", None)
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise InputError(f"evaluation data {out.source} holds no text; pass a non-empty text file or data folder")
    if not all(isinstance(t, str) for t in texts):
        raise InputError(f"evaluation data {out.source} holds non-string documents")
    return out


def tokenizer_digest(tokenizer) -> str:
    """Identity of what a tokenizer does: its full fast-tokenizer definition (vocab, merges, normalizer,
    pre-tokenizer, added tokens) without runtime padding/truncation settings, plus its special-token ids.

    Two saves of the same tokenizer have the same digest; tokenizers that would give different ids do not.
    Two spellings that tokenize identically are made one (:func:`_canonical_model`), so a tokenizer read back
    from a GGUF file has the digest of the folder's tokenizer it was written from.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
        key = (hashlib.sha256(definition.encode()).hexdigest(), tokenizer.eos_token_id, tokenizer.bos_token_id)
        if key not in _DIGESTS:  # the canonical form re-parses the whole definition; a scorecard asks per model and split
            _DIGESTS[key] = _backend_digest(definition, tokenizer)
        return _DIGESTS[key]
    spec = {"vocab": sorted(tokenizer.get_vocab().items()), "class": type(tokenizer).__name__}  # a slow tokenizer
    spec["_special"] = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# (sha256 of the serialized fast tokenizer, eos id, bos id) -> digest: the same definition always has one digest.
_DIGESTS: dict[tuple[str, int | None, int | None], str] = {}


def _backend_digest(definition: str, tokenizer) -> str:
    """The digest of a fast tokenizer from its serialized definition (see :func:`tokenizer_digest`)."""
    spec = json.loads(definition)
    for key in _IGNORED_TOKENIZER_KEYS:
        spec.pop(key, None)
    spec["model"] = _canonical_model(spec.get("model") or {})
    spec["_special"] = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


_LLAMA_CPP_PAD = re.compile(r"^\[PAD(\d+)\]$")


def _canonical_model(model: dict) -> dict:
    """A BPE model with no-op differences removed: ``None`` and ``""`` as subword prefix/suffix (both mean none),
    and llama.cpp's vocabulary padding ``[PAD<id>]`` at its own id (rows of the embedding no text maps to)."""
    model = dict(model)
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) is None and key in model:
            model[key] = ""
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        model["vocab"] = {t: i for t, i in vocab.items()
                          if not ((m := _LLAMA_CPP_PAD.match(t)) and int(m.group(1)) == i)}
    return model


def tokenize_eval_texts(texts: EvalTexts, tokenizer, *, max_tokens: int | None = None) -> EvalTokens:
    """The fixed method: per-document ids without special tokens, joined by one EOS, cut to ``max_tokens``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the baseline tokenizer has no EOS token, which joins documents; set eos_token in its "
                         "tokenizer_config.json")
    if max_tokens is not None and int(max_tokens) < 2:
        raise InputError(f"--max-tokens must be at least 2, got {max_tokens}")
    ids: list[int] = []
    for i, text in enumerate(texts.texts):
        if i:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    return EvalTokens(torch.tensor(ids, dtype=torch.int64), texts, tokenizer_digest(tokenizer), int(eos),
                      None if max_tokens is None else int(max_tokens))
