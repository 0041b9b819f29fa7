"""Where GPTQ's time goes on CPU, by compute dtype, with and without the CPU's bfloat16 kernels.

GPTQModel 7.6 loads and runs the model in bfloat16 on every CPU unless given a dtype; lorakit now passes the one
from :mod:`lorakit.compute`. This benchmark quantizes the same model with GPTQ 4-bit in bfloat16 and in float32,
natively and with torch held to AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, which
reproduces a CPU without AVX512-BF16), each in its own subprocess with one thread, and splits the wall time into:
calibration forwards of the decoder layers (minus the Hessian updates their hooks run), Hessian accumulation
(``GPTQ.add_batch``), the GPTQ solve (``GPTQ.quantize``), packing (``PackableQuantLinear.pack``/``pack_block``) and the rest
(load, save, GPTQModel's bookkeeping). GPTQModel runs parts of this on worker threads, so the parts are sums of
per-call wall times and can overlap; the total is wall time.

Run: ``python bench/gptq_dtype.py [--models tiny,smollm2]`` -> bench/results/gptq_dtype.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EMULATE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
N_SAMPLES, SEQ_LEN = 16, 256


def _timed(cls, name: str, totals: dict, key: str) -> None:
    import functools
    import threading

    original = getattr(cls, name)
    depth = threading.local()

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if getattr(depth, "n", 0):  # recursion (nested layers): count the outermost call only
            return original(*args, **kwargs)
        depth.n = 1
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            depth.n = 0
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0

    setattr(cls, name, wrapper)


def child(model_dir: str, dtype_name: str, out: str) -> None:
    import torch

    from lorakit.quantize.gptqmodel_backend import _import_gptqmodel, gptq_quantize

    torch.set_num_threads(1)
    _import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.quantization.gptq import GPTQ
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    totals: dict[str, float] = {}
    _timed(GPTQ, "add_batch", totals, "hessian_s")
    _timed(GPTQ, "quantize", totals, "solve_s")
    _timed(PackableQuantLinear, "pack", totals, "pack_s")
    _timed(PackableQuantLinear, "pack_block", totals, "pack_block_s")
    _timed(LlamaDecoderLayer, "forward", totals, "layer_forward_incl_hooks_s")
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, 200, (N_SAMPLES, SEQ_LEN), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        details = gptq_quantize(Path(model_dir), Path(tmp) / "q", blocks, bits=4, group_size=64, sym=True,
                                desc_act=False, device="cpu", progress=False, dtype=getattr(torch, dtype_name))
        total = time.perf_counter() - t0
    totals["forward_s"] = totals.get("layer_forward_incl_hooks_s", 0.0) - totals.get("hessian_s", 0.0)
    named = sum(totals.get(k, 0.0) for k in ("forward_s", "hessian_s", "solve_s"))
    totals["pack_s"] = max(totals.get("pack_s", 0.0), totals.pop("pack_block_s", 0.0))  # pack may call pack_block
    named += totals["pack_s"]
    Path(out).write_text(json.dumps({"total_s": total, "quantize_s": details["quantize_s"],
                                     "model_dtype": details["compute_dtype"],
                                     **{k: round(v, 3) for k, v in totals.items()},
                                     "other_s": round(total - named, 3)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from bench.common import update_readme_section, write_results
    from lorakit.compute import cpu_info

    models: dict[str, str] = {}
    work = Path(tempfile.mkdtemp(prefix="lorakit-gptq-dtype-"))
    for name in args.models.split(","):
        if name == "tiny":
            from lorakit.models.tiny import make_tiny_llama

            models[name] = str(make_tiny_llama(work / "tiny", hidden_size=256, intermediate_size=512, num_layers=4,
                                               seed=0))
        elif name == "smollm2":
            from lorakit.models import ensure_default_model

            models[name] = str(ensure_default_model())
    rows = []
    for name, path in models.items():
        for emulate in (False, True):
            for dtype in ("bfloat16", "float32"):
                out = work / f"{name}-{dtype}-{int(emulate)}.json"
                env = dict(os.environ, PYTHONPATH=str(REPO), LORAKIT_THREADS="1", **(EMULATE if emulate else {}))
                for k in (() if emulate else EMULATE):
                    env.pop(k, None)
                subprocess.run([sys.executable, __file__, "--child", path, dtype, str(out)], env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                row = {"model": name, "dtype": dtype, "avx2_emulation": emulate, **json.loads(out.read_text())}
                rows.append(row)
                print(json.dumps(row), flush=True)
    load = os.getloadavg()
    write_results("gptq_dtype", {"cpu": cpu_info(), "loadavg_1m": round(load[0], 2), "threads": 1,
                                 "calibration": {"n_samples": N_SAMPLES, "seq_len": SEQ_LEN}, "runs": rows})
    lines = ["## GPTQ (GPTQModel) time by compute dtype on CPU",
             "",
             f"`python bench/gptq_dtype.py` on {cpu_info()['model']} (flags {', '.join(cpu_info()['flags'])}), one "
             f"thread, load {load[0]:.1f}; GPTQ 4-bit g64 sym, {N_SAMPLES} x {SEQ_LEN} calibration tokens. "
             "\"AVX2\" = torch held to AVX2 kernels (a CPU without AVX512-BF16). Parts are sums of call times.",
             "",
             "| model | dtype | AVX2 | total s | forwards s | Hessian s | solve s | pack s | other s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {'yes' if r['avx2_emulation'] else 'no'} | {r['total_s']:.1f} | "
                     f"{r['forward_s']:.1f} | {r.get('hessian_s', 0):.1f} | {r.get('solve_s', 0):.1f} | "
                     f"{r.get('pack_s', 0):.1f} | {r['other_s']:.1f} |")
    update_readme_section("gptq_dtype", "\n".join(lines))


if __name__ == "__main__":
    main()
