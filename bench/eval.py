"""Evaluation benchmark, in one run on the same text and model (SmolLM2-135M-Instruct, the embedded default):

1. tokens/s of ``lorakit.evaluate.perplexity`` vs a plain transformers loop in the style of the Hugging Face
   perplexity guide (batch 1, ``model(input_ids, labels=...)`` per window) with the same windows; the two
   perplexities must agree (they define the same number);
2. the exact dequantized fast path vs the GPTQ kernel path (``from_pretrained`` with gptqmodel) on a GPTQ 4-bit
   g32 SmolLM2 made here with GPTQModel (g32 because the default CPU int4 kernel refuses g128 with K=576).

Both comparisons alternate the two sides in one process, ``--repeats`` times, and report medians.

Usage: python bench/eval.py [--repeats 3] [--max-tokens 2048] [--work bench/work/eval]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

STDLIB_MODULES = ["argparse", "json", "logging", "subprocess", "pathlib", "unittest", "asyncio", "sqlite3",
                  "threading", "collections", "functools", "itertools", "textwrap", "zipfile", "shutil", "csv"]
CALIB_MODULES = ["tarfile", "email", "http.client", "pickle", "socket", "decimal", "datetime", "string"]
SEQ_LEN, STRIDE = 512, 256


def docstrings(names: list[str]) -> list[str]:
    """English prose available on every machine: the module docstrings of Python's standard library."""
    import importlib

    return [importlib.import_module(n).__doc__ or "" for n in names]


def guide_loop(model, ids, seq_len: int, stride: int) -> tuple[float, int]:
    """The HF perplexity guide's sliding-window loop (batch 1, labels with -100), as users write it."""
    import torch

    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + seq_len, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids[:, 1:] != -100).sum().item()  # the model shifts labels left by one
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == ids.size(1):
            break
    return nll_sum, n_tokens


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def make_gptq(base: Path, out: Path, calib: list[str]) -> float:
    if (out / "config.json").exists():
        return float(json.loads((out / "bench_quantize.json").read_text())["seconds"])
    from gptqmodel import GPTQModel, QuantizeConfig

    start, cwd = time.perf_counter(), os.getcwd()
    os.chdir(out.parent)  # GPTQModel writes a ./logs/ folder into the working directory
    try:
        model = GPTQModel.load(str(base), QuantizeConfig(bits=4, group_size=32, sym=False, desc_act=False),
                               device="cpu")
        model.quantize(calib, batch_size=1)
        model.save(str(out))
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - start
    (out / "bench_quantize.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--work", default=str(BENCH / "work" / "eval"))
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from lorakit.evaluate import describe_model, load_eval_model, perplexity
    from lorakit.evaluate.text import EvalTexts, tokenize_eval_texts
    from lorakit.models import ensure_default_model
    from lorakit.runtime import configure_threads, quiet_third_party_logs

    threads = configure_threads()
    quiet_third_party_logs()
    hf_logging.disable_progress_bar()
    base = ensure_default_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    dense = load_eval_model(describe_model(base), device="cpu")
    tokens = tokenize_eval_texts(EvalTexts(docstrings(STDLIB_MODULES), "stdlib docstrings", "list", None),
                                 dense.tokenizer, max_tokens=args.max_tokens)
    ids = tokens.ids[None]

    # 1. lorakit vs the guide loop, same model object, same windows, alternating.
    ours, theirs = [], []
    for _ in range(args.repeats):
        res, t_ours = timed(lambda: perplexity(dense, tokens, seq_len=SEQ_LEN, stride=STRIDE, batch_size=4,
                                               progress=False))
        (nll, n), t_guide = timed(lambda: guide_loop(dense.model, ids, SEQ_LEN, STRIDE))
        ours.append(t_ours)
        theirs.append(t_guide)
    assert n == res.tokens, (n, res.tokens)
    guide_ppl = math.exp(nll / n)
    eval_rows = {
        "tokens_scored": res.tokens, "seq_len": SEQ_LEN, "stride": STRIDE,
        "lorakit": {"median_s": statistics.median(ours), "tokens_per_s": res.tokens / statistics.median(ours),
                    "ppl": res.ppl, "runs_s": ours, "batch_size": 4},
        "hf_guide_loop": {"median_s": statistics.median(theirs), "tokens_per_s": n / statistics.median(theirs),
                          "ppl": guide_ppl, "runs_s": theirs, "batch_size": 1},
        "ppl_relative_difference": abs(res.ppl / guide_ppl - 1),
    }
    eval_rows["speedup"] = eval_rows["hf_guide_loop"]["median_s"] / eval_rows["lorakit"]["median_s"]
    dense_ppl = res.ppl
    del dense

    # 2. GPTQ g32: dequantized fast path vs kernel path.
    calib_text = "\n\n".join(docstrings(CALIB_MODULES))
    calib = [calib_text[i:i + 1200] for i in range(0, min(len(calib_text), 1200 * 32), 1200)]
    quant_dir = work / "smollm2-gptq-g32"
    quant_s = make_gptq(base, quant_dir, calib)
    spec = describe_model(quant_dir)
    loaded, load_s, runs, last = {}, {}, {}, {}
    for path in ("dequantized", "kernel"):
        loaded[path], load_s[path] = timed(lambda: load_eval_model(spec, quant_path=path, device="cpu"))
        runs[path] = []
    for _ in range(args.repeats):  # alternate the two paths so machine load hits both alike
        for path in ("dequantized", "kernel"):
            last[path], t = timed(lambda: perplexity(loaded[path], tokens, seq_len=SEQ_LEN, stride=STRIDE,
                                                     batch_size=4, progress=False))
            runs[path].append(t)
    paths = {path: {"path_used": last[path].path_used, "load_s": load_s[path], "median_s": statistics.median(runs[path]),
                    "tokens_per_s": last[path].tokens / statistics.median(runs[path]), "ppl": last[path].ppl,
                    "runs_s": runs[path]} for path in runs}
    del loaded
    quant = {
        "model": "SmolLM2-135M-Instruct GPTQ 4-bit g32 asym (GPTQModel 7.6.0, CPU)", "quantize_s": quant_s,
        **paths, "speedup": paths["kernel"]["median_s"] / paths["dequantized"]["median_s"],
        "ppl_relative_difference": abs(paths["dequantized"]["ppl"] / paths["kernel"]["ppl"] - 1),
        "degradation_vs_dense": paths["dequantized"]["ppl"] / dense_ppl - 1,
    }

    load = os.getloadavg()
    results = {
        "benchmark": "eval", "date": time.strftime("%Y-%m-%d"),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": threads,
                    "loadavg_1m_at_end": round(load[0], 2),
                    "note": "2-core machine shared with other agents' work; absolute times are noisy, ratios are "
                            "from alternating runs in one process"},
        "text": {"source": "Python stdlib module docstrings", "tokens_total": int(tokens.ids.numel()),
                 "text_digest": tokens.texts.digest, "token_digest": tokens.token_digest},
        "repeats": args.repeats, "dense": eval_rows, "gptq": quant,
    }
    out = BENCH / "results" / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results)
    print(json.dumps(results, indent=2))


def write_readme(r: dict) -> None:
    d, q = r["dense"], r["gptq"]
    md = f"""## eval

`python bench/eval.py` — SmolLM2-135M-Instruct, {d['tokens_scored']} scored tokens of Python stdlib docstrings,
seq_len {d['seq_len']}, stride {d['stride']}, fp32, {r['machine']['torch_threads']} torch thread(s); median of
{r['repeats']} alternating runs in one process. Shared 2-core machine (load {r['machine']['loadavg_1m_at_end']}).

| route | tokens/s | median (s) | perplexity |
|---|---:|---:|---:|
| lorakit `perplexity` (batch 4, only scored logits) | {d['lorakit']['tokens_per_s']:.0f} | {d['lorakit']['median_s']:.2f} | {d['lorakit']['ppl']:.4f} |
| HF perplexity-guide loop (batch 1, `labels=`) | {d['hf_guide_loop']['tokens_per_s']:.0f} | {d['hf_guide_loop']['median_s']:.2f} | {d['hf_guide_loop']['ppl']:.4f} |
| *(second phase, alternating:)* | | | |
| GPTQ g32, dequantized fast path (`gptq-dequantized`) | {q['dequantized']['tokens_per_s']:.0f} | {q['dequantized']['median_s']:.2f} | {q['dequantized']['ppl']:.4f} |
| GPTQ g32, kernel path (`gptq-kernel`) | {q['kernel']['tokens_per_s']:.0f} | {q['kernel']['median_s']:.2f} | {q['kernel']['ppl']:.4f} |

lorakit is **{d['speedup']:.2f}x** the guide loop's speed (same number: relative difference
{d['ppl_relative_difference']:.1e}). The dequantized path is **{q['speedup']:.2f}x** the kernel path
(perplexity relative difference {q['ppl_relative_difference']:.1e}; load {q['dequantized']['load_s']:.1f} s vs
{q['kernel']['load_s']:.1f} s). GPTQ g32 degrades perplexity by {q['degradation_vs_dense'] * 100:+.1f}% on this
text (quantized in {q['quantize_s']:.0f} s). The two phases ran at different times on a machine shared with other
work, so compare times only within a phase (each alternates its two sides): the dequantized model does the same
dense compute as the fp32 model of phase one.
"""
    readme = BENCH / "README.md"
    start, end = "<!-- eval:start -->", "<!-- eval:end -->"
    block = f"{start}\n{md.strip()}\n{end}"
    text = readme.read_text() if readme.exists() else (
        "# Benchmarks\n\nEach section is written by its script in this folder; raw numbers are in `results/`.\n")
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


if __name__ == "__main__":
    main()
