"""``task_accuracy``: does a model actually *do* the task? Greedy answers to held-out prompts, scored.

Perplexity of the answers (the gate) cannot see whether a model produces them: the default release's adapters
passed the gate while answering 0-7% of fresh questions right (NOTES). This module measures that directly:

1. The examples come from a prepared-data folder: by default its ``test`` split, which neither training,
   calibration nor the gate has read (``lorakit.data.splits.pick_report_split``; a folder without one is
   evaluated on ``val`` and the result says so in ``split_note``). ``text`` data has no answers and is skipped
   with a stated reason, never scored as 0.
2. Each prompt is the rendered example exactly as training saw it: the whole rendered text tokenized as prep
   tokenized it, cut before the first answer token (``lorakit.data.formats.prompt_token_ids``). For multi-turn
   chat that is every turn before the *last* assistant turn, which is the reference.
3. Greedy decoding, left-padded batches with the KV cache (the prompt tokens a batch shares, such as a chat
   template's system prompt and the instruction, run once: :func:`generate_greedy`), ``max_new_tokens`` =
   reference length in tokens + ``margin``; a sequence stops at EOS or at the end-of-turn token that follows answers in the rendered data;
   a batch stops when all its sequences have stopped. Every decoding setting is recorded.
4. Scores: exact match after normalisation and token-level F1 (``lorakit.evaluate.scoring``).

Results are plain dataclasses that serialise 1:1 to JSON (``to_dict``/``from_dict``), with every prediction, so
two models' answers can be compared example by example (:func:`diff_predictions`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import InputError
from lorakit.evaluate.loading import EvalModel, ModelSpec, describe_model, load_eval_model, load_tokenizer
from lorakit.evaluate.scoring import Normalization, exact_match, token_f1
from lorakit.evaluate.text import tokenizer_digest
from lorakit.progress import bar as progress_bar

DEFAULT_MARGIN = 8
# One decode step serves up to 128 prompts (batched by length): per-step overhead and weight reads dominate a small
# model's step, so the release's answers came 1.26x faster than at 32, every one identical
# (bench/results/gen_batch.json: total.speedup_vs_first.128). A large model's batch is cut further by KV_CACHE_BUDGET.
DEFAULT_GEN_BATCH_SIZE = 128
# Bytes the KV cache of one generation batch may take (its longest prompt plus answer, per sequence): the 135M default
# fits 128 prompts in it; a 7B model (over 100 KB of cache per token) gets far fewer instead of running out of memory.
KV_CACHE_BUDGET = 1 << 30


@dataclass
class TaskExamples:
    """The examples of one split of a prepared-data folder, with what task accuracy needs to know about them."""

    data: str
    split: str
    split_note: str | None  # set when the split is not the one asked for (no test split: val used)
    format: str
    records: list[dict]  # {"text", "prompt_end", "reference"} per example, in split order
    skipped: str | None = None  # why this data cannot be scored (text format: no answers)
    prep_tokenizer_dir: str | None = None
    _prep_digest: str | None = field(default=None, repr=False)  # cached by check_prep_tokenizer


@dataclass
class Prediction:
    index: int  # position in the split's texts file
    reference: str
    prediction: str
    exact: bool
    f1: float
    prompt_tokens: int
    generated_tokens: int  # up to and excluding the stop token
    stop: str  # "eos" (a stop token) | "length" (max_new_tokens reached)


@dataclass
class TaskAccuracy:
    """One model on one data split; ``exact_match``/``f1`` are None when ``skipped`` says why."""

    data: str
    split: str
    split_note: str | None
    format: str
    model: dict[str, Any]
    n_examples: int
    exact_match: float | None
    f1: float | None
    skipped: str | None
    decoding: dict[str, Any]
    normalization: dict[str, Any]
    wall_s: float
    examples_per_s: float
    generated_tokens_per_s: float
    predictions: list[Prediction] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskAccuracy:
        data = dict(data)
        preds = [Prediction(**p) for p in data.pop("predictions", [])]
        return cls(predictions=preds, **data)


def read_task_examples(data: str | os.PathLike[str], split: str | None = None,
                       max_examples: int | None = None) -> TaskExamples:
    """The examples task accuracy scores: ``split`` of the prep folder, or its test split (val if it has none)."""
    from lorakit.data.splits import PREP_META, SPLITS, pick_report_split, read_records
    from lorakit.io.atomic import read_json

    path = Path(data).expanduser()
    if not path.is_dir() or not (path / PREP_META).exists():
        raise InputError(f"task accuracy needs a prepared-data folder (from `lorakit prep`), got {data}: plain text "
                         "has no prompts and reference answers")
    meta = read_json(path / PREP_META, "prepared-data metadata")
    fmt = str(meta.get("format", "unknown"))
    if split is not None and split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    note = None
    if split is None:
        split, note = pick_report_split(path)
    tok_dir = (meta.get("tokenizer") or {}).get("model_dir")
    if fmt == "text":
        return TaskExamples(str(path), split, note, fmt, [], skipped="text-format data has no reference answers; "
                            "task accuracy needs instruction or chat data (skipped)", prep_tokenizer_dir=tok_dir)
    records = read_records(path, split)
    if not records:
        raise InputError(f"the {split} split of {path} is empty; re-run `lorakit prep` with a larger "
                         f"--{split}-fraction")
    if any("prompt_end" not in r or not isinstance(r.get("reference"), str) for r in records):
        raise InputError(f"{path} was prepared before lorakit recorded prompts and reference answers (no "
                         "'prompt_end'/'reference' in its texts); re-run `lorakit prep` on the same data")
    if max_examples is not None:
        if int(max_examples) < 1:
            raise InputError(f"--max-examples must be at least 1, got {max_examples}")
        records = records[: int(max_examples)]
    return TaskExamples(str(path), split, note, fmt, records, prep_tokenizer_dir=tok_dir)


def check_prep_tokenizer(examples: TaskExamples, tokenizer, who: str) -> None:
    """Refuse a model whose tokenizer differs from the one the data was rendered with (when it can be loaded)."""
    if examples._prep_digest is None:
        if not examples.prep_tokenizer_dir or not Path(examples.prep_tokenizer_dir).is_dir():
            return  # prepared on another machine: the models are still checked against each other
        from transformers import AutoTokenizer

        try:
            examples._prep_digest = tokenizer_digest(AutoTokenizer.from_pretrained(examples.prep_tokenizer_dir))
        except Exception:  # an unloadable recorded tokenizer is not this model's fault; nothing to compare with
            return
    if examples._prep_digest != tokenizer_digest(tokenizer):
        raise InputError(f"{who} has a different tokenizer than the one {examples.data} was prepared with "
                         f"({examples.prep_tokenizer_dir}); its prompts would be other tokens — evaluate models "
                         "derived from that base, or re-run `lorakit prep --base` with this model")


def stop_token_ids(tokenizer, model, examples: TaskExamples) -> list[int]:
    """EOS, the model's own generation EOS ids, and the special token that ends an answer in the rendered data
    (e.g. ``<|im_end|>`` of a chat template), read from the first example's text after its reference."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])):
        ids.add(int(i))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for rec in examples.records[:1]:
        after = rec["text"][rec["prompt_end"] + len(rec["reference"]):]
        if after:
            first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
            ids.update(i for i in first if i in special)
    return sorted(ids)


def kv_bytes_per_token(model) -> int:
    """Bytes one token adds to ``model``'s KV cache (keys and values of every layer), from its config; 0 when the
    config does not say (then only ``batch_size`` bounds a batch)."""
    cfg = getattr(model, "config", None)
    try:
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        layers = cfg.num_hidden_layers
    except (AttributeError, TypeError, ZeroDivisionError):
        return 0
    dtype = getattr(model, "dtype", torch.float32)
    size = torch.empty((), dtype=dtype).element_size() if dtype.is_floating_point else 4
    return int(layers * 2 * kv_heads * head_dim * size)


def generation_batches(order: list[int], prompts: list[list[int]], limits: list[int], batch_size: int,
                       token_bytes: int, budget: int | None = None) -> list[list[int]]:
    """``order`` (indices sorted by prompt length) cut into batches of at most ``batch_size`` whose KV cache, each
    sequence as long as the batch's longest prompt plus its largest answer limit, stays within ``budget`` bytes
    (default :data:`KV_CACHE_BUDGET`); a single prompt always makes a batch. Greedy answers do not depend on which
    prompts share a batch (bench/results/gen_batch.json: total.all_identical), so this changes time, not results."""
    budget = KV_CACHE_BUDGET if budget is None else budget
    batches: list[list[int]] = []
    current: list[int] = []
    longest_prompt = largest_limit = 0
    for i in order:
        tokens = max(longest_prompt, len(prompts[i])) + max(largest_limit, limits[i])  # per sequence, if i joins
        if current and (len(current) == batch_size or (len(current) + 1) * tokens * token_bytes > budget):
            batches.append(current)
            current, longest_prompt, largest_limit = [], 0, 0
        current.append(i)
        longest_prompt, largest_limit = max(longest_prompt, len(prompts[i])), max(largest_limit, limits[i])
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def generate_greedy(model, prompts: list[list[int]], limits: list[int], *, stop_ids: list[int], pad_id: int,
                    batch_size: int, device: torch.device, progress: Any = None, share_prefix: bool = True,
                    stats: dict[str, int] | None = None) -> list[tuple[list[int], str]]:
    """Greedy continuation of each prompt: (ids before the first stop token, "eos" | "length").

    Prompts are batched by length (less padding), left-padded with an attention mask, and decoded with the KV
    cache; each sequence is cut at its own ``limits[i]`` new tokens. With ``share_prefix``, the tokens every prompt
    of a batch begins with (a chat template's system prompt and the task's instruction) run once and their KV cache
    is repeated to the batch; the rest of each prompt is left-padded after it, so the padding sits between the two
    (masked, positions continue from the prefix): the same attention and positions, a shorter prefill.
    ``stats["prefill_tokens"]`` adds the prompt positions the model ran.
    """
    from transformers import GenerationConfig

    from lorakit.models.kv_cache import MIN_SHARED_PREFIX, common_prefix_len, generate_cache_kwarg, prompt_cache

    if int(batch_size) < 1:
        raise InputError(f"the generation batch size (--gen-batch-size; batch_size in Python) must be a positive "
                         f"integer, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[tuple[list[int], str]] = [([], "length")] * len(prompts)
    stops = set(stop_ids)
    for idx in generation_batches(order, prompts, limits, int(batch_size), kv_bytes_per_token(model)):
        batch = [prompts[i] for i in idx]
        # every prompt keeps one token after the prefix: its logits give the first new token
        p = min(common_prefix_len(batch), min(len(q) for q in batch) - 1) if share_prefix and len(idx) > 1 else 0
        p = p if p >= MIN_SHARED_PREFIX else 0
        width = max(len(q) for q in batch) - p
        ids = torch.full((len(idx), p + width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), p + width), dtype=torch.long)
        ids[:, :p], mask[:, :p] = torch.tensor(batch[0][:p]), 1
        for row, q in enumerate(batch):
            ids[row, p + width - (len(q) - p):] = torch.tensor(q[p:])
            mask[row, p + width - (len(q) - p):] = 1
        extra = {}
        if p:
            extra[generate_cache_kwarg()] = prompt_cache(model, ids[:1, :p].to(device), len(idx))
        if stats is not None:
            stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + p + len(idx) * width
        config = GenerationConfig(max_new_tokens=max(limits[i] for i in idx), do_sample=False, num_beams=1,
                                  eos_token_id=list(stop_ids), pad_token_id=pad_id, use_cache=True)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                              **extra)
        for row, i in enumerate(idx):
            new = seqs[row, p + width:].tolist()[: limits[i]]
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            out[i] = (new, "length") if cut is None else (new[:cut], "eos")
        if progress is not None:
            progress.update(len(idx))
    return out


def task_accuracy(
    model: str | os.PathLike[str] | EvalModel | None,
    data: str | os.PathLike[str] | TaskExamples,
    *,
    split: str | None = None,
    base: str | os.PathLike[str] | None = None,
    batch_size: int = DEFAULT_GEN_BATCH_SIZE,
    margin: int = DEFAULT_MARGIN,
    max_examples: int | None = None,
    case_insensitive: bool = False,
    strip_punctuation: bool = False,
    quant_path: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = True,
) -> TaskAccuracy:
    """Exact match and token F1 of ``model``'s greedy answers on a prepared-data folder (see module docstring).

    ``model``: an HF folder, a PEFT adapter folder (on its recorded base, or ``base``), a GPTQ/AWQ folder (the
    dequantized path on CPU), "default"/None, or a loaded :class:`EvalModel`. ``split`` None = test, or val with a
    ``split_note`` when the folder has no test split.
    """
    if int(margin) < 0:
        raise InputError(f"--margin must be ≥ 0 tokens, got {margin}")
    examples = data if isinstance(data, TaskExamples) else read_task_examples(data, split, max_examples)
    norm = Normalization(bool(case_insensitive), bool(strip_punctuation))
    if isinstance(model, EvalModel):
        spec: ModelSpec = model.spec
        tokenizer = model.tokenizer
    else:
        spec = describe_model(model, base=base)
        tokenizer = None
    if examples.skipped:
        return TaskAccuracy(examples.data, examples.split, examples.split_note, examples.format, spec.describe(), 0,
                            None, None, examples.skipped, {}, norm.to_dict(), 0.0, 0.0, 0.0)
    if tokenizer is None:
        tokenizer = load_tokenizer(spec)
    check_prep_tokenizer(examples, tokenizer, f"model {spec.folder}")
    loaded = model if isinstance(model, EvalModel) else load_eval_model(spec, quant_path=quant_path, device=device,
                                                                        dtype=dtype, tokenizer=tokenizer)
    return _score(loaded, examples, norm, batch_size=batch_size, margin=margin, progress=progress)


def _score(loaded: EvalModel, examples: TaskExamples, norm: Normalization, *, batch_size: int, margin: int,
           progress: bool) -> TaskAccuracy:
    from lorakit.data.formats import prompt_token_ids

    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise InputError(f"the tokenizer of {loaded.spec.tokenizer_folder} has neither a pad nor an EOS token")
    prompts = [prompt_token_ids(r["text"], int(r["prompt_end"]), tok) for r in examples.records]
    limits = [len(tok(r["reference"], add_special_tokens=False)["input_ids"]) + int(margin) for r in examples.records]
    stops = stop_token_ids(tok, loaded.model, examples)
    # lorakit's progress lines: timestamped, in the Prefect logs inside a stage, a bar on a terminal
    bar = progress_bar(total=len(prompts), desc=f"task accuracy {Path(str(loaded.spec.folder)).name}", unit="ex",
                       disable=not progress, leave=False)
    start, stats = time.perf_counter(), {}
    try:
        generated = generate_greedy(loaded.model, prompts, limits, stop_ids=stops, pad_id=int(pad_id),
                                    batch_size=batch_size, device=loaded.device, progress=bar, stats=stats)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    preds = []
    for i, (rec, prompt, (ids, stop)) in enumerate(zip(examples.records, prompts, generated)):
        text = tok.decode(ids, skip_special_tokens=True)
        preds.append(Prediction(i, rec["reference"], text, exact_match(text, rec["reference"], norm),
                                token_f1(text, rec["reference"], norm), len(prompt), len(ids), stop))
    n = len(preds)
    decoding = {"strategy": "greedy", "kv_cache": True, "padding": "left", "batch_size": int(batch_size),
                "kv_cache_budget_bytes": KV_CACHE_BUDGET,
                "batch_order": "by prompt length", "max_new_tokens": "reference tokens + margin",
                "margin": int(margin), "stop_token_ids": stops, "pad_token_id": int(pad_id), "dtype": loaded.dtype,
                "prompt": "rendered example as prep rendered it, cut before the first answer token",
                "shared_prefix": "a batch's common leading prompt tokens run once (KV cache), padding after them",
                "prefill_tokens": stats.get("prefill_tokens", 0)}
    n_generated = sum(len(ids) for ids, _ in generated)
    return TaskAccuracy(
        data=examples.data, split=examples.split, split_note=examples.split_note, format=examples.format,
        model=loaded.describe(), n_examples=n, exact_match=sum(p.exact for p in preds) / n,
        f1=sum(p.f1 for p in preds) / n, skipped=None, decoding=decoding, normalization=norm.to_dict(),
        wall_s=round(seconds, 4), examples_per_s=n / max(seconds, 1e-9),
        generated_tokens_per_s=n_generated / max(seconds, 1e-9), predictions=preds,
    )


def task_accuracies(models: list[str | os.PathLike[str] | None], data: str | os.PathLike[str], *,
                    split: str | None = None, base: str | os.PathLike[str] | None = None,
                    max_examples: int | None = None, **kwargs: Any) -> list[TaskAccuracy]:
    """:func:`task_accuracy` for several models on the same examples.

    Every model's tokenizer is checked (against the first model's and the data's) before any weights load, so a
    mismatch fails in seconds with nothing computed.
    """
    if not models:
        raise InputError("no model given; pass at least one model folder")
    examples = read_task_examples(data, split, max_examples)
    if examples.skipped:
        return [task_accuracy(m, examples, base=base, **kwargs) for m in models]
    specs = [describe_model(m, base=base) for m in models]
    tokenizers = [load_tokenizer(s) for s in specs]
    first = tokenizer_digest(tokenizers[0])
    for spec, tok in zip(specs, tokenizers):
        if tokenizer_digest(tok) != first:
            raise InputError(f"model {spec.folder} has a different tokenizer than {specs[0].folder}; task accuracy "
                             "compares models on the same prompts — compare models that share one tokenizer")
        check_prep_tokenizer(examples, tok, f"model {spec.folder}")
    results = []
    loader_args = {k: kwargs.pop(k) for k in ("quant_path", "device", "dtype") if k in kwargs}
    for spec, tok in zip(specs, tokenizers):
        loaded = load_eval_model(spec, tokenizer=tok, **loader_args)
        results.append(task_accuracy(loaded, examples, **kwargs))
        del loaded
    return results


def diff_predictions(a: TaskAccuracy, b: TaskAccuracy) -> list[int]:
    """Indices of the examples where two results (same data and split) predicted different text."""
    if (a.data, a.split, a.n_examples) != (b.data, b.split, b.n_examples):
        raise InputError(f"the results are on different data ({a.data}:{a.split}, {a.n_examples} examples vs "
                         f"{b.data}:{b.split}, {b.n_examples}); compare results of one data split")
    return [p.index for p, q in zip(a.predictions, b.predictions) if p.prediction != q.prediction]
