"""``check``: the validation gate that accepts or rejects a candidate model against its baseline.

degradation = ppl(candidate) / ppl(baseline) − 1, with both perplexities measured in this one process by the same
method on the same token stream (tokenized once with the baseline's tokenizer). A check passes when its
degradation ≤ its threshold; the verdict passes when every check passes. Extra checks (each task's own
validation split, a general-text set) carry their own thresholds and are all reported.

Both models are loaded together and every window goes through both in turn, so the same logits give both
perplexities (identical to separate runs) *and* the distribution check: per-token KL(p_baseline ‖ p_candidate)
(mean, p99, max) and top-1 agreement, without a second pass over the data. ``max_kl`` (None = report only) fails
a check whose mean KL exceeds it. Holding both models costs the memory of two models.

Order of work is chosen so that bad input fails in seconds and writes nothing: thresholds, output path,
tokenizers, data length are all checked before any weights are loaded.
"""

from __future__ import annotations

import gc
import math
import os
import time
from pathlib import Path

import lorakit
from lorakit.errors import InputError
from lorakit.evaluate.core import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, PerplexityResult, method_of, perplexity_pair
from lorakit.evaluate.loading import describe_model, load_eval_model, load_tokenizer, model_digest
from lorakit.evaluate.text import EvalTokens, read_eval_texts, tokenize_eval_texts, tokenizer_digest
from lorakit.evaluate.windows import check_window_params, plan_windows
from lorakit.gate.report import render_markdown, render_png
from lorakit.gate.verdict import (  # noqa: F401  (read_verdict and the constants: re-exported by lorakit.gate)
    BOUNDARY_TOLERANCE, CHECK_KINDS, DEFAULT_MAX_DEGRADATION, DEFAULT_MAX_KL, GATE_JSON, GATE_MD, GATE_PNG,
    CheckResult, CheckSpec, Verdict, read_verdict,
)
from lorakit.io.atomic import atomic_dir, check_output_free, write_json
from lorakit.progress import emit
from lorakit.scorecard.judge import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MAX_GENERAL_FORGETTING, DEFAULT_MIN_RETENTION


def degradation_of(baseline_ppl: float, candidate_ppl: float) -> float:
    return candidate_ppl / baseline_ppl - 1.0


def judge(baseline_ppl: float, candidate_ppl: float, max_degradation: float) -> tuple[float, bool]:
    """(degradation, passed): passes when degradation ≤ threshold, the boundary included.

    The ratio is a float: a candidate exactly 5% worse computes as 0.05000000000000004. Differences below
    ``BOUNDARY_TOLERANCE`` (far below any perplexity's precision) count as the boundary, so it passes.
    """
    d = degradation_of(baseline_ppl, candidate_ppl)
    return d, bool(d <= max_degradation + BOUNDARY_TOLERANCE)


def _check_threshold(value: float, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"threshold of check {name!r} ({value!r}) is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"threshold of check {name!r} is {value}; pass a finite fraction ≥ 0, e.g. 0.05 for 5%")
    return value


def _data_label(data) -> str:
    return "<list>" if isinstance(data, list) else str(data)


def check(
    baseline: str | os.PathLike[str] | None,
    candidate: str | os.PathLike[str],
    data: str | os.PathLike[str] | list[str],
    *,
    max_degradation: float = DEFAULT_MAX_DEGRADATION,
    max_kl: float | None = DEFAULT_MAX_KL,
    extra_checks: list[CheckSpec] | tuple[CheckSpec, ...] = (),
    output: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    split: str = "val",
    quant_path: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
    scorecard: str | os.PathLike[str] | dict | None = None,
    min_retention: float | None = DEFAULT_MIN_RETENTION,
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
    max_general_forgetting: float | None = DEFAULT_MAX_GENERAL_FORGETTING,
    primary_name: str = "primary",
) -> Verdict:
    """Measure baseline and candidate on every check and decide; write gate.json/.md/.png to ``output``.

    ``base`` is the base model for adapter folders among baseline/candidate whose recorded base should be
    overridden. Raises :class:`InputError` on bad input (nothing written); a rejection is *not* an exception:
    inspect ``Verdict.passed`` (the CLI turns it into exit code 3).

    ``scorecard`` (a scorecard.json, its folder, or its content; ``lorakit.scorecard``) adds the release checks
    ``min_retention`` and ``max_accuracy_drop`` (None = not judged), judged on its val split, and
    ``max_general_forgetting`` (merged vs base on its general text); it must have been
    built for this baseline (its merged model) and candidate (its quantized model). ``primary_name`` names the
    check on ``data`` in the verdict (the release names it after its task).
    """
    start = time.perf_counter()
    stride = seq_len if stride is None else stride
    check_window_params(seq_len, stride)
    if max_kl is not None:
        max_kl = _check_threshold(max_kl, "max KL")
    specs = [CheckSpec(primary_name, data, _check_threshold(max_degradation, primary_name), "primary", split)]
    for spec in extra_checks:
        if spec.kind not in CHECK_KINDS[1:]:
            raise InputError(f"check {spec.name!r} has kind {spec.kind!r}; use task or general")
        specs.append(CheckSpec(spec.name, spec.data, _check_threshold(spec.max_degradation, spec.name), spec.kind,
                               spec.split, spec.max_tokens))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputError(f"check names must be unique, got {names}")
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        check_output_free(out_dir, force)
    card, card_checks = _scorecard_checks(scorecard, baseline, candidate, base, min_retention, max_accuracy_drop,
                                          max_general_forgetting)

    from lorakit.compute import dtype_name, resolve_compute_dtype
    from lorakit.runtime import resolve_device

    # Resolved once for both models (auto = float32 for the gate: a verdict must not depend on the CPU).
    compute_dtype = dtype_name(resolve_compute_dtype(dtype, "gate", resolve_device(device)))
    base_spec, cand_spec = describe_model(baseline, base=base), describe_model(candidate, base=base)
    base_tok, cand_tok = load_tokenizer(base_spec), load_tokenizer(cand_spec)
    if tokenizer_digest(base_tok) != tokenizer_digest(cand_tok):
        raise InputError(
            f"candidate {cand_spec.folder} has a different tokenizer than baseline {base_spec.folder} "
            f"(vocab {len(cand_tok)} vs {len(base_tok)}); the gate compares models over one token stream — "
            "compare a candidate derived from this baseline"
        )
    streams: dict[str, EvalTokens] = {}
    for spec in specs:
        try:
            cap = max_tokens if spec.max_tokens is None else spec.max_tokens
            tokens = tokenize_eval_texts(read_eval_texts(spec.data, spec.split), base_tok, max_tokens=cap)
            plan_windows(int(tokens.ids.numel()), seq_len, stride, source=f"evaluation data {tokens.texts.source}")
        except InputError as exc:
            raise InputError(f"check {spec.name!r}: {exc}") from None
        streams[spec.name] = tokens

    loaded = {role: load_eval_model(spec_, quant_path=quant_path, device=device, dtype=compute_dtype, tokenizer=tok,
                                    stage="gate")
              for role, spec_, tok in (("baseline", base_spec, base_tok), ("candidate", cand_spec, cand_tok))}
    models = {role: {**m.describe(), "digest": model_digest(m.spec)} for role, m in loaded.items()}
    checks: list[CheckResult] = []
    for spec in specs:
        tokens = streams[spec.name]
        reused = _scorecard_pair(card, models, loaded, tokens, seq_len, stride, batch_size) \
            if spec.kind == "general" else None
        if reused is not None:
            b, c = PerplexityResult.from_dict(reused["merged"]), PerplexityResult.from_dict(reused["quantized"])
            distribution, measured_in = reused["distribution"], "scorecard"
            if progress:
                emit(f"gate {spec.name}: the scorecard measured this pair on the same tokens, windows and dtype "
                     f"(ppl {b.ppl:.4g} / {c.ppl:.4g}); not measured again")
        else:
            pair = perplexity_pair(loaded["baseline"], loaded["candidate"], tokens, seq_len=seq_len, stride=stride,
                                   batch_size=batch_size, progress=progress, desc=f"gate {spec.name}")
            b, c, distribution, measured_in = pair.baseline, pair.candidate, pair.distribution.to_dict(), None
        d, ok = judge(b.ppl, c.ppl, spec.max_degradation)
        kl_ok = max_kl is None or distribution["kl_mean"] <= max_kl + BOUNDARY_TOLERANCE
        checks.append(CheckResult(spec.name, spec.kind, _data_label(spec.data), spec.max_degradation, b.ppl, c.ppl,
                                  d, ok and kl_ok, b.tokens, b.method, b.to_dict(), c.to_dict(),
                                  distribution=distribution, max_kl=max_kl, measured_in=measured_in))
    del loaded
    gc.collect()

    verdict = Verdict(
        passed=all(c.passed for c in checks) and all(c.passed for c in card_checks),
        degradation=checks[0].degradation,
        max_degradation=checks[0].max_degradation, checks=checks, baseline=models["baseline"],
        candidate=models["candidate"],
        params={"seq_len": seq_len, "stride": stride, "max_tokens": max_tokens, "batch_size": batch_size,
                "split": split, "quant_path": quant_path, "device": device, "dtype": dtype,
                "compute_dtype": compute_dtype, "max_kl": max_kl,
                "rule": "degradation = ppl(candidate)/ppl(baseline) - 1; a check passes when degradation <= threshold",
                "boundary_tolerance": BOUNDARY_TOLERANCE},
        versions=_versions(), wall_s=round(time.perf_counter() - start, 3),
        scorecard_checks=[c.to_dict() for c in card_checks], scorecard=card,
    )
    if card is not None:
        verdict.params.update(min_retention=min_retention, max_accuracy_drop=max_accuracy_drop,
                              max_general_forgetting=max_general_forgetting)
    verdict.metadata = verdict.to_dict()
    if out_dir is not None:
        with atomic_dir(out_dir, force=force) as tmp:
            write_json(tmp / GATE_JSON, verdict.metadata)
            (tmp / GATE_MD).write_text(render_markdown(verdict), encoding="utf-8")
            render_png(verdict, tmp / GATE_PNG)
            if card is not None:  # the judged scorecard travels with the verdict (registry metadata, report)
                from lorakit.scorecard import SCORECARD_JSON, SCORECARD_PNG
                from lorakit.scorecard.report import render_png as render_scorecard_png

                write_json(tmp / SCORECARD_JSON, card)
                render_scorecard_png(card, tmp / SCORECARD_PNG)
        verdict.output = out_dir
    return verdict


def _scorecard_checks(scorecard, baseline, candidate, base, min_retention, max_accuracy_drop, max_general_forgetting):
    """(scorecard content, its judged checks), or (None, []) without one; refuses a scorecard of other models."""
    from lorakit.scorecard import judge_scorecard, read_scorecard

    if scorecard is None:
        return None, []
    card = dict(scorecard) if isinstance(scorecard, dict) else read_scorecard(scorecard)
    for role, ref, key in (("baseline", baseline, "merged"), ("candidate", candidate, "quantized")):
        recorded = (card.get("models") or {}).get(key)
        if recorded is None:
            continue  # a scorecard without a quantized model judges retention only
        folder = describe_model(ref, base=base).folder
        if Path(recorded["folder"]).resolve() != Path(folder).resolve():
            raise InputError(f"the scorecard was built for {key} model {recorded['folder']}, but the gate's {role} is "
                             f"{folder}; build the scorecard for these models (lorakit scorecard)")
    return card, judge_scorecard(card, min_retention=min_retention, max_accuracy_drop=max_accuracy_drop,
                                 max_general_forgetting=max_general_forgetting)


def _scorecard_pair(card: dict | None, models: dict[str, dict], loaded: dict, tokens: EvalTokens, seq_len: int,
                    stride: int, batch_size: int) -> dict | None:
    """The scorecard's general-text pair (merged vs quantized, one pass) when it measured exactly what this gate
    would: the same two models (content digests) loaded the same way (path, device, dtype), the same method (token
    stream, windows, dtype) and batch size; else None."""
    pair = ((card or {}).get("general_text") or {}).get("pair")
    if not pair:
        return None
    for role, key in (("baseline", "merged"), ("candidate", "quantized")):
        measured, here = pair["models"][key], loaded[role]
        if measured["digest"] != models[role]["digest"] or (measured["path_used"], measured["device"],
                                                             measured["dtype"]) != (here.path_used, str(here.device),
                                                                                    here.dtype):
            return None
    windows = plan_windows(int(tokens.ids.numel()), seq_len, stride, source=f"evaluation data {tokens.texts.source}")
    method = method_of(tokens, seq_len, stride, loaded["baseline"].dtype, windows)
    if pair["merged"]["method"] != method or not \
            pair["merged"]["batch_size"] == pair["quantized"]["batch_size"] == batch_size:
        return None
    return pair


def _versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"lorakit": lorakit.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "gptqmodel", "optimum"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # not installed: nothing to record
            pass
    return out
