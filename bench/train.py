"""Training benchmark: packing vs padding and nf4 vs none on the same data and model, in one run.

Each configuration trains in its own subprocess (so peak RSS is that configuration's own), on the same prepared
data (bundled reverse-words + number-words) and the same tiny random Llama. Reported per configuration: median
step time and tokens/s (first step excluded: warm-up), padding fraction, peak RSS, and the adapter's gain on the
validation split (response-token perplexity of base vs base+adapter). Ratios are against packed nf4 from the
same run. Usage: ``python bench/train.py [--steps N]`` -> bench/results/train.json.

``python bench/train.py --memory`` measures instead the peak RSS of one QLoRA step of 8 packed rows x 256 tokens on
SmolLM2-135M (NF4), with the loss computed only at labelled positions (lorakit's loss) and, for comparison, from
full-vocabulary logits at every position (the earlier loss, kept here as ``full_logits_loss_sum``),
with gradient checkpointing off (the CPU default) and on, in float32 compute. Each configuration runs in its own process under GNU time; a watchdog ends a
run whose RSS passes ``--rss-cap-gib`` (a shared machine must not be driven out of memory), recorded as such. The
results go to the ``memory`` key of bench/results/train.json and the "train-memory" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = [("packed", "nf4"), ("packed", "none"), ("padded", "nf4"), ("padded", "none")]


def val_perplexity(base: Path, prep: Path, adapter: Path | None, max_rows: int | None = None) -> float:
    """exp(mean NLL) over the validation split's labelled (response) tokens, fp32 base (+ adapter); the first
    ``max_rows`` rows only when given."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.train.batches import load_rows, model_inputs

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    rows = load_rows(prep, "val")
    count = len(rows) if max_rows is None else min(max_rows, len(rows))
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, count, 8):
            idx = torch.arange(start, min(start + 8, count))
            logits = model(**model_inputs(rows, idx, "cpu"), use_cache=False).logits[:, :-1].float()
            labels = rows.labels[idx][:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                           ignore_index=-100, reduction="sum"))
            n += int((labels != -100).sum())
    return math.exp(nll / n)


def run_one(base: Path, prep: Path, quant: str, out: Path, steps: int) -> dict:
    from lorakit.runtime import configure_threads
    from lorakit.train import train_adapter

    configure_threads()
    t0 = time.perf_counter()
    res = train_adapter(prep, out, quant=quant, max_steps=steps, lr=5e-3, batch_size=4, grad_accum=1, r=16, alpha=32,
                        progress=False, checkpoint_every=None)
    wall = time.perf_counter() - t0
    log = res.log[1:]
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ppl_base = val_perplexity(base, prep, None)
    ppl_adapter = val_perplexity(base, prep, out)
    return {
        "quant": quant, "steps": steps, "wall_s": round(wall, 2),
        "median_step_s": statistics.median(e["step_time_s"] for e in log),
        "median_tokens_per_s": statistics.median(e["tokens_per_s"] for e in log),
        "peak_rss_mib": round(rss_mib, 1), "first_loss": res.log[0]["loss"], "final_loss": res.final_loss,
        "val_ppl_base": ppl_base, "val_ppl_adapter": ppl_adapter, "val_ppl_gain": 1 - ppl_adapter / ppl_base,
    }


def full_logits_loss_sum(model, rows, idx, device):
    """The loss before it was restricted to labelled positions: full-vocabulary float32 logits everywhere."""
    import torch

    from lorakit.train.batches import model_inputs

    logits = model(**model_inputs(rows, idx, device), use_cache=False).logits[:, :-1].float()
    labels = rows.labels[idx][:, 1:].to(device)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")


def _rss_watchdog(cap_bytes: int) -> None:
    """End this process (exit 75) when its resident set passes ``cap_bytes``."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def watch() -> None:
        while True:
            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * page
            if rss > cap_bytes:
                os._exit(75)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def memory_one(prep: Path, loss: str, dtype: str, gc: bool, out: Path, cap_gib: float) -> dict:
    from lorakit.runtime import configure_threads
    from lorakit.train import loop, train_adapter

    _rss_watchdog(int(cap_gib * (1 << 30)))
    configure_threads()
    if loss == "full":
        loop._batch_loss_sum = full_logits_loss_sum
    t0 = time.perf_counter()
    res = train_adapter(prep, out, quant="nf4", max_steps=1, batch_size=8, grad_accum=1, lr=1e-4, r=16, alpha=32,
                        compute_dtype=dtype, gradient_checkpointing=gc, min_loss_drop=None, progress=False,
                        checkpoint_every=None, force=True)
    return {"loss": loss, "compute_dtype": res.metadata["compute_dtype"], "gradient_checkpointing": gc,
            "step_s": res.log[0]["step_time_s"],
            "tokens": res.log[0]["tokens"], "train_loss": res.log[0]["loss"], "wall_s": round(time.perf_counter() - t0, 2)}


def memory_main(cap_gib: float) -> None:
    from bench.common import run_measured, update_readme_section
    from lorakit.compute import cpu_info
    from lorakit.data.prep import prepare_dataset
    from lorakit.models import ensure_default_model

    os.environ.setdefault("LORAKIT_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-train-mem-"))
    base = ensure_default_model()
    prep = work / "prep"
    prepare_dataset(["bundled:reverse-words", "bundled:number-words"], prep, max_length=256, pack=True, progress=False)
    rows = []
    dtype = "float32"  # what CPUs without fast bf16 use; the same on every machine
    for gc in (False, True):
        for loss in ("full", "labelled"):
            result = work / f"{loss}-{gc}.json"
            cmd = [sys.executable, __file__, "--memory-one", str(prep), loss, dtype, "gc" if gc else "no-gc",
                   str(work / f"ad-{loss}-{gc}"), str(result), "--rss-cap-gib", str(cap_gib)]
            try:
                measured = run_measured(cmd)
                row = {**json.loads(result.read_text()), "peak_rss_mib": round(measured["peak_rss_mib"], 1)}
            except RuntimeError as exc:
                if "(75)" not in str(exc):
                    raise
                row = {"loss": loss, "compute_dtype": dtype, "gradient_checkpointing": gc, "peak_rss_mib": None,
                       "note": f"ended by the watchdog above {cap_gib} GiB RSS"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = os.getloadavg()
    path = REPO / "bench" / "results" / "train.json"
    data = json.loads(path.read_text()) if path.exists() else {"benchmark": "train"}
    info = cpu_info()
    data["memory"] = {
        "what": "peak RSS of one QLoRA step (NF4, r 16, all-linear) of 8 packed rows x 256 tokens, batch_size 8, "
                "grad_accum 1, on SmolLM2-135M-Instruct, each configuration in its own process (GNU time %M); "
                "includes loading the model",
        "base": str(base), "date": time.strftime("%Y-%m-%d"), "cpu": info, "threads": int(os.environ["LORAKIT_THREADS"]),
        "platform": platform.platform(), "loadavg_at_end": [round(x, 2) for x in load], "rss_cap_gib": cap_gib,
        "results": rows,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    lines = ["## Training memory: loss at labelled positions vs full logits", "",
             f"`python bench/train.py --memory`: peak RSS of one QLoRA step of 8 packed rows x 256 tokens on "
             f"SmolLM2-135M (NF4), whole process including model load; {info['model']} ({', '.join(info['flags'])}), "
             f"{os.environ['LORAKIT_THREADS']} thread(s), load {load[0]:.1f} at the end.", "",
             "| loss | compute dtype | gradient checkpointing | peak RSS MiB | step s |", "|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] is not None else f"> {cap_gib:.0f} GiB (stopped)"
        lines.append(f"| {r['loss']} | {r['compute_dtype']} | {'on' if r['gradient_checkpointing'] else 'off'} | {rss} | "
                     f"{r.get('step_s', float('nan')):.1f} |")
    update_readme_section("train-memory", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--memory", action="store_true", help="Peak RSS of one 8 x 256-token step on SmolLM2-135M.")
    ap.add_argument("--rss-cap-gib", type=float, default=8.0, help="--memory: end a run above this RSS.")
    ap.add_argument("--one", nargs=4, metavar=("BASE", "PREP", "QUANT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-one", nargs=6, metavar=("PREP", "LOSS", "DTYPE", "GC", "OUT", "RESULT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_one:
        prep, loss, dtype, gc, out, result = args.memory_one
        row = memory_one(Path(prep), loss, dtype, gc == "gc", Path(out), args.rss_cap_gib)
        Path(result).write_text(json.dumps(row))
        return
    if args.memory:
        memory_main(args.rss_cap_gib)
        return
    if args.one:
        base, prep, quant, out = args.one
        print(json.dumps(run_one(Path(base), Path(prep), quant, Path(out), args.steps)))
        return

    os.environ.setdefault("LORAKIT_THREADS", "1")
    from lorakit.data.prep import prepare_dataset
    from lorakit.models.tiny import make_tiny_llama

    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-train-"))
    base = make_tiny_llama(work / "base", hidden_size=256, intermediate_size=512, num_layers=4, seed=0)
    preps, padding = {}, {}
    for layout in ("packed", "padded"):
        preps[layout] = work / f"prep-{layout}"
        res = prepare_dataset(["bundled:reverse-words", "bundled:number-words"], preps[layout], base=base,
                              max_length=256, pack=layout == "packed", progress=False)
        padding[layout] = res.counts["train"].padding_fraction
    results = []
    for layout, quant in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--one", str(base),
                               str(preps[layout]), quant, str(work / f"ad-{layout}-{quant}")],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(layout=layout, padding_fraction=padding[layout])
        results.append(row)
        print(json.dumps(row), flush=True)
    ref = results[0]
    for row in results:
        row["tokens_per_s_vs_packed_nf4"] = row["median_tokens_per_s"] / ref["median_tokens_per_s"]
        row["step_time_vs_packed_nf4"] = row["median_step_s"] / ref["median_step_s"]
    load = os.getloadavg()
    out = {
        "benchmark": "train", "model": "tiny random Llama (hidden 256, 4 layers, byte tokenizer)",
        "data": "bundled reverse-words + number-words, max_length 256, batch 4 rows, lr 5e-3, r 16",
        "device": "cpu", "threads": int(os.environ["LORAKIT_THREADS"]), "steps": args.steps,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": load,
                    "note": "shared 2-core machine, loaded by other jobs: compare ratios within this run only"},
        "results": results,
    }
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    path = REPO / "bench" / "results" / "train.json"
    if path.exists() and "memory" in (old := json.loads(path.read_text())):
        out["memory"] = old["memory"]  # written by --memory; kept
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
