"""Rounding's memory: the peak a real GPTQ or AWQ quantization reaches, against the estimate the preflight refuses on.

``lorakit.quantize.checks.rounding_memory_bytes`` estimates what a quantization holds at once (the model in its
compute dtype, the calibration blocks' layer states, the packed result being written) from the model's weight
headers and config; ``quantize_model`` refuses before it rounds, and ``flows.preflight`` before any stage, when the
estimate exceeds the free memory (with scale tuning on, tuning's own larger estimate is checked too). Without it a base
too large for the machine is found out by the operating system, after training and merging.

This bench quantizes, in a fresh process per row, with the release's rounding settings (act-order, GPTAQ, the
clipping search; no scale tuning) and records the process's peak resident memory above what it held before the
quantization started (the imports, the tokenizer). Rows run on copies of a release's merged model cut to its first
L decoder layers (real weights; GPTQ's time falls with L while the per-parameter and per-token costs stay) and on
the whole model: two layer counts split the peak into a part per parameter and a part the estimate must still
cover, two calibration sizes into a part per calibration token. The estimate must not fall below any measured
peak (that would let a run through that then fails); how far above it sits is what a refusal may cost a machine
that would have fit.

Usage: python bench/quantize_memory.py --model MERGED --calib PREP [--rows all|quick]
       python bench/quantize_memory.py --recompute   (the estimates of the recorded runs, from the code as it is now)
Writes bench/results/quantize_memory.json and the ``quantize_memory`` section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import cpu_line, update_readme_section, write_results  # noqa: E402

# (method, compute dtype, decoder layers kept (0: all), calibration blocks of 256 tokens): 128 is the release's.
ROWS = (("gptq", "float32", 6, 128), ("gptq", "float32", 12, 128), ("gptq", "float32", 6, 32),
        ("gptq", "bfloat16", 6, 128), ("awq", "float32", 6, 128), ("gptq", "bfloat16", 0, 128),
        ("awq", "float32", 12, 128))
SEQ_LEN = 256


def cut_model(src: Path, dst: Path, layers: int) -> Path:
    """A copy of ``src`` keeping its first ``layers`` decoder layers (0: all), weights as they are."""
    from safetensors.torch import save_file

    from lorakit.io.safetensors_stream import load_file

    if not layers:
        return src
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy2(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        for name, t in load_file(shard).items():
            parts = name.split(".")
            if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= layers:
                continue
            tensors[name] = t
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def child(args: argparse.Namespace) -> None:
    """One quantization in this process; prints its peak resident memory above the pre-quantization level."""
    import resource
    import time

    import psutil

    from lorakit.quantize import quantize_model
    from lorakit.quantize.core import _load_tokenizer
    from lorakit.quantize.gptqmodel_backend import _import_gptqmodel
    from lorakit.runtime import configure_threads

    configure_threads()
    _import_gptqmodel()
    _load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        before = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        quantize_model(args.model, Path(tmp) / "q", method=args.method, calib=args.calib, n_samples=args.n_samples,
                       seq_len=SEQ_LEN, compute_dtype=args.dtype, tune_steps=0, progress=True)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"rss_before_bytes": before, "peak_rss_bytes": peak, "peak_above_before_bytes": peak - before,
                      "seconds": round(seconds, 1)}))


def params_of(model: Path) -> int:
    from lorakit.models.folder import tensor_index

    return sum(math.prod(info.shape) for _, info in tensor_index(model).values())


def analyse(data: dict, models: dict[int, Path]) -> dict:
    """The estimate of every recorded run (from the code as it is now), and the per-parameter and per-token splits."""
    from lorakit.quantize.checks import rounding_memory_bytes

    for run in data["runs"].values():
        model = models.get(run["layers"])
        if model is not None:  # --recompute without the model folders keeps the recorded estimates
            est = rounding_memory_bytes(model, run["method"], run["dtype"], n_samples=run["n_samples"],
                                        seq_len=SEQ_LEN)
            run["estimate_bytes"] = est
        run["estimate_total_bytes"] = sum(run["estimate_bytes"].values())
        run["estimate_over_peak"] = round(run["estimate_total_bytes"] / run["peak_above_before_bytes"], 3)

    def find(method, dtype, layers, n):
        return data["runs"].get(f"{method}-{dtype}-L{layers}-n{n}")

    def per_param(a, b):  # bytes per parameter the larger model adds (decoder layers: the embeddings are in both)
        return round((b["peak_above_before_bytes"] - a["peak_above_before_bytes"]) / (b["params"] - a["params"]), 2)

    for key, (a, b) in {"float32_per_param_bytes": (find("gptq", "float32", 6, 128), find("gptq", "float32", 12, 128)),
                        "bfloat16_per_param_bytes": (find("gptq", "bfloat16", 6, 128), find("gptq", "bfloat16", 0, 128)),
                        "awq_float32_per_param_bytes": (find("awq", "float32", 6, 128), find("awq", "float32", 12, 128)),
                        }.items():
        if a and b:
            data[key] = per_param(a, b)
    a, c = find("gptq", "float32", 6, 128), find("gptq", "float32", 6, 32)
    if a and c:
        hidden = json.loads((Path(data["model"]) / "config.json").read_text())["hidden_size"]
        per_token = (a["peak_above_before_bytes"] - c["peak_above_before_bytes"]) / ((128 - 32) * SEQ_LEN)
        data["float32_per_calibration_token_bytes"] = round(per_token, 1)
        data["float32_per_calibration_token_per_hidden_bytes"] = round(per_token / hidden, 1)
    data["estimate_covers_every_peak"] = all(r["estimate_over_peak"] >= 1 for r in data["runs"].values())
    return data


def readme(data: dict) -> str:
    gb = 1e9
    lines = ["## quantize_memory", "",
             "`python bench/quantize_memory.py --model ... --calib ...`: 4-bit rounding (group 16 with a zero point, "
             "act-order, GPTAQ, the clipping search for GPTQ; no scale tuning) of a SmolLM2-135M release's merged "
             f"model, whole or cut to its first L decoder layers, on calibration blocks of {SEQ_LEN} tokens, one fresh "
             "process per row: the peak resident memory above what the process held before the quantization, "
             "against `lorakit.quantize.checks.rounding_memory_bytes` (what `lorakit quantize` and the preflight "
             f"refuse on). Seconds are wall time under the load the machine had (1-minute load average "
             f"{data['machine'].get('loadavg_1m_at_end', '?')} at the end; these are not speed figures). "
             f"CPU: {cpu_line(data['machine'].get('cpu'))}.", "",
             "| method | compute dtype | layers | parameters | calibration blocks | peak above start | estimate | "
             "estimate / peak | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"].values():
        lines.append(f"| {r['method']} | {r['dtype']} | {r['layers'] or 'all'} | {r['params'] / 1e6:.0f} M | "
                     f"{r['n_samples']} | {r['peak_above_before_bytes'] / gb:.2f} GB | "
                     f"{r['estimate_total_bytes'] / gb:.2f} GB | {r['estimate_over_peak']:.2f} | {r['seconds']:.0f} |")
    slopes = [f"{label} {data[key]} bytes per parameter the larger model adds" for key, label in (
        ("float32_per_param_bytes", "GPTQ float32"), ("bfloat16_per_param_bytes", "GPTQ bfloat16"),
        ("awq_float32_per_param_bytes", "AWQ float32")) if key in data]
    if slopes:
        lines += ["", "From the layer counts: " + "; ".join(slopes) + "."
                  + (f" From the two calibration sizes (GPTQ float32): {data['float32_per_calibration_token_bytes']} "
                     f"bytes per calibration token, {data['float32_per_calibration_token_per_hidden_bytes']} per "
                     "hidden unit." if "float32_per_calibration_token_bytes" in data else "")]
    if data.get("estimates_recomputed_after_measuring"):
        lines += ["", "The estimates were recomputed (`--recompute`) by later code than measured the peaks."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="the full-precision model (a release's merged/)")
    ap.add_argument("--calib", type=Path, help="the calibration prep folder")
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "quantize_memory")
    ap.add_argument("--recompute", action="store_true", help="re-derive the estimates of the recorded runs only")
    ap.add_argument("--add-missing", action="store_true", help="measure only the rows the results do not hold yet")
    ap.add_argument("--child-method", dest="method", help=argparse.SUPPRESS)
    ap.add_argument("--child-dtype", dest="dtype", help=argparse.SUPPRESS)
    ap.add_argument("--child-n-samples", dest="n_samples", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        return child(args)
    results = BENCH / "results" / "quantize_memory.json"
    models: dict[int, Path] = {}
    if args.model:
        for layers in sorted({r[2] for r in ROWS}):
            models[layers] = cut_model(args.model, args.work / f"L{layers}", layers)
    if args.recompute:
        data = json.loads(results.read_text())
        data = {k: v for k, v in data.items() if k not in ("benchmark", "date")}
        data["estimates_recomputed_after_measuring"] = True  # the peaks stay those of the code that measured them
    else:
        if not (args.model and args.calib):
            ap.error("--model and --calib are needed to measure (or --recompute)")
        data = {"model": str(args.model), "seq_len": SEQ_LEN, "runs": {}}
        if args.add_missing and results.exists():  # rows added to ROWS later are measured; the rest kept
            data = {k: v for k, v in json.loads(results.read_text()).items() if k not in ("benchmark", "date")}
        for method, dtype, layers, n in ROWS:
            if f"{method}-{dtype}-L{layers}-n{n}" in data["runs"]:
                continue
            cmd = [sys.executable, __file__, "--model", str(models[layers]), "--calib", str(args.calib),
                   "--child-method", method, "--child-dtype", dtype, "--child-n-samples", str(n)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)  # its progress on stderr
            key = f"{method}-{dtype}-L{layers}-n{n}"
            data["runs"][key] = {"method": method, "dtype": dtype, "layers": layers, "n_samples": n,
                                 "params": params_of(models[layers]),
                                 **json.loads(proc.stdout.strip().splitlines()[-1])}
            print(key, data["runs"][key], flush=True)
            write_results("quantize_memory", data)  # the peaks so far, before any estimate is derived
    data = analyse(data, models)
    path = write_results("quantize_memory", data)
    update_readme_section("quantize_memory", readme(json.loads(path.read_text())))
    print(path)


if __name__ == "__main__":
    main()
