"""Scale tuning's memory: the peak a real tuning reaches, against the estimate the preflight refuses on.

``lorakit.quantize.tune.memory_bytes`` estimates what tuning holds at once from the model's weight headers and
config; a run config whose estimate exceeds the free memory is refused before any stage (``flows.preflight``), and
``quantize_model`` refuses before it rounds. This bench tunes a copy of a 4-bit folder for a few steps, in a fresh
process per (compute dtype, block length), and records the process's peak resident memory above what it held
before tuning started (the imports, the calibration blocks). Two block lengths in float32 split the peak into a
fixed part (the models) and a part per token of a step (logits, activations): what the estimate's constants are set
from. The estimate must not fall below any measured peak (that would let a run through that then fails); how far
above it sits is what a refusal may cost a machine that would have fit.

Usage: python bench/tune_memory.py --model MERGED --quantized QUANTIZED --calib PREP
       python bench/tune_memory.py --recompute   (the estimates of the recorded runs, from the code as it is now)
Writes bench/results/tune_memory.json and the ``tune_memory`` section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import cpu_line, update_readme_section, write_results  # noqa: E402

# (compute dtype, block length, steps): 256 is the release's block length (seq_len). The peak still rises over the
# first steps (the allocator's free lists fragment), so the split is taken at 8 steps and one run goes to 24.
RUNS = (("float32", 64, 8), ("float32", 256, 8), ("float32", 256, 24), ("bfloat16", 256, 8))
SPLIT_STEPS = 8
BATCH = 4  # lorakit.quantize.tune.BATCH_SIZE


def child(args: argparse.Namespace) -> None:
    """One tuning in this process; prints its peak resident memory above the pre-tuning level as JSON."""
    import resource
    import shutil
    import tempfile

    import psutil
    import torch

    from lorakit.quantize.calibration import build_calibration
    from lorakit.quantize.core import _load_tokenizer
    from lorakit.quantize.tune import tune_scales
    from lorakit.runtime import configure_threads

    configure_threads()
    blocks = build_calibration(args.calib, _load_tokenizer(args.model), n_samples=None, seq_len=args.seq_len,
                               seed=0).blocks
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "q"
        shutil.copytree(args.quantized, folder)
        before = psutil.Process().memory_info().rss
        record = tune_scales(Path(args.model), folder, blocks, kind="gptq", steps=args.steps, lr=5e-4,
                             batch_size=BATCH, dtype=getattr(torch, args.dtype), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"dtype": args.dtype, "seq_len": args.seq_len, "rss_before_bytes": before,
                      "peak_rss_bytes": peak, "peak_above_before_bytes": peak - before, "steps": args.steps,
                      "seconds": record["seconds"]}))


def analyse(data: dict) -> dict:
    """The estimate of every recorded run (from the code as it is now) and the float32 fixed / per-token split."""
    from lorakit.quantize.tune import memory_bytes

    for run in data["runs"].values():
        est = memory_bytes(Path(data["model"]), run["seq_len"], BATCH)
        run["estimate_bytes"] = est
        run["estimate_total_bytes"] = sum(est.values())
        run["estimate_over_peak"] = round(sum(est.values()) / run["peak_above_before_bytes"], 3)
    fp = sorted((r for r in data["runs"].values() if r["dtype"] == "float32" and r["steps"] == SPLIT_STEPS),
                key=lambda r: r["seq_len"])
    if len(fp) >= 2:
        lo, hi = fp[0], fp[-1]
        per_token = (hi["peak_above_before_bytes"] - lo["peak_above_before_bytes"]) / (BATCH * (hi["seq_len"] - lo["seq_len"]))
        fixed = lo["peak_above_before_bytes"] - per_token * BATCH * lo["seq_len"]
        est_lo, est_hi = lo["estimate_bytes"], hi["estimate_bytes"]
        est_per_token = (sum(est_hi.values()) - sum(est_lo.values())) / (BATCH * (hi["seq_len"] - lo["seq_len"]))
        data["float32_split"] = {"fixed_bytes": round(fixed), "per_token_bytes": round(per_token),
                                 "params": data["params"], "fixed_bytes_per_param": round(fixed / data["params"], 2),
                                 "estimate_fixed_bytes": est_lo["weights"],
                                 "estimate_per_token_bytes": round(est_per_token)}
    data["estimate_covers_every_peak"] = all(r["estimate_over_peak"] >= 1 for r in data["runs"].values())
    return data


def readme(data: dict) -> str:
    gb = 1e9
    lines = ["## tune_memory", "",
             "`python bench/tune_memory.py --model ... --quantized ... --calib ...`: scale tuning "
             f"(batch {BATCH}) of a 4-bit SmolLM2-135M release "
             "(its merged model the teacher), one fresh process per row: the peak resident memory above what the "
             "process held before tuning, against `lorakit.quantize.tune.memory_bytes` (what the preflight and "
             f"`lorakit quantize` refuse on). CPU: {cpu_line(data['machine'].get('cpu'))}.", "",
             "| compute dtype | block tokens | steps | peak above start | estimate | estimate / peak |",
             "|---|---|---|---|---|---|"]
    for r in data["runs"].values():
        lines.append(f"| {r['dtype']} | {r['seq_len']} | {r['steps']} | {r['peak_above_before_bytes'] / gb:.2f} GB | "
                     f"{sum(r['estimate_bytes'].values()) / gb:.2f} GB | {r['estimate_over_peak']:.2f} |")
    split = data.get("float32_split")
    if split:
        lines += ["", f"float32 at {SPLIT_STEPS} steps, from the two block lengths: {split['fixed_bytes'] / gb:.2f} GB fixed "
                  f"({split['fixed_bytes_per_param']} bytes per parameter; estimated {split['estimate_fixed_bytes'] / gb:.2f} GB) "
                  f"and {split['per_token_bytes'] / 1e6:.2f} MB per token of a step (estimated "
                  f"{split['estimate_per_token_bytes'] / 1e6:.2f} MB)."]
    if data.get("estimates_recomputed_after_measuring"):
        lines += ["", "The estimates were recomputed (`--recompute`) by later code than measured the peaks."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="the full-precision model (a release's merged/)")
    ap.add_argument("--quantized", type=Path, help="its GPTQ folder")
    ap.add_argument("--calib", type=Path, help="the calibration prep folder")
    ap.add_argument("--recompute", action="store_true", help="re-derive the estimates of the recorded runs only")
    ap.add_argument("--child-dtype", dest="dtype", help=argparse.SUPPRESS)
    ap.add_argument("--child-seq-len", dest="seq_len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-steps", dest="steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dtype:
        return child(args)
    results = BENCH / "results" / "tune_memory.json"
    if args.recompute:
        data = json.loads(results.read_text())
        data = {k: v for k, v in data.items() if k not in ("benchmark", "date")}
        data["estimates_recomputed_after_measuring"] = True  # the peaks stay those of the code that measured them
    else:
        if not (args.model and args.quantized and args.calib):
            ap.error("--model, --quantized and --calib are needed to measure (or --recompute)")
        from lorakit.models.folder import tensor_index
        import math

        params = sum(math.prod(info.shape) for _, info in tensor_index(args.model).values())
        data = {"model": str(args.model), "params": params, "runs": {}}
        for dtype, seq_len, steps in RUNS:
            cmd = [sys.executable, __file__, "--model", str(args.model), "--quantized", str(args.quantized), "--calib",
                   str(args.calib), "--child-steps", str(steps), "--child-dtype", dtype, "--child-seq-len", str(seq_len)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            key = f"{dtype}-seq{seq_len}-steps{steps}"
            data["runs"][key] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(key, data["runs"][key], flush=True)
    data = analyse(data)
    path = write_results("tune_memory", data)
    update_readme_section("tune_memory", readme(json.loads(path.read_text())))
    print(path)


if __name__ == "__main__":
    main()
