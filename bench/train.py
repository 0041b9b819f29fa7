"""Training benchmark: packing vs padding and nf4 vs none on the same data and model, in one run.

Each configuration trains in its own subprocess (so peak RSS is that configuration's own), on the same prepared
data (bundled reverse-words + number-words) and the same tiny random Llama. Reported per configuration: median
step time and tokens/s (first step excluded: warm-up), padding fraction, peak RSS, and the adapter's gain on the
validation split (response-token perplexity of base vs base+adapter). Ratios are against packed nf4 from the
same run. Usage: ``python bench/train.py [--steps N]`` -> bench/results/train.json.
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
    res = train_adapter(prep, out, quant=quant, max_steps=steps, lr=5e-3, batch_size=4, r=16, alpha=32,
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--one", nargs=4, metavar=("BASE", "PREP", "QUANT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
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
    (REPO / "bench" / "results" / "train.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
