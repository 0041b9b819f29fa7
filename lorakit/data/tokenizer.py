"""The tokenizer prep uses, and its identity (id + digest of its files) recorded so training can refuse another."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import InputError

# Files that define tokenization; config.json and weights are excluded on purpose (same tokenizer, other model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


@dataclass
class TokenizerInfo:
    tokenizer: object
    model_dir: Path
    id: str
    digest: str


def base_id(ref: str | os.PathLike[str] | None, model_dir: Path) -> str:
    """How metadata names a base: the hub id of the embedded default, else the reference as given (absolute if local)."""
    from lorakit.models.embedded import DEFAULT_MODEL_NAME, MODEL_ID

    if ref is None or str(ref) in ("", "default", DEFAULT_MODEL_NAME):
        return MODEL_ID
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.is_dir() else str(ref)


def tokenizer_digest(model_dir: Path) -> str:
    from lorakit.io.digests import manifest_digest, sha256_file

    files = {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()}
    if not files:
        raise InputError(f"{model_dir} holds no tokenizer files (tokenizer.json, ...); pass a model folder with its tokenizer")
    return manifest_digest(files, "tokenizer")


def load_tokenizer(ref: str | os.PathLike[str] | None) -> TokenizerInfo:
    from transformers import AutoTokenizer

    from lorakit.models.folder import resolve_model_dir

    model_dir = resolve_model_dir(ref)
    digest = tokenizer_digest(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises OSError/ValueError/... for broken tokenizer folders
        raise InputError(f"cannot load the tokenizer of {model_dir} ({type(exc).__name__}: {exc}); is it a complete HF model folder?") from None
    if not getattr(tok, "is_fast", False):
        raise InputError(f"the tokenizer of {model_dir} is not a fast tokenizer; lorakit needs tokenizer.json (offsets)")
    return TokenizerInfo(tok, model_dir, base_id(ref, model_dir), digest)
