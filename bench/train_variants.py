"""Training variants at a fixed small step budget: val loss and time per step for each, on the real default model.

SmolLM2-135M-Instruct (the embedded default) on the bundled reverse-words + number-words tasks prepared together
(max_length 256, packed). Every variant trains the same number of optimizer steps (default 8: real training on a
shared 2-core CPU is expensive, so this is a smoke-level comparison of cost and early progress, not of final
quality) with the same data order, lr, rank and batch, in its own process. The trained adapter is merged into the
base (LoftQ: into the dequantized NF4 base, ``--loftq-base dequantized``) and the merged model's loss on the
validation split's response tokens is reported next to the base's. Usage:
``python bench/train_variants.py [--steps N] [--val-rows N]`` -> bench/results/train_variants.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "lora (nf4)": dict(quant="nf4"),
    "lora+ x16 (nf4)": dict(quant="nf4", lora_plus_ratio=16),
    "dora (nf4)": dict(quant="nf4", variant="dora"),
    "loftq (nf4)": dict(quant="nf4", init="loftq"),
    "lora (none)": dict(quant="none"),
    "pissa (none)": dict(quant="none", init="pissa"),
    "olora (none)": dict(quant="none", init="olora"),
}
TRAIN = dict(lr=5e-4, r=16, alpha=32, batch_size=2, grad_accum=1, seed=0, min_loss_drop=None, checkpoint_every=None,
             progress=False, device="cpu")


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")
    return {"model": model, "flags": {f: f in flags for f in wanted}, "loadavg_at_start": os.getloadavg()}


def run_one(name: str, base: Path, prep: Path, work: Path, steps: int, val_rows: int) -> dict:
    from bench.train import val_perplexity
    from lorakit.merge import merge_adapters
    from lorakit.runtime import configure_threads
    from lorakit.train import train_adapter

    configure_threads()
    kw = VARIANTS[name]
    adapter, merged = work / "adapter", work / "merged"
    t0 = time.perf_counter()
    res = train_adapter(prep, adapter, base=base, max_steps=steps, **TRAIN, **kw)
    wall = time.perf_counter() - t0
    merge_kw = {"loftq_base": "dequantized"} if kw.get("init") == "loftq" else {}
    merge_adapters([adapter], [1.0], merged, output_kind="model", base=base, progress=False, **merge_kw)
    val_loss = math.log(val_perplexity(merged, prep, None, max_rows=val_rows))
    shutil.rmtree(merged)
    times = [e["step_time_s"] for e in res.log[1:]] or [res.log[0]["step_time_s"]]
    return {"variant": name, "settings": kw, "steps": steps, "train_wall_s": round(wall, 1),
            "median_step_s": round(statistics.median(times), 3), "first_step_s": round(res.log[0]["step_time_s"], 3),
            "first_loss": res.log[0]["loss"], "final_loss": res.final_loss, "val_loss_merged": val_loss,
            "trainable_params": res.metadata["trainable_params"], "compute_dtype": res.metadata["compute_dtype"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--val-rows", type=int, default=32)
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--one", nargs=4, metavar=("NAME", "BASE", "PREP", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("--base-loss", nargs=2, metavar=("BASE", "PREP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, base, prep, work = args.one
        print(json.dumps(run_one(name, Path(base), Path(prep), Path(work), args.steps, args.val_rows)))
        return
    if args.base_loss:
        from bench.train import val_perplexity

        print(json.dumps(math.log(val_perplexity(Path(args.base_loss[0]), Path(args.base_loss[1]), None,
                                                 max_rows=args.val_rows))))
        return

    os.environ.setdefault("LORAKIT_THREADS", "1")
    from bench.common import write_results
    from lorakit.data.prep import prepare_dataset
    from lorakit.models.folder import resolve_model_dir

    cpu = cpu_info()
    base = resolve_model_dir(None)
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-variants-"))
    prep = work / "prep"
    prepare_dataset(["bundled:reverse-words", "bundled:number-words"], prep, base=base, max_length=256, progress=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def child(*extra: str) -> str:
        proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--val-rows", str(args.val_rows),
                               *extra], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        return proc.stdout.strip().splitlines()[-1]

    base_loss = json.loads(child("--base-loss", str(base), str(prep)))
    print(f"base val loss {base_loss:.4f}", flush=True)
    results = []
    for name in args.only or list(VARIANTS):
        row = json.loads(child("--one", name, str(base), str(prep), str(work / f"v{len(results)}")))
        results.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    path = write_results("train_variants", {
        "model": "SmolLM2-135M-Instruct (embedded default)",
        "data": "bundled reverse-words + number-words prepared together, max_length 256, packed",
        "settings": {k: v for k, v in TRAIN.items() if k not in ("progress", "checkpoint_every")},
        "steps": args.steps, "val_rows": args.val_rows, "threads": int(os.environ["LORAKIT_THREADS"]),
        "cpu": cpu, "loadavg_at_end": os.getloadavg(),
        "note": (f"{args.steps} optimizer steps per variant only (shared 2-core CPU): compares cost per step and "
                 "early progress, not final quality; val loss = mean NLL of the merged model on the first "
                 f"{args.val_rows} validation rows' response tokens"),
        "val_loss_base": base_loss, "results": results,
    })
    print(path)


if __name__ == "__main__":
    main()
