"""A model folder's tokenizer as llama.cpp's ``tokenizer.*`` GGUF keys (byte-level BPE tokenizers).

llama.cpp re-implements tokenization from what the GGUF says: the token strings, their types, the BPE merges in
rank order, the special-token ids and *which pre-tokenizer regex* to split text with (``tokenizer.ggml.pre``, a
name llama.cpp maps to its built-in regexes). The pre-tokenizer is read from ``tokenizer.json`` and mapped to the
llama.cpp name that splits text the same way; an unrecognised one is refused instead of guessed, because a wrong
regex gives different token ids with no error (``tokenizer_pre`` overrides, for users who know the right name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import InputError

# tokenizer.json pre_tokenizer structures and the llama.cpp pre-tokenizer that splits text identically.
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_KNOWN_PRE = {
    "gpt2": [_BYTE_LEVEL],  # GPT-2's regex, applied by the ByteLevel pre-tokenizer itself
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],  # GPT-2's regex after single digits
}
# llama.cpp token types (gguf.TokenType): NORMAL 1, CONTROL 3, USER_DEFINED 4, UNUSED 5.


@dataclass
class GGUFVocab:
    """Everything written under ``tokenizer.*``."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos, eos, unk, pad (those the tokenizer has)
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def write(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        if not self.merges:
            # A vocabulary without merges (every token one byte, or added tokens): llama.cpp needs only the empty
            # merges list, but transformers' GGUF reader then derives merges from token scores and fails without
            # them. Scores are unused by llama.cpp's BPE; -id keeps the derivation deterministic.
            writer.add_token_scores([-float(i) for i in range(len(self.tokens))])
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
                  "pad": writer.add_pad_token_id}
        for role, token_id in self.special_ids.items():
            adders[role](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _steps(pre_tokenizer: dict | None) -> list[dict]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return list(pre_tokenizer.get("pretokenizers") or [])
    return [pre_tokenizer]


def detect_pre(tokenizer_json: dict, source: str) -> str:
    """The llama.cpp pre-tokenizer name for this tokenizer.json, or an error that says how to proceed."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    for name, pattern in _KNOWN_PRE.items():
        if len(steps) == len(pattern) and all(all(s.get(k) == v for k, v in p.items()) for s, p in zip(steps, pattern)):
            return name
    kinds = "+".join(s.get("type", "?") for s in steps) or "none"
    raise InputError(f"the tokenizer of {source} pre-tokenizes with {kinds}, which lorakit cannot map to a llama.cpp "
                     "pre-tokenizer with certainty; pass --tokenizer-pre NAME (a llama.cpp tokenizer.ggml.pre value, "
                     "e.g. llama-bpe, qwen2) if you know it")


def read_vocab(model_dir: Path, vocab_size: int, tokenizer_pre: str | None = None) -> GGUFVocab:
    """Read the folder's fast tokenizer; pad the token list to the model's ``vocab_size`` like llama.cpp does."""
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise InputError(f"{model_dir} has no tokenizer.json; GGUF export needs a fast (byte-level BPE) tokenizer "
                         "(SentencePiece-only tokenizers are not supported yet)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise InputError(f"the tokenizer of {model_dir} is {model.get('type')}"
                         f"{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}; "
                         "lorakit's GGUF export writes byte-level BPE tokenizers (GPT-2 style) only")
    pre = tokenizer_pre or detect_pre(spec, str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = a["content"]
    n = max(by_id) + 1
    if n > vocab_size:
        raise InputError(f"the tokenizer of {model_dir} has {n} tokens but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append((3 if added[i].get("special") else 4) if i in added else 1)
        else:  # ids the embedding has but the tokenizer never produces (vocab padded to a multiple of 64, ...)
            tokens.append(f"[PAD{i}]")
            types.append(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {role: getattr(tok, f"{role}_token_id") for role in ("bos", "eos", "unk", "pad")}
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bare = tok("a", add_special_tokens=False)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(probe) > len(bare) and probe[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(probe) > len(bare) and probe[-1] == tok.eos_token_id
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return GGUFVocab(tokens, types, merges, pre, {k: int(v) for k, v in special.items() if v is not None},
                     bool(add_bos), bool(add_eos), template)
