"""``build_scorecard``: does the release still do every task? Base, adapter, merged and quantized, task by task.

For every task (a prepared-data folder and the adapter trained on it) and every split scored (``val``, the gate's
selection split, and ``test``, the held-out report; a folder without a test split reports ``val`` and says so,
``lorakit.data.splits.pick_report_split``), each model is measured twice:

- **task accuracy**: exact match and token F1 of greedy answers (``lorakit.evaluate.task_accuracy``, the same
  prompts, decoding and scoring as ``lorakit eval --tasks``); ``text`` data has no answers and is a labelled skip;
- **perplexity / mean NLL** of the split's rendered examples (``lorakit.evaluate.perplexity``, the gate's fixed
  method, on one token stream tokenized once with the base's tokenizer); ``max_examples`` caps both measurements
  to the same first examples, so NLL and exact match describe the same questions.

The models: the base, *that task's* adapter alone (PEFT on the base), the merged model and the quantized model.
With ``general`` (the release passes the gate's general text), every model's perplexity on it too: what each one
keeps of its language outside the tasks (an adapter or a merge can lose it as surely as a quantization can),
with each model's change against the base and the quantized model's against the merged one. The merged and
quantized models are scored on it in one pass (``lorakit.evaluate.perplexity_pair``: both perplexities, KL and
top-1 agreement from the same logits), the measurement the gate's general-text check makes: the gate reuses it
when the models, tokens, windows, dtype and batch size are the same, so the release scores general text once.
From those, per task and split: retention of the adapter's gain by the merged model, on exact match, F1 and NLL
(``lorakit.evaluate.retention``, the one definition), and the quantized model's accuracy drop vs the merged one.
The gate judges retention and that drop on val from a larger sample, ``judge_examples`` (default: every val
example): every model answers those, and the table's first ``max_examples`` are read off the same answers (their
prefix), so no question is generated twice (``judged`` in the split's entry: each model's exact match, retention
and the drop; the answers in predictions.json). At 50 questions one answer moves retention by about 2% of the
gain and the drop by 2 points, the whole width of the default bars.

Each model is loaded once and scores every task it applies to before the next one loads (one model in memory at
a time, except that the merged model stays loaded for the general-text pass with the quantized one, as in the
gate). Bad input (a missing split, a model whose tokenizer differs from the base's or from the one the data was
prepared with, an output that exists) fails before any weights load, and the output folder is written atomically:
``scorecard.json`` (every number, the decoding and perplexity settings, splits used, timings), ``predictions.json``
(every answer, for diffing models), ``scorecard.md`` and ``scorecard.png``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import InputError
from lorakit.evaluate.accuracy import (DEFAULT_GEN_BATCH_SIZE, DEFAULT_MARGIN, TaskAccuracy, TaskExamples,
                                       check_prep_tokenizer, read_task_examples, task_accuracy)
from lorakit.evaluate.core import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, METHOD_NAME, perplexity, perplexity_pair
from lorakit.evaluate.flips import answer_flips
from lorakit.evaluate.loading import ModelSpec, describe_model, load_eval_model, load_tokenizer, model_digest
from lorakit.evaluate.retention import retention
from lorakit.evaluate.text import EvalTokens, read_eval_texts, tokenize_eval_texts, tokenizer_digest
from lorakit.evaluate.windows import check_window_params, plan_windows
from lorakit.gate.general import DEFAULT_GENERAL_MAX_TOKENS, resolve_general_text
from lorakit.progress import emit
from lorakit.scorecard.judge import JUDGED_SPLIT
from lorakit.scorecard.options import SCORECARD

FORMAT = "lorakit-scorecard v1"
SCORECARD_JSON = "scorecard.json"
PREDICTIONS_JSON = "predictions.json"
SCORECARD_MD = "scorecard.md"
SCORECARD_PNG = "scorecard.png"
ROLES = ("base", "adapter", "merged", "quantized")


@dataclass(frozen=True)
class ScorecardTask:
    """One task of a release: its name, its prepared-data folder and the adapter trained on it."""

    name: str
    data: str | os.PathLike[str]
    adapter: str | os.PathLike[str]


@dataclass
class Scorecard:
    """The result: ``data`` is the content of scorecard.json; ``output`` the folder written (or None)."""

    data: dict[str, Any]
    predictions: dict[str, Any]
    output: Path | None = None

    @property
    def metadata(self) -> dict[str, Any]:  # the stages' common return shape (tasks.stages._out)
        return self.data


def _splits_of(task: ScorecardTask) -> tuple[list[str], str, str | None]:
    """(splits to score, the report split, its note): val always; test when the folder has one."""
    from lorakit.data.splits import pick_report_split

    report, note = pick_report_split(task.data)
    return (["val"] if report == "val" else ["val", report]), report, note


def build_scorecard(
    base: str | os.PathLike[str] | None,
    tasks: list[ScorecardTask],
    merged: str | os.PathLike[str],
    quantized: str | os.PathLike[str] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
    max_tokens: int | None = None,
    ppl_batch_size: int = DEFAULT_BATCH_SIZE,
    gen_batch_size: int = DEFAULT_GEN_BATCH_SIZE,
    margin: int = DEFAULT_MARGIN,
    max_examples: int | None = SCORECARD.max_examples,
    judge_examples: int | None = SCORECARD.judge_examples,
    case_insensitive: bool = False,
    strip_punctuation: bool = False,
    quant_path: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    general: str | os.PathLike[str] | None = None,
    general_max_tokens: int | None = DEFAULT_GENERAL_MAX_TOKENS,
    force: bool = False,
    progress: bool = True,
) -> Scorecard:
    """Score base, each task's adapter, merged and quantized on every task (see module docstring).

    ``general``: general text every model is also scored on (``"default"`` = lorakit's corpus; its first
    ``general_max_tokens`` tokens, as the gate reads it); None = not scored."""
    from lorakit.compute import dtype_name, resolve_compute_dtype
    from lorakit.io.atomic import check_output_free
    from lorakit.runtime import resolve_device

    start = time.perf_counter()
    stride = seq_len if stride is None else stride
    check_window_params(seq_len, stride)
    if not tasks:
        raise InputError("the scorecard needs at least one task (a prepared-data folder and its adapter)")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise InputError(f"task names must be unique, got {names}")
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        check_output_free(out_dir, force)

    # 1. Data: which splits, their examples (text data: a labelled skip), before any model is touched.
    plans: dict[str, dict[str, Any]] = {}
    for t in tasks:
        splits, report, note = _splits_of(t)
        plans[t.name] = {"splits": splits, "report": report, "note": note,
                         "examples": {s: read_task_examples(t.data, s, max_examples) for s in splits},
                         "judged": None}
        table = plans[t.name]["examples"][JUDGED_SPLIT]
        if table.skipped is None:
            judged = read_task_examples(t.data, JUDGED_SPLIT, judge_examples)
            if len(judged.records) > len(table.records):  # else the table's examples are the whole sample
                plans[t.name]["judged"] = judged

    # 2. Models and tokenizers: every one must share the base's tokenizer and the data's (checked without weights).
    specs: dict[str, ModelSpec] = {"base": describe_model(base)}
    for t in tasks:
        specs[f"adapter:{t.name}"] = describe_model(t.adapter, base=base)
        if specs[f"adapter:{t.name}"].kind != "adapter":
            raise InputError(f"the adapter of task {t.name} ({t.adapter}) is not a PEFT adapter folder "
                             "(no adapter_config.json); pass the adapter `lorakit train` wrote")
    specs["merged"] = describe_model(merged)
    if quantized is not None:
        specs["quantized"] = describe_model(quantized)
    tokenizers = {role: load_tokenizer(spec) for role, spec in specs.items()}
    want = tokenizer_digest(tokenizers["base"])
    for role, tok in tokenizers.items():
        if tokenizer_digest(tok) != want:
            raise InputError(f"{role} model {specs[role].tokenizer_folder} has a different tokenizer than the base "
                             f"{specs['base'].tokenizer_folder}; the scorecard scores every model on the same prompts "
                             "and tokens — pass models derived from this base")
    for t in tasks:
        for ex in plans[t.name]["examples"].values():
            check_prep_tokenizer(ex, tokenizers["base"], f"the base {specs['base'].folder}")

    # 3. Token streams for perplexity, one per task and split, tokenized once with the base's tokenizer.
    streams: dict[tuple[str, str], EvalTokens] = {}
    for t in tasks:
        for s in plans[t.name]["splits"]:
            try:
                texts = read_eval_texts(t.data, s, max_examples)  # perplexity on the examples exact match scores
                tokens = tokenize_eval_texts(texts, tokenizers["base"], max_tokens=max_tokens)
                plan_windows(int(tokens.ids.numel()), seq_len, stride, source=f"the {s} split of {t.data}")
            except InputError as exc:
                raise InputError(f"task {t.name}: {exc}") from None
            streams[(t.name, s)] = tokens
    general_path = resolve_general_text(general)
    general_stream = None
    if general_path is not None:
        try:
            general_stream = tokenize_eval_texts(read_eval_texts(general_path), tokenizers["base"],
                                                 max_tokens=general_max_tokens)
            plan_windows(int(general_stream.ids.numel()), seq_len, stride, source=f"general text {general_path}")
        except InputError as exc:
            raise InputError(f"general text: {exc}") from None

    dev = resolve_device(device)
    compute_dtype = dtype_name(resolve_compute_dtype(dtype, "eval", dev))
    acc_kw = dict(batch_size=gen_batch_size, margin=margin, case_insensitive=case_insensitive,
                  strip_punctuation=strip_punctuation, progress=progress)
    ppl_kw = dict(seq_len=seq_len, stride=stride, batch_size=ppl_batch_size, progress=progress)

    # 4. Each model once: load, score every (task, split) it applies to, free.
    scores: dict[tuple[str, str, str], dict[str, Any]] = {}  # (task, split, role) -> numbers
    predictions: dict[str, Any] = {t.name: {s: {} for s in plans[t.name]["splits"]} for t in tasks}
    decoding: dict[str, Any] = {}
    timings: dict[str, dict[str, Any]] = {}  # per model: load_s, score_s, path_used
    general_scores: dict[str, dict[str, Any]] = {}  # model key -> perplexity on the general text
    general_pair: dict[str, Any] = {"models": {}}  # merged vs quantized in one pass (the gate's general check)
    n_models = len(specs)
    for k, (key, spec) in enumerate(specs.items(), 1):
        role, _, only = key.partition(":")
        emit(f"scorecard: [{k}/{n_models}] loading {key} ({spec.folder})")
        t0 = time.perf_counter()
        loaded = load_eval_model(spec, quant_path=quant_path, device=device, dtype=compute_dtype,
                                 tokenizer=tokenizers[key], stage="eval")
        timings[key] = {"load_s": round(time.perf_counter() - t0, 3)}
        t1 = time.perf_counter()
        for t in tasks:
            if only and t.name != only:
                continue
            for s in plans[t.name]["splits"]:
                ppl = perplexity(loaded, streams[(t.name, s)], **ppl_kw)
                # every model answers the gate's sample: retention reads base/adapter/merged, the drop merged/quantized
                judged = plans[t.name]["judged"] if s == JUDGED_SPLIT else None
                if judged is None:
                    acc = task_accuracy(loaded, plans[t.name]["examples"][s], **acc_kw)
                else:
                    whole = task_accuracy(loaded, judged, **acc_kw)
                    acc = _first(whole, len(plans[t.name]["examples"][s].records))
                    sample = predictions[t.name][s]
                    sample.setdefault("judged", {})[role] = [p.exact for p in whole.predictions]
                    sample.setdefault("judged_answers", {})[role] = [p.prediction for p in whole.predictions]
                    sample["judged_reference"] = [p.reference for p in whole.predictions]
                    sample["judged_index"] = [p.index for p in whole.predictions]
                scores[(t.name, s, role)] = {"exact_match": acc.exact_match, "f1": acc.f1, "ppl": ppl.ppl,
                                             "mean_nll": ppl.mean_nll, "tokens": ppl.tokens,
                                             "n_examples": acc.n_examples, "path_used": loaded.path_used}
                if judged is not None:
                    scores[(t.name, s, role)]["judged"] = {"n_examples": whole.n_examples,
                                                           "exact_match": whole.exact_match}
                if acc.skipped is None:
                    decoding = decoding or {k2: v for k2, v in acc.decoding.items()
                                           if k2 not in ("stop_token_ids", "prefill_tokens")}
                    predictions[t.name][s][role] = [{"index": p.index, "prediction": p.prediction, "exact": p.exact}
                                                    for p in acc.predictions]
                    predictions[t.name][s]["reference"] = [p.reference for p in acc.predictions]
                emit(f"scorecard: {key} on {t.name} {s}: " + (
                    f"exact {acc.exact_match:.1%}, F1 {acc.f1:.3f}, " if acc.skipped is None else "accuracy skipped, ")
                    + f"ppl {ppl.ppl:.4g} ({acc.wall_s + ppl.wall_s:.1f} s)")
        if general_stream is not None and key == "merged" and quantized is not None:
            held = loaded  # scored on general text together with the quantized model, next
        elif general_stream is not None and key == "quantized":
            pair = perplexity_pair(held, loaded, general_stream, seq_len=seq_len, stride=stride,
                                   batch_size=ppl_batch_size, progress=progress, desc="scorecard general text")
            for role, m, r in (("merged", held, pair.baseline), ("quantized", loaded, pair.candidate)):
                general_scores[role] = {"ppl": r.ppl, "mean_nll": r.mean_nll, "tokens": r.tokens}
                general_pair["models"][role] = {"digest": model_digest(m.spec), "path_used": m.path_used,
                                                "device": str(m.device), "dtype": m.dtype}
            general_pair.update(merged=pair.baseline.to_dict(), quantized=pair.candidate.to_dict(),
                                distribution=pair.distribution.to_dict())
            emit(f"scorecard: merged and quantized on general text, one pass: ppl {pair.baseline.ppl:.4g} / "
                 f"{pair.candidate.ppl:.4g}, mean KL {pair.distribution.kl_mean:.4f} "
                 f"({pair.baseline.wall_s + pair.candidate.wall_s:.1f} s)")
            del held
        elif general_stream is not None:
            g = perplexity(loaded, general_stream, **ppl_kw)
            general_scores[key] = {"ppl": g.ppl, "mean_nll": g.mean_nll, "tokens": g.tokens}
            emit(f"scorecard: {key} on general text: ppl {g.ppl:.4g} ({g.wall_s:.1f} s)")
        timings[key]["score_s"] = round(time.perf_counter() - t1, 3)
        timings[key]["path_used"] = loaded.path_used
        del loaded

    data = {
        "format": FORMAT,
        "models": {"base": specs["base"].describe(), "merged": specs["merged"].describe(),
                   "quantized": specs["quantized"].describe() if quantized is not None else None,
                   "adapters": {t.name: specs[f"adapter:{t.name}"].describe() for t in tasks}},
        "tasks": {t.name: _task_entry(t, plans[t.name], scores, predictions[t.name],
                                           quantized is not None) for t in tasks},
        "task_order": names,  # JSON files are written with sorted keys; this keeps the caller's order
        "general_text": _general_entry(general_path, general_max_tokens, general_scores,
                                       general_pair if "distribution" in general_pair else None),
        "perplexity_method": {"name": METHOD_NAME, "seq_len": int(seq_len), "stride": int(stride),
                              "max_tokens": max_tokens, "batch_size": int(ppl_batch_size), "dtype": compute_dtype,
                              "tokenizer_digest": want},
        "decoding": decoding,
        "normalization": {"case_insensitive": bool(case_insensitive), "strip_punctuation": bool(strip_punctuation)},
        "params": {"max_examples": max_examples, "judge_examples": judge_examples,
                   "gen_batch_size": int(gen_batch_size), "margin": int(margin),
                   "quant_path": quant_path, "device": str(dev), "dtype": dtype, "compute_dtype": compute_dtype},
        "retention_definition": "(score_merged - score_base) / (score_adapter - score_base); for NLL on -NLL; "
                                "null when the adapter did not gain over the base (lorakit.evaluate.retention)",
        "timings": timings,
        "wall_s": round(time.perf_counter() - start, 3),
    }
    card = Scorecard(data, predictions)
    if out_dir is not None:
        write_scorecard(card, out_dir, force=force)
    # what was scored, not a second "done" line beside the release stage's own
    emit(f"scorecard: {n_models} model(s) x {len(tasks)} task(s) scored in {data['wall_s']:.1f} s")
    return card


def _general_entry(path: str | None, max_tokens: int | None, scores: dict[str, dict],
                   pair: dict[str, Any] | None) -> dict[str, Any] | None:
    """Every model's perplexity on the general text, and its change: vs the base, and quantized vs merged; with
    ``pair``, the merged and quantized models' one-pass measurement in full (both perplexity results, KL and
    top-1 agreement, what was loaded), which the gate's general-text check reuses instead of measuring again."""
    if path is None:
        return None

    def change(a: str, b: str) -> float | None:
        return scores[a]["ppl"] / scores[b]["ppl"] - 1 if a in scores and b in scores else None

    return {"source": path, "max_tokens": max_tokens, "models": scores,
            "vs_base": {key: change(key, "base") for key in scores if key != "base"},
            "quantized_vs_merged": change("quantized", "merged"), **({"pair": pair} if pair else {}),
            "definition": "ppl(model) / ppl(reference) - 1 on the same token stream; > 0 = worse"}


def _task_entry(task: ScorecardTask, plan: dict[str, Any], scores: dict, predictions: dict[str, Any],
                has_quantized: bool) -> dict[str, Any]:
    examples: dict[str, TaskExamples] = plan["examples"]
    entry = {"data": str(task.data), "adapter": str(task.adapter), "format": next(iter(examples.values())).format,
             "report_split": plan["report"], "report_note": plan["note"], "splits": {}}
    roles = [r for r in ROLES if r != "quantized" or has_quantized]
    for s in plan["splits"]:
        models = {r: scores[(task.name, s, r)] for r in roles}
        skipped = examples[s].skipped
        ret: dict[str, Any] = {}
        for metric, higher in (("exact_match", True), ("f1", True), ("nll", False)):
            field_ = "mean_nll" if metric == "nll" else metric
            if skipped is not None and metric != "nll":
                ret[metric] = None
                continue
            ret[metric] = retention(models["base"][field_], models["adapter"][field_], models["merged"][field_],
                                    higher_is_better=higher).to_dict()
        drop = None
        if has_quantized and skipped is None:
            drop = models["merged"]["exact_match"] - models["quantized"]["exact_match"]
        entry["splits"][s] = {"split": s, "note": plan["note"] if s == plan["report"] else None,
                              "n_examples": len(examples[s].records),
                              "accuracy_skipped": skipped, "models": models, "retention": ret,
                              "accuracy_drop": drop}
        judged = {r: models[r].pop("judged") for r in roles if "judged" in models[r]}
        if judged:
            entry["splits"][s]["judged"] = _judged_entry(judged, predictions[s])
    return entry


# Flipped answers kept in scorecard.json per task and direction (all of them stay in predictions.json): enough to
# see what quantization changes, few enough for a report.
FLIPPED_EXAMPLES = 20


def _judged_entry(judged: dict[str, dict[str, Any]], sample: dict[str, Any]) -> dict[str, Any]:
    """The gate's sample of one split: each model's exact match on it, the merged model's retention of the
    adapter's gain and the quantized model's drop (where there is a quantized model), with the answers behind the
    drop: how many the quantized model got wrong that the merged one got right (``lost``) and the reverse
    (``gained``), and McNemar's p-value of that split (``lorakit.evaluate.flips``). Quantization flips a few answers
    each way; 8 lost and 4 gained (p 0.39) is another release than 4 and 0 (p 0.125), though both are a 2-point drop
    on 200 questions. ``answers_lost`` / ``answers_gained`` show the first :data:`FLIPPED_EXAMPLES` of them (example
    index, reference, both models' answers), so a verdict can be checked by reading them. ``sample``: the split's
    predictions.json entry (``judged``: each model's right/wrong per judged question; ``judged_answers``,
    ``judged_reference``, ``judged_index``: the answers themselves)."""
    out: dict[str, Any] = {"n_examples": judged["merged"]["n_examples"],
                           **{r: j["exact_match"] for r, j in judged.items()}}
    out["retention"] = retention(out["base"], out["adapter"], out["merged"], higher_is_better=True).to_dict()
    if "quantized" in out:
        out["accuracy_drop"] = out["merged"] - out["quantized"]
        right = sample.get("judged", {})
        merged, quantized = right.get("merged"), right.get("quantized")
        if merged is not None and quantized is not None:
            out["answers_changed"] = answer_flips(merged, quantized).to_dict()
            answers = sample.get("judged_answers", {})
            if "merged" in answers and "quantized" in answers:
                for key, wanted in (("answers_lost", (True, False)), ("answers_gained", (False, True))):
                    out[key] = [{"index": sample["judged_index"][i], "reference": sample["judged_reference"][i],
                                 "merged": answers["merged"][i], "quantized": answers["quantized"][i]}
                                for i, pair in enumerate(zip(merged, quantized)) if pair == wanted][:FLIPPED_EXAMPLES]
    return out


def _first(acc: TaskAccuracy, n: int) -> TaskAccuracy:
    """``acc`` restricted to its first ``n`` examples (a larger run's prefix stands for the table's examples)."""
    from dataclasses import replace

    preds = acc.predictions[:n]
    return replace(acc, n_examples=n, exact_match=sum(p.exact for p in preds) / n,
                   f1=sum(p.f1 for p in preds) / n, predictions=preds)


def write_scorecard(card: Scorecard, output: str | os.PathLike[str], *, force: bool = False) -> Path:
    """scorecard.json, predictions.json, scorecard.md and scorecard.png, all or nothing (``atomic_dir``)."""
    from lorakit.io.atomic import atomic_dir, write_json
    from lorakit.scorecard.report import render_markdown, render_png

    out = Path(output)
    with atomic_dir(out, force=force) as tmp:
        write_json(tmp / SCORECARD_JSON, card.data)
        write_json(tmp / PREDICTIONS_JSON, card.predictions)
        (tmp / SCORECARD_MD).write_text(render_markdown(card.data), encoding="utf-8")
        render_png(card.data, tmp / SCORECARD_PNG)
    card.output = out
    return out


def read_scorecard(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The content of a scorecard.json (a file, or the folder holding one); bad input names the fix."""
    from lorakit.io.atomic import read_json

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / SCORECARD_JSON
    if not p.is_file():
        raise InputError(f"scorecard {path} does not exist; build one with `lorakit scorecard ... -o DIR` and pass "
                         f"DIR or DIR/{SCORECARD_JSON}")
    data = read_json(p, "scorecard")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tasks"), dict):
        raise InputError(f"{p} is not a lorakit scorecard ({FORMAT}); build one with `lorakit scorecard`")
    return data
