"""Benchmark: where one QLoRA step of the default release spends its time on this CPU, and how close its matrix
products run to this core's own matmul speed.

Why: the default release trains 120 steps per adapter and its training alone outlasts the demo's 15-minute budget
on a 2-core CPU. Whether that is waste to remove or arithmetic to pay decides what can be done about it. This
bench trains one of the default release's adapters (its prep, ``lora`` settings and compute dtype, from
``flows.plan.ReleasePlan`` of the default config) for a few steps in this process, at the release's thread count
for a training child (1 on 2 cores with 2 adapters), under ``torch.profiler``:

* self CPU time per operator over the profiled steps, grouped: matrix products (``aten::mm``/``addmm``/``bmm``),
  attention (scaled dot-product kernels), bitsandbytes' 4-bit dequantization, and the rest;
* the matrix products' floating-point work (counted exactly on one more step by ``FlopCounterMode``, per token
  computed) and the rate they ran at, against a large square matmul in the same dtype and thread count on this
  core (the reference a well-shaped product reaches here);
* each profiled step's wall time and the tokens it computed (after the shared-prompt saving, docs/train.md).

The first steps are not profiled (``--skip``): model load and the first step's one-time work are not the steady
state; the steps between the first and the profiler's warm-up step are timed without the profiler, which shows
what recording costs.

    python bench/train_profile.py [--task number-words] [--steps 3] [--skip 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import BENCH, cpu_line, machine, update_readme_section, write_results  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"}
GROUP_LABELS = {"matmul": "matrix products", "attention": "attention (scaled dot-product)",
                "nf4_dequantize": "bitsandbytes' 4-bit dequantization", "other": "everything else"}


def group_of(name: str) -> str:
    """The operator group a profiler event counts in (self times, so nested calls are not counted twice)."""
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    if name.startswith("bitsandbytes::"):
        return "nf4_dequantize"
    return "other"


GEMM_4BIT = "bitsandbytes::gemm_4bit"


def gemm_4bit_flops() -> dict:
    """FlopCounterMode's formula for bitsandbytes' 4-bit matmul (``custom_mapping``). The op is a custom one: the
    mode sees it whole and never the ``aten::mm`` inside it, so without a formula the forward products of every
    4-bit linear would go uncounted (the profiler's timings do see that mm)."""
    from math import prod

    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    import torch

    def flops(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
        return 2 * prod(a_shape[:-1]) * shape_b[0] * shape_b[1]

    return {torch.ops.bitsandbytes.gemm_4bit: flops}


def reference_matmul(dtype, threads: int, n: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of an n x n x n matmul in ``dtype`` on ``threads`` threads (median of ``repeats`` after a warm-up)."""
    import statistics

    import torch

    from lorakit.compute import matmul_seconds

    torch.set_num_threads(threads)
    s = statistics.median(matmul_seconds(dtype, n, n, n, repeats))
    return {"n": n, "seconds": round(s, 4), "gflops_per_s": round(2 * n ** 3 / s / 1e9, 1)}


def profile_steps(task: str, steps: int, skip: int, threads: int, work: Path) -> dict:
    """Train ``skip + steps + 1`` steps: the first ``skip`` unrecorded (the last of them warms the profiler up),
    ``steps`` under ``torch.profiler`` (no shape recording, which slows small operators), then one step under
    ``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix products' floating-point work exactly
    but runs every operator through Python, so its time is not used."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from torch.utils.flop_counter import FlopCounterMode

    from bench.train_concurrency import release_stage_args
    from lorakit.train import train_adapter

    job = next(j for j in release_stage_args(work, skip + steps + 1) if j["name"] == task)
    torch.set_num_threads(threads)
    entries: list[dict] = []
    counter = FlopCounterMode(display=False, custom_mapping=gemm_4bit_flops())
    # on_step runs after each optimizer step, so prof.step() there closes that step's record.
    sched = schedule(wait=skip - 1, warmup=1, active=steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched) as prof:
        def on_step(entry: dict) -> None:
            entries.append(entry)
            prof.step()
            if len(entries) == skip + steps:
                counter.__enter__()  # the next step is counted
            elif len(entries) == skip + steps + 1:
                counter.__exit__(None, None, None)
        result = train_adapter(job["prep"], work / "adapter" / task, force=True, progress=True, on_step=on_step,
                               **job["params"])
    profiled, counted = entries[skip:skip + steps], entries[skip + steps]
    by_group: dict[str, float] = {}
    ops = []
    for ev in prof.key_averages():
        self_s = ev.self_cpu_time_total / 1e6
        group = group_of(ev.key)
        by_group[group] = by_group.get(group, 0.0) + self_s
        ops.append({"op": ev.key, "self_s": round(self_s, 3), "calls": ev.count, "group": group})
    total = sum(by_group.values())
    ops.sort(key=lambda o: -o["self_s"])
    counts = counter.get_flop_counts().get("Global", {})
    mm_flops_counted = sum(int(n) for op, n in counts.items()
                           if str(op).replace(".", "::", 1) in MATMUL_OPS | {GEMM_4BIT})
    per_token = mm_flops_counted / counted["computed_tokens"]
    mm_flops = per_token * sum(e["computed_tokens"] for e in profiled)
    mm_s = by_group.get("matmul", 0.0)
    return {
        "task": task, "threads": threads, "compute_dtype": result.metadata["compute_dtype"],
        "params": {k: v for k, v in job["params"].items() if k in ("lr", "r", "batch_size", "grad_accum", "quant")},
        "profiled_steps": len(profiled), "skipped_steps": skip,
        "unprofiled_step_wall_s": [round(e["step_time_s"], 3) for e in entries[1:skip - 1]],
        "step_wall_s": [round(e["step_time_s"], 3) for e in profiled],
        "tokens_per_step": [e["tokens"] for e in profiled],
        "computed_tokens_per_step": [e["computed_tokens"] for e in profiled],
        "profiled_wall_s": round(sum(e["step_time_s"] for e in profiled), 3),
        "self_cpu_s": round(total, 3),
        "share_by_group": {g: round(s / total, 4) for g, s in sorted(by_group.items(), key=lambda kv: -kv[1])},
        "matmul": {
            "flops_counted_step": mm_flops_counted,
            "flops_counted_step_by_op": {str(op): int(n) for op, n in counts.items()},
            "computed_tokens_counted_step": counted["computed_tokens"],
            "flops_per_computed_token": round(per_token),
            "flops_profiled_estimate": round(mm_flops),
            "estimate": "the counted step's matmul FLOPs per computed token x the profiled steps' computed tokens",
            "self_s": round(mm_s, 3), "gflops_per_s": round(mm_flops / mm_s / 1e9, 1) if mm_s else None},
        "top_ops": ops[:12],
    }


def render(data: dict, command: str) -> str:
    p, ref = data["profile"], data["reference_matmul"]
    share = p["share_by_group"]
    rows = "\n".join(f"| {GROUP_LABELS[g]} | {s:.1%} |" for g, s in share.items())
    steps = ", ".join(f"{s:.2f}" for s in p["step_wall_s"])
    plain = ", ".join(f"{s:.2f}" for s in p["unprofiled_step_wall_s"])
    ratio = p["matmul"]["gflops_per_s"] / ref["gflops_per_s"] if p["matmul"]["gflops_per_s"] else float("nan")
    return f"""## train_profile

`{command}`: {p['profiled_steps']} QLoRA steps of the default release's {p['task']} adapter (after {p['skipped_steps']} unprofiled), {p['threads']} torch thread(s) as a release training child gets on 2 cores, compute dtype {p['compute_dtype']}, under torch.profiler. CPU: {cpu_line(data['machine']['cpu'])}; load average {data['machine']['loadavg_1m_at_end']} at the end.

Step wall times (s): {steps} profiled, {plain} before the profiler started (step 1 left out); tokens per step {p['tokens_per_step'][0]}, of which computed {p['computed_tokens_per_step'][0]} (each micro-batch's shared prompt runs once).

| operator group | share of self CPU time |
|---|---|
{rows}

Matrix products: about {p['matmul']['flops_profiled_estimate'] / 1e9:.0f} GFLOP in {p['matmul']['self_s']:.1f} s, {p['matmul']['gflops_per_s']} GFLOP/s ({p['matmul']['flops_per_computed_token'] / 1e6:.0f} MFLOP per computed token, counted exactly on one further step by torch's FlopCounterMode and scaled by the profiled steps' computed tokens); a {ref['n']}x{ref['n']}x{ref['n']} matmul in the same dtype and thread count ran at {ref['gflops_per_s']} GFLOP/s here ({ratio:.2f}x of it). Top operators are in `bench/results/train_profile.json`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="number-words", help="which default-release adapter to train")
    ap.add_argument("--steps", type=int, default=3, help="steps profiled")
    ap.add_argument("--skip", type=int, default=3, help="steps trained before profiling starts (the last one warms "
                    "the profiler up; those between the first and it are timed without it)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a release training child's on 2 cores: 1)")
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "train_profile")
    ap.add_argument("--results", default="train_profile")
    args = ap.parse_args()
    if args.steps < 1 or args.skip < 3:
        raise SystemExit("--steps must be at least 1 and --skip at least 3")

    import torch

    from lorakit.compute import torch_dtype

    prof = profile_steps(args.task, args.steps, args.skip, args.threads, args.work)
    ref = reference_matmul(torch_dtype(prof["compute_dtype"]), args.threads)
    data = {"profile": prof, "reference_matmul": ref, "torch": torch.__version__}
    path = write_results(args.results, data)
    command = "python bench/train_profile.py" + "".join(
        f" --{k} {v}" for k, v in (("task", args.task), ("steps", args.steps), ("skip", args.skip),
                                   ("threads", args.threads)))
    update_readme_section(args.results, render({**data, "machine": machine()}, command))
    print(render({**data, "machine": machine()}, command))
    print(path)


if __name__ == "__main__":
    main()
