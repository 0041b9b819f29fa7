"""``perplexity``: one fixed, recorded method of measuring a causal LM's perplexity on evaluation text.

The number is defined by the token stream (``lorakit.evaluate.text``: baseline tokenizer, documents joined with
EOS), the windows (``lorakit.evaluate.windows``: ``seq_len``/``stride``) and the compute dtype; all of them are
recorded in ``PerplexityResult.method``. Two results are comparable only when their methods are equal.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lorakit.progress import bar as progress_bar

from lorakit.errors import InputError
from lorakit.evaluate.options import WINDOW
from lorakit.evaluate.loading import EvalModel, ModelSpec, describe_model, load_eval_model, load_tokenizer
from lorakit.evaluate.text import EvalTexts, EvalTokens, read_eval_texts, tokenize_eval_texts, tokenizer_digest
from lorakit.evaluate.windows import Window, batches, check_window_params, plan_windows

METHOD_NAME = "strided-window token-mean NLL v1"
DEFAULT_SEQ_LEN = WINDOW.seq_len
DEFAULT_BATCH_SIZE = 4


@dataclass
class PerplexityResult:
    """A perplexity and everything that defines it (``method``) and how it was computed."""

    ppl: float
    nll_sum: float
    tokens: int  # scored tokens
    mean_nll: float
    method: dict[str, Any]
    path_used: str
    model: dict[str, Any]
    batch_size: int
    n_windows: int
    wall_s: float
    tokens_per_s: float  # tokens fed through the model per second of scoring (load excluded)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerplexityResult:
        return cls(**data)


def method_of(tokens: EvalTokens, seq_len: int, stride: int, dtype: str, windows: list[Window]) -> dict[str, Any]:
    return {
        "name": METHOD_NAME,
        "seq_len": int(seq_len),
        "stride": int(stride),
        "dtype": dtype,
        "tokens_scored": sum(w.n_scored for w in windows),
        "n_windows": len(windows),
        **tokens.describe(),
    }


def check_tokenizer_matches(tokens: EvalTokens, digest: str, who: str) -> None:
    if digest != tokens.tokenizer_digest:
        raise InputError(
            f"{who} uses a different tokenizer than the baseline (digest {digest[:12]} vs "
            f"{tokens.tokenizer_digest[:12]}); perplexities over different token streams are not comparable — "
            "compare models that share the baseline's tokenizer"
        )


def _window_logits(model, inputs: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits at the scored positions of a batch of equal windows (``keep - 1`` of them; the last one is unused)."""
    return model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits[:, :-1, :]


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL, in float32 as perplexity has always computed it (so numbers stay comparable across versions)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")


@torch.inference_mode()
def score_windows(model, ids: torch.Tensor, windows: list[Window], *, batch_size: int, device: torch.device,
                  progress: bool = True, desc: str = "perplexity") -> tuple[float, int, float]:
    """Σ NLL (float64) and the number of scored tokens over ``windows``; also the seconds spent.

    Only the logits that score something are materialised (``logits_to_keep``), so memory stays at
    ``batch × stride × vocab`` for sliding windows instead of ``batch × seq_len × vocab``.
    """
    nll_sum, n_scored = 0.0, 0
    groups = batches(windows, batch_size)
    total_tokens = sum(w.length for w in windows)
    bar = progress_bar(total=total_tokens, unit="tok", desc=desc, disable=not progress, leave=False)
    start = time.perf_counter()
    try:
        for group in groups:
            first = group[0]
            inputs = torch.stack([ids[w.begin:w.end] for w in group]).to(device)
            logits = _window_logits(model, inputs, first.n_scored + 1)
            targets = inputs[:, first.score_from - first.begin:]
            nll_sum += float(_window_nll(logits, targets).to(torch.float64).sum())
            n_scored += targets.numel()
            bar.update(sum(w.length for w in group))
            bar.set_postfix_str(f"ppl {math.exp(nll_sum / n_scored):.3f}")  # the bar itself shows tok/s and ETA
    finally:
        bar.close()
    return nll_sum, n_scored, time.perf_counter() - start


@dataclass
class DistributionStats:
    """How far a candidate's next-token distributions are from the baseline's, over the scored tokens.

    ``kl_*``: KL(p_baseline ‖ p_candidate) per scored token, in nats (0 for identical models); ``p99`` is the
    linear-interpolation 99th percentile (``torch.quantile``). ``top1_agreement``: share of tokens where both
    models' most likely next token is the same. Computed from the same logits as the two perplexities.
    """

    tokens: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    definition: str = "KL(p_baseline || p_candidate) in nats per scored token; top-1 = argmax agreement"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairScores:
    """What one pass of two models over the same windows yields: each model's NLL sum and time, and their KL."""

    baseline_nll: float
    candidate_nll: float
    n_scored: int
    baseline_s: float
    candidate_s: float
    distribution: DistributionStats


def _kl_rows(base_logits: torch.Tensor, cand_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(p_b ‖ p_c) (float64) and top-1 agreement, one sequence at a time to bound memory."""
    kls, agree = [], []
    for b, c in zip(base_logits, cand_logits):
        lb, lc = F.log_softmax(b.float(), dim=-1), F.log_softmax(c.float(), dim=-1)
        kls.append((lb.exp() * (lb - lc)).sum(-1).to(torch.float64))
        agree.append(b.argmax(-1) == c.argmax(-1))
    return torch.cat(kls), torch.cat(agree)


@torch.inference_mode()
def score_windows_pair(baseline, candidate, ids: torch.Tensor, windows: list[Window], *, batch_size: int,
                       device: torch.device, candidate_device: torch.device | None = None, progress: bool = True,
                       desc: str = "perplexity") -> PairScores:
    """Baseline and candidate over the same windows in one pass: both NLL sums and KL/top-1 from the same logits.

    Each model sees exactly the batches :func:`score_windows` would feed it and its NLL is computed by the same
    code, so both perplexities are the numbers separate runs give; the distribution check costs no extra
    forward pass.
    """
    cand_dev = device if candidate_device is None else candidate_device
    sums, n_scored, seconds, kl_sum = [0.0, 0.0], 0, [0.0, 0.0], 0.0
    kls, agree = [], []
    bar = progress_bar(total=sum(w.length for w in windows), unit="tok", desc=desc, disable=not progress, leave=False)
    try:
        for group in batches(windows, batch_size):
            first = group[0]
            inputs = torch.stack([ids[w.begin:w.end] for w in group])
            targets = inputs[:, first.score_from - first.begin:]
            logits = []
            for k, (model, dev) in enumerate(((baseline, device), (candidate, cand_dev))):
                t0 = time.perf_counter()
                out = _window_logits(model, inputs.to(dev), first.n_scored + 1)
                sums[k] += float(_window_nll(out, targets.to(dev)).to(torch.float64).sum())
                seconds[k] += time.perf_counter() - t0
                logits.append(out.to("cpu") if dev.type != "cpu" else out)
            kl, same = _kl_rows(*logits)
            kls.append(kl)
            agree.append(same.reshape(-1))
            kl_sum += float(kl.sum())
            n_scored += targets.numel()
            bar.update(sum(w.length for w in group))
            bar.set_postfix_str(f"ppl {math.exp(sums[0] / n_scored):.3f} / {math.exp(sums[1] / n_scored):.3f}, "
                                f"KL {kl_sum / n_scored:.4f}")
    finally:
        bar.close()
    kl_all, agree_all = torch.cat(kls), torch.cat(agree)
    stats = DistributionStats(tokens=int(kl_all.numel()), kl_mean=float(kl_all.mean()),
                              kl_p99=float(torch.quantile(kl_all, 0.99)), kl_max=float(kl_all.max()),
                              top1_agreement=float(agree_all.double().mean()))
    return PairScores(sums[0], sums[1], n_scored, seconds[0], seconds[1], stats)


def prepare_tokens(data, tokenizer, *, max_tokens: int | None, split: str = "val") -> EvalTokens:
    if isinstance(data, EvalTokens):
        return data
    return tokenize_eval_texts(read_eval_texts(data, split), tokenizer, max_tokens=max_tokens)


def perplexity(
    model: str | os.PathLike[str] | EvalModel | None,
    data: str | os.PathLike[str] | list[str] | EvalTexts | EvalTokens,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    base: str | os.PathLike[str] | None = None,
    split: str = "val",
    quant_path: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    kernel_check_tokens: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` with lorakit's fixed method (see module docstring).

    ``model``: an HF folder, PEFT adapter folder (``base`` overrides its recorded base), GPTQ/AWQ folder, or an
    already loaded :class:`EvalModel`. ``data``: a prepared-data folder (its ``split``), a ``.jsonl``/text file,
    a list of documents, or :class:`EvalTokens` from the baseline of a comparison (then this model's tokenizer
    must be the same, or the call is refused). ``stride`` defaults to ``seq_len`` (non-overlapping windows).
    ``kernel_check_tokens``: for a quantized model on the dequantized path, also score the first N tokens with
    the installed kernels and record both perplexities in ``extra["kernel_check"]`` (evidence that the fast path
    computes the same model; ``agrees`` when their relative difference is ≤ 1e-3).
    """
    stride = seq_len if stride is None else stride
    check_window_params(seq_len, stride)
    if isinstance(model, EvalModel):
        loaded: EvalModel | None = model
        spec: ModelSpec = model.spec
        tokenizer = model.tokenizer
    else:
        loaded, spec = None, describe_model(model, base=base)
        tokenizer = load_tokenizer(spec)
    tokens = prepare_tokens(data, tokenizer, max_tokens=max_tokens, split=split)
    check_tokenizer_matches(tokens, tokenizer_digest(tokenizer), f"model {spec.folder}")
    windows = plan_windows(int(tokens.ids.numel()), seq_len, stride, source=f"evaluation data {tokens.texts.source}")
    if loaded is None:
        loaded = load_eval_model(spec, quant_path=quant_path, device=device, dtype=dtype, tokenizer=tokenizer)
    nll_sum, n_scored, seconds = score_windows(loaded.model, tokens.ids, windows, batch_size=batch_size,
                                               device=loaded.device, progress=progress,
                                               desc=f"ppl {Path(spec.folder).name}")
    extra = {}
    if kernel_check_tokens and loaded.path_used.endswith("-dequantized"):
        extra["kernel_check"] = kernel_check(loaded, tokens, int(kernel_check_tokens), seq_len, batch_size)
    return perplexity_result(loaded, tokens, windows, nll_sum, n_scored, seconds, seq_len=seq_len, stride=stride,
                             batch_size=batch_size, extra=extra)


def perplexity_result(loaded: EvalModel, tokens: EvalTokens, windows: list[Window], nll_sum: float, n_scored: int,
                      seconds: float, *, seq_len: int, stride: int, batch_size: int,
                      extra: dict[str, Any] | None = None) -> PerplexityResult:
    """The :class:`PerplexityResult` of an NLL sum measured on ``windows`` of ``tokens``."""
    mean = nll_sum / n_scored
    return PerplexityResult(
        ppl=math.exp(mean), nll_sum=nll_sum, tokens=n_scored, mean_nll=mean,
        method=method_of(tokens, seq_len, stride, loaded.dtype, windows), path_used=loaded.path_used,
        model=loaded.describe(), batch_size=int(batch_size), n_windows=len(windows), wall_s=round(seconds, 4),
        tokens_per_s=sum(w.length for w in windows) / max(seconds, 1e-9), extra=extra or {},
    )


def read_results(path: str | os.PathLike[str]) -> list[PerplexityResult]:
    """The results stored by ``lorakit eval --json``."""
    from lorakit.io.atomic import read_json

    data = read_json(path, "perplexity results")
    try:
        return [PerplexityResult.from_dict(r) for r in data["results"]]
    except (TypeError, KeyError) as exc:
        raise InputError(f"{path} is not a lorakit eval result file ({exc})") from None


KERNEL_CHECK_TOLERANCE = 1e-3


@dataclass
class PairResult:
    """Two models' perplexities on one token stream, measured in one pass, and how their next-token
    distributions differ there (KL(baseline || candidate), top-1 agreement)."""

    baseline: PerplexityResult
    candidate: PerplexityResult
    distribution: DistributionStats


def perplexity_pair(baseline: EvalModel, candidate: EvalModel, tokens: EvalTokens, *, seq_len: int, stride: int,
                    batch_size: int, progress: bool = True, desc: str = "perplexity") -> PairResult:
    """Both models over the same windows in one pass (:func:`score_windows_pair`): each perplexity is the number
    :func:`perplexity` gives that model alone, and the distribution check costs no extra forward pass."""
    windows = plan_windows(int(tokens.ids.numel()), seq_len, stride, source=f"evaluation data {tokens.texts.source}")
    pair = score_windows_pair(baseline.model, candidate.model, tokens.ids, windows, batch_size=batch_size,
                              device=baseline.device, candidate_device=candidate.device, progress=progress, desc=desc)
    common = dict(seq_len=seq_len, stride=stride, batch_size=batch_size)
    b = perplexity_result(baseline, tokens, windows, pair.baseline_nll, pair.n_scored, pair.baseline_s, **common)
    c = perplexity_result(candidate, tokens, windows, pair.candidate_nll, pair.n_scored, pair.candidate_s, **common)
    if b.method != c.method:  # same stream and params by construction; a mismatch is a lorakit bug
        raise RuntimeError(f"{desc}: baseline and candidate were measured with different methods")
    return PairResult(b, c, pair.distribution)


def kernel_check(dense: EvalModel, tokens: EvalTokens, n_tokens: int, seq_len: int, batch_size: int) -> dict:
    """Score the first ``n_tokens`` with the dequantized model and with the kernels; record the agreement."""
    n = min(n_tokens, int(tokens.ids.numel()))
    length = min(seq_len, n)
    windows = plan_windows(n, length, length, source="kernel check sample")
    kernel = load_eval_model(dense.spec, quant_path="kernel", device=str(dense.device), dtype=dense.dtype,
                             tokenizer=dense.tokenizer)
    ids = tokens.ids[:n]
    a, count, _ = score_windows(dense.model, ids, windows, batch_size=batch_size, device=dense.device, progress=False)
    b, _, _ = score_windows(kernel.model, ids, windows, batch_size=batch_size, device=kernel.device, progress=False)
    ppl_dense, ppl_kernel = math.exp(a / count), math.exp(b / count)
    rel = abs(ppl_dense / ppl_kernel - 1)
    return {"tokens": count, "seq_len": length, "ppl_dequantized": ppl_dense, "ppl_kernel": ppl_kernel,
            "kernel_path": kernel.path_used, "relative_difference": rel, "tolerance": KERNEL_CHECK_TOLERANCE,
            "agrees": rel <= KERNEL_CHECK_TOLERANCE}


def evaluate_models(
    models: list[str | os.PathLike[str]],
    data: str | os.PathLike[str] | list[str] | EvalTexts,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    base: str | os.PathLike[str] | None = None,
    split: str = "val",
    quant_path: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    kernel_check_tokens: int | None = None,
) -> list[PerplexityResult]:
    """Perplexity of several models on one token stream, tokenized once with the first model's tokenizer.

    Every model's tokenizer is checked against the first before any weights are loaded, and the windows are
    planned first too, so mismatched tokenizers or too-short data fail in seconds.
    """
    if not models:
        raise InputError("no model given; pass at least one model folder")
    stride = seq_len if stride is None else stride
    check_window_params(seq_len, stride)
    specs = [describe_model(m, base=base) for m in models]
    tokenizers = [load_tokenizer(s) for s in specs]
    tokens = prepare_tokens(data, tokenizers[0], max_tokens=max_tokens, split=split)
    for spec, tok in zip(specs[1:], tokenizers[1:]):
        check_tokenizer_matches(tokens, tokenizer_digest(tok), f"model {spec.folder}")
    plan_windows(int(tokens.ids.numel()), seq_len, stride, source=f"evaluation data {tokens.texts.source}")
    results = []
    for spec, tok in zip(specs, tokenizers):
        loaded = load_eval_model(spec, quant_path=quant_path, device=device, dtype=dtype, tokenizer=tok)
        results.append(perplexity(loaded, tokens, seq_len=seq_len, stride=stride, batch_size=batch_size,
                                  progress=progress, kernel_check_tokens=kernel_check_tokens))
        del loaded
    return results
