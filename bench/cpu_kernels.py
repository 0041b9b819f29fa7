"""What the group-16 default costs a CPU user of plain ``transformers``: generation speed per GPTQ kernel.

Torch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``, which GPTQModel picks for plain ``transformers`` on
CPU) takes groups of 32, 64, 128 or 256, so a group-16 file names GPTQModel's portable torch kernel in its
``quantization_config.backend`` (``lorakit.quantize.mixed.loader_backend``). Each given quantized folder is loaded
the way a user would, ``AutoModelForCausalLM.from_pretrained(folder)`` on CPU, and greedily generates the same
number of new tokens from the same prompt (after one warm-up); the kernel class each loaded linear uses is
recorded beside the tokens/s. Both folders run in this one process, one after the other, so the ratio compares
like with like on this machine at this load.

``--cached NAME`` measures that folder once more with ``GPTQ_TORCH_CACHE_WEIGHTS=1`` (GPTQModel's portable kernel
then keeps each linear's dequantized weights after their first use: speed for dense-weight memory).

Usage: python bench/cpu_kernels.py --models g32=OUT10/quantized/gptq-... g16=OUT11/quantized/gptq-... [--cached g16]
Writes bench/results/cpu_kernels.json and the ``## cpu_kernels`` section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import cpu_line, median, update_readme_section, write_results  # noqa: E402

PROMPT = "Write two sentences about why small language models are useful on laptops."


def measure(folder: Path, new_tokens: int, repeats: int, cache_weights: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["GPTQ_TORCH_CACHE_WEIGHTS"] = "1" if cache_weights else "0"  # read when each linear is built
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    load_s = time.perf_counter() - started
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(**ids, **kw)  # warm-up: first-call kernel setup stays out of the timing
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(**ids, **kw)
            times.append(time.perf_counter() - t0)
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    kernel = type(model.model.layers[0].mlp.down_proj).__name__
    return {"folder": str(folder), "group_size": qcfg["group_size"], "backend_key": qcfg.get("backend"),
            "gptq_torch_cache_weights": cache_weights,
            "kernel": kernel, "load_s": round(load_s, 2), "new_tokens": new_tokens, "seconds": [round(t, 3) for t in times],
            "tokens_per_s": round(new_tokens / median(times), 2)}


def readme(data: dict) -> str:
    runs = data["runs"]
    lines = ["## cpu_kernels", "",
             "`python bench/cpu_kernels.py --models " + " ".join(
                 f"{k}={v['folder']}" for k, v in runs.items() if not v.get("gptq_torch_cache_weights"))
             + "".join(f" --cached {k[:-len('-cached')]}" for k in runs if k.endswith("-cached"))
             + "`: plain `transformers.AutoModelForCausalLM.from_pretrained` on CPU, greedy generation of "
             f"{data['new_tokens']} new tokens (median of {data['repeats']} after a warm-up), one process, "
             f"{data['threads']} torch threads. CPU: {cpu_line()}; load average {data['loadavg_1m']}.", "",
             "| model | group | quantization_config.backend | kernel | tokens/s | vs first |",
             "|---|---|---|---|---|---|"]
    first = next(iter(runs.values()))["tokens_per_s"]
    for name, r in runs.items():
        kernel = r["kernel"] + (" (GPTQ_TORCH_CACHE_WEIGHTS=1)" if r.get("gptq_torch_cache_weights") else "")
        lines.append(f"| {name} | {r['group_size']} | {r['backend_key'] or '(loader picks)'} | {kernel} | "
                     f"{r['tokens_per_s']} | {r['tokens_per_s'] / first:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True, help="NAME=quantized folder, the reference first")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cached", nargs="*", default=[], help="NAMEs to measure again with GPTQ_TORCH_CACHE_WEIGHTS=1")
    args = ap.parse_args()
    from lorakit.runtime import configure_threads

    configure_threads()
    import torch

    runs = {}
    for item in args.models:
        name, _, folder = item.partition("=")
        runs[name] = measure(Path(folder), args.new_tokens, args.repeats)
        print(name, json.dumps(runs[name]), flush=True)
        if name in args.cached:
            runs[f"{name}-cached"] = measure(Path(folder), args.new_tokens, args.repeats, cache_weights=True)
            print(f"{name}-cached", json.dumps(runs[f"{name}-cached"]), flush=True)
    names = list(runs)
    data = {"new_tokens": args.new_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "loadavg_1m": round(os.getloadavg()[0], 2), "runs": runs,
            "ratio_vs_first": {n: round(runs[n]["tokens_per_s"] / runs[names[0]]["tokens_per_s"], 3) for n in names}}
    write_results("cpu_kernels", data)
    update_readme_section("cpu_kernels", readme(data))


if __name__ == "__main__":
    main()
