"""Example formats: detect them, render each example to text, and tokenize it with its loss mask.

- ``text``: a ``text`` field; loss on every token (plus EOS, so the model learns where documents end).
- ``instruction``: ``instruction`` + optional ``input``/``context`` + ``output``/``response`` (Alpaca, Dolly);
  rendered as a one-turn chat with the tokenizer's chat template when it has one, else the Alpaca prompt.
- ``chat``: ``messages`` = [{"role", "content"}, ...]; rendered with the chat template (required).

For instruction and chat data only the assistant's tokens carry labels; every prompt token is -100. The mask is
computed on the tokenization of the WHOLE rendered text (character offsets), never by tokenizing pieces
separately, because BPE merges across a prompt/response boundary would otherwise shift the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.data.sources import RawRecord, Source
from lorakit.data.options import FORMATS
from lorakit.errors import InputError

IGNORE_INDEX = -100
INSTRUCTION_KEYS = ("instruction", "prompt")
INPUT_KEYS = ("input", "context")
OUTPUT_KEYS = ("output", "response", "completion")
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that completes the request.\n\n"


@dataclass
class Rendered:
    """One example as text, with the character spans that carry loss."""

    text: str
    loss_spans: list[tuple[int, int]]
    origin: str
    reference: str | None = None  # the last assistant turn's content: what task accuracy compares a generation with

    @property
    def prompt_end(self) -> int | None:
        """Character offset where the reference answer starts (everything before it is the prompt); None for text."""
        return self.loss_spans[-1][0] if self.reference is not None else None

    @property
    def input_key(self) -> str:
        """What makes two examples "the same input" for splitting: the prompt (or the whole text for text data)."""
        return self.text if self.prompt_end is None else self.text[: self.prompt_end]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    text: str
    origin: str
    truncated: bool
    rendered: Rendered | None = None


def _first_key(fields: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in fields), None)


def detect_format(source: Source) -> str:
    """The format of one source, from the fields of its first record (every record is checked later)."""
    if source.kind == "text":
        return "text"
    fields = source.records[0].fields
    if "messages" in fields:
        return "chat"
    if _first_key(fields, INSTRUCTION_KEYS) and _first_key(fields, OUTPUT_KEYS):
        return "instruction"
    if "text" in fields:
        return "text"
    raise InputError(
        f"cannot tell the format of {source.name}: its first record has fields {sorted(fields)}; expected 'text', "
        "'instruction'+'output' (or 'response'), or 'messages'; rename the columns or pass --format"
    )


def check_columns(source: Source, fmt: str) -> None:
    """Refuse a source that lacks the columns ``fmt`` needs, naming what it has."""
    fields = source.records[0].fields
    if fmt == "text":
        missing = [] if "text" in fields else ["text"]
    elif fmt == "chat":
        missing = [] if "messages" in fields else ["messages"]
    else:
        missing = [f"{'/'.join(keys)}" for keys in (INSTRUCTION_KEYS, OUTPUT_KEYS) if not _first_key(fields, keys)]
    if missing:
        raise InputError(
            f"{source.name} lacks column(s) {', '.join(missing)} needed for --format {fmt} "
            f"(it has {', '.join(sorted(fields)) or 'none'}); rename the columns or choose another --format"
        )


def _str_field(record: RawRecord, key: str, *, required: bool = True) -> str:
    value = record.fields.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not text"
        raise InputError(f"{record.origin}: field {key!r} is {what}; every example needs it as a string")
    return value


def _template_render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_chat(tokenizer, messages: Any, origin: str) -> Rendered:
    """Render with the chat template; each assistant turn (with its end-of-turn marker) is a loss span."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{origin}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InputError(f"{origin}: message {i} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{origin}: the conversation has no assistant message, so nothing would be learned from it")
    full = _template_render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _template_render(tokenizer, messages[:i], True)
        upto = _template_render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise InputError(
                f"{origin}: the tokenizer's chat template does not render conversations incrementally (the prompt "
                "is not a prefix of the full text), so the response tokens cannot be located; use a standard template"
            )
        spans.append((len(prompt), len(upto)))
    last = next(m for m in reversed(messages) if m["role"] == "assistant")
    return Rendered(full, spans, origin, reference=last["content"])


def instruction_messages(record: RawRecord) -> list[dict]:
    instruction = _str_field(record, _first_key(record.fields, INSTRUCTION_KEYS) or "instruction")
    extra_key = _first_key(record.fields, INPUT_KEYS)
    extra = _str_field(record, extra_key, required=False) if extra_key else ""
    output = _str_field(record, _first_key(record.fields, OUTPUT_KEYS) or "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def render_record(record: RawRecord, fmt: str, tokenizer) -> Rendered:
    if fmt == "text":
        text = _str_field(record, "text")
        return Rendered(text, [(0, len(text))], record.origin)
    if fmt == "chat":
        return render_chat(tokenizer, record.fields.get("messages"), record.origin)
    messages = instruction_messages(record)
    if has_chat_template(tokenizer):
        return render_chat(tokenizer, messages, record.origin)
    user, answer = messages[0]["content"], messages[1]["content"]
    prompt = f"{ALPACA_PROMPT}### Instruction:\n{user}\n\n### Response:\n"
    eos = tokenizer.eos_token or ""
    text = prompt + answer + eos
    return Rendered(text, [(len(prompt), len(text))], record.origin, reference=answer)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def tokenize_rendered(rendered: Rendered, fmt: str, tokenizer, max_length: int) -> Tokenized:
    """Token ids and labels (-100 outside loss spans), truncated on the right to ``max_length``."""
    if fmt == "text":
        enc = tokenizer(rendered.text, add_special_tokens=True)
        ids = list(enc["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        labels = list(ids)
    else:
        enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = []
        for tok, (start, end) in zip(ids, enc["offset_mapping"]):
            inside = any(s <= start and end <= e and end > start for s, e in rendered.loss_spans)
            labels.append(tok if inside else IGNORE_INDEX)
    truncated = len(ids) > max_length
    return Tokenized(ids[:max_length], labels[:max_length], rendered.text, rendered.origin, truncated, rendered)


def tokenize_prepped(text: str, prompt_end: int, tokenizer) -> Tokenized:
    """A prep record's rendered ``text`` tokenized whole, exactly as :func:`tokenize_rendered` does for training,
    with its answer span ``[prompt_end, len(text))`` as the labels (nothing truncated): the one way evaluation,
    calibration and benches read back what training saw."""
    return tokenize_rendered(Rendered(text, [(prompt_end, len(text))], "", reference=""), "chat", tokenizer,
                             max_length=10**9)


def prompt_token_ids(text: str, prompt_end: int, tokenizer) -> list[int]:
    """The prompt of a rendered example as training saw it: the ids of ``text`` before its first answer token.

    ``text`` is tokenized whole (:func:`tokenize_prepped`) and cut before the first token that lies inside the
    answer span ``[prompt_end, len(text))`` — so a BPE merge across the boundary gives the same prompt ids here as
    there.
    """
    tok = tokenize_prepped(text, prompt_end, tokenizer)
    first = next((i for i, label in enumerate(tok.labels) if label != IGNORE_INDEX), len(tok.labels))
    return tok.input_ids[:first]
