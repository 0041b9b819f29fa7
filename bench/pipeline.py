"""Benchmark: wall time of a whole release run, cold and fully cached, and Prefect's share of the cold run.

Each run is what a user starts: ``lorakit run CONFIG`` in a fresh process (ephemeral Prefect server included).
Cold = empty Prefect home, output folder and registry; cached = the same command again (every stage task is a
cache hit). Prefect overhead of the cold run = its wall time - the time spent inside the task functions (the
stages and registrations, read back from the run's task runs), split into process start + ephemeral server +
imports (wall - flow run time) and orchestration inside the flow (flow run time - task time). The stages' own
recorded wall times (``lorakit_*.json`` / ``prep.json`` / ``gate.json``) are listed as a cross-check.
Goal: cached < 5% of cold.

    python bench/pipeline.py                       # embedded default (configs/default.yaml), slow on CPU
    python bench/pipeline.py --tiny                # tiny random model (configs/tiny.yaml), a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, update_readme_section, write_results  # noqa: E402


# How the child runs see the CPU. "avx2" reproduces a CPU without AVX512/AVX512-BF16 on a bigger one: bfloat16
# matmuls then take the emulated path (tens of times slower than float32), as on most laptops and many VMs.
CPU_PROFILES: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
# Issue #14's goal for `make demo` cold on a 2-core machine without bf16 units.
DEMO_GOAL_S = 15 * 60


def stage_intervals(output_dir: Path) -> dict[str, tuple[float, float]]:
    """(start, end) of each stage, epoch seconds: its metadata file is written last, so its mtime is the end,
    and the start is that minus the wall time the stage recorded in it."""
    from flows.report import _seconds

    spans = {}
    for meta in sorted(output_dir.glob("*/*/*.json")):
        own_card = meta.name == "scorecard.json" and meta.parent.parent.name == "scorecard"  # the gate keeps a copy
        if meta.name.startswith("lorakit_") or meta.name in ("prep.json", "gate.json") or own_card:
            data = json.loads(meta.read_text())
            sec = _seconds(data) if isinstance(data, dict) else None
            if sec is not None and isinstance(data.get("search"), dict) and meta.name == "lorakit_merge.json":
                search_s = float(data["search"].get("search_s") or 0)
                if sec < search_s:  # a record from before wall_time_s counted the search (it timed the write alone)
                    sec += search_s
            if sec is not None:
                end = meta.stat().st_mtime
                spans[f"{meta.parent.parent.name}/{meta.parent.name}"] = (end - sec, end)
    return spans


def stage_seconds(output_dir: Path) -> dict[str, float]:
    """Wall time each stage recorded in its output folder's metadata."""
    return {name: end - start for name, (start, end) in stage_intervals(output_dir).items()}


def span_seconds(intervals: dict[str, tuple[float, float]], kind: str | None = None) -> float | None:
    """Seconds during which at least one of the stages (of one kind: ``adapters``) was running: less than their
    sum where stages overlapped (adapters trained at once), and blind to pauses between them (a run resumed
    from Prefect's cache after a crash)."""
    chosen = sorted(iv for name, iv in intervals.items() if kind is None or name.split("/")[0] == kind)
    if not chosen:
        return None
    total, (start, end) = 0.0, chosen[0]
    for s, e in chosen[1:]:
        if s > end:
            total, start = total + end - start, s
        end = max(end, e)
    return round(total + end - start, 1)


def release_facts(output_dir: Path, config: dict) -> dict[str, object]:
    """What the cold run released, read from its outputs: quantization as used, sizes, every gate check.

    So a figure about the default release (degradation per check, size) can cite this file, and a reader can
    tell which settings and code produced it.
    """
    from lorakit.gate import read_verdict
    from lorakit.quantize import read_quant_meta

    facts: dict[str, object] = {"run_config": config}
    quantized = sorted(output_dir.glob("quantized/*/lorakit_quant.json"))
    if quantized:
        meta = read_quant_meta(quantized[0].parent)
        facts["quantize_used"] = meta.used_settings()
        facts["quantized_bytes"] = meta.size_after_bytes
        facts["merged_bytes"] = meta.size_before_bytes
    facts["gates"] = {}  # one per gated candidate (the quantized model; the GGUF too with export.gguf)
    for path in sorted(output_dir.glob("gate/*/gate.json")):
        v = read_verdict(path.parent)
        facts["gates"][path.parent.name] = {
            "passed": v.passed, "worst_degradation": max(c.degradation for c in v.checks),
            "checks": {c.name: {"degradation": c.degradation, "baseline_ppl": c.baseline_ppl,
                                "candidate_ppl": c.candidate_ppl, "passed": c.passed} for c in v.checks}}
    facts["compute_dtypes"] = compute_dtypes(output_dir)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    facts["lorakit_commit"] = commit.stdout.strip() or None
    return facts


def compute_dtypes(output_dir: Path) -> dict[str, str | None]:
    """The compute dtype each stage resolved to (``auto`` -> bfloat16 or float32 on this CPU), from its record."""
    out: dict[str, str | None] = {}
    for meta in sorted(output_dir.glob("*/*/lorakit_train.json")):
        out[f"adapters/{meta.parent.name}"] = json.loads(meta.read_text()).get("compute_dtype")
    for meta in sorted(output_dir.glob("*/*/lorakit_quant.json")):
        out[f"quantized/{meta.parent.name}"] = json.loads(meta.read_text())["params"].get("compute_dtype")
    for meta in sorted(output_dir.glob("gate/*/gate.json")):
        out[f"gate/{meta.parent.name}"] = json.loads(meta.read_text())["params"].get("compute_dtype")
    return out


def task_times(prefect_home: Path) -> dict[str, object]:
    """Run times of the first (cold) release flow run and of every task run under it, from its Prefect database."""
    os.environ["PREFECT_HOME"] = str(prefect_home)
    os.environ.pop("PREFECT_API_URL", None)
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId,
                                                FlowRunFilterParentFlowRunId)
    from prefect.client.schemas.sorting import FlowRunSort

    async def go():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["release"])),
                                               sort=FlowRunSort.START_TIME_ASC)
            cold = runs[0]
            subs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[cold.id])))
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[cold.id, *(r.id for r in subs)])))
            return cold, tasks

    cold, tasks = asyncio.run(go())
    per_task: dict[str, float] = {}
    for tr in tasks:
        name = tr.name.rsplit("-", 1)[0]
        if name in ("train", "quantize"):  # the parent's placeholder for a subflow, not work of its own
            continue
        per_task[name] = per_task.get(name, 0.0) + tr.total_run_time.total_seconds()
    return {"flow_run_s": cold.total_run_time.total_seconds(), "tasks_s": per_task}


def run_once(config: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lorakit", "run", str(config), "-q"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 3):  # 3 = rejected by the gate: still a complete run
        raise SystemExit(f"lorakit run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    verdict = proc.stdout.strip() or proc.stderr.strip().splitlines()[-1].removeprefix("error: ")
    print(f"  {wall:8.1f} s  {verdict}", flush=True)
    return wall, verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model and configs/tiny.yaml")
    ap.add_argument("--cached-runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "pipeline")
    ap.add_argument("--cpu-profile", choices=sorted(CPU_PROFILES), default="native",
                    help="native: this CPU as it is; avx2: torch and oneDNN held to AVX2 kernels, i.e. a CPU without "
                         "AVX512/AVX512-BF16 (most laptops and many VMs). Recorded under its own key.")
    ap.add_argument("--refresh-facts", action="store_true",
                    help="re-read what the last run (kept in --work) released into the recorded results, without "
                         "running anything")
    args = ap.parse_args()
    if args.refresh_facts:
        refresh_facts(args)
        return

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    if args.tiny:
        from lorakit.models.tiny import make_tiny_llama

        data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        data["base"] = str(make_tiny_llama(args.work / "tiny-model", seed=0))
    else:
        data = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    data["output_dir"] = str(args.work / "out")
    data["registry"] = {**data.get("registry", {}), "root": str(args.work / "registry")}
    config = args.work / "run.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    env = dict(os.environ, PREFECT_HOME=str(args.work / "prefect-home"), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO), **CPU_PROFILES[args.cpu_profile])
    if args.cpu_profile != "native":
        # torch inductor's on-disk cache would hand kernels compiled for the wider ISA to the narrowed process
        env["TORCHINDUCTOR_CACHE_DIR"] = str(args.work / "inductor-cache")
    env.pop("PREFECT_API_URL", None)
    os.environ.update(CPU_PROFILES[args.cpu_profile])  # so machine() records the profile with the results

    print("cold run:", flush=True)
    cold, verdict = run_once(config, env)
    stages = stage_seconds(args.work / "out")
    facts = release_facts(args.work / "out", data)
    print(f"cached runs (x{args.cached_runs}):", flush=True)
    cached = [run_once(config, env)[0] for _ in range(args.cached_runs)]
    cached_med = statistics.median(cached)
    times = task_times(args.work / "prefect-home")
    in_tasks = sum(times["tasks_s"].values())
    result = {
        "config": "configs/tiny.yaml (tiny random Llama)" if args.tiny else "configs/default.yaml (SmolLM2-135M)",
        "cold_s": round(cold, 2),
        "cached_s": [round(c, 2) for c in cached],
        "cached_median_s": round(cached_med, 2),
        "cached_over_cold": round(cached_med / cold, 4),
        "goal_cached_over_cold": 0.05,
        "cold_task_seconds": {k: round(v, 2) for k, v in times["tasks_s"].items()},
        "cold_in_tasks_s": round(in_tasks, 2),
        "cold_flow_run_s": round(times["flow_run_s"], 2),
        "prefect_overhead_s": round(cold - in_tasks, 2),
        "prefect_overhead_share_of_cold": round((cold - in_tasks) / cold, 4),
        "overhead_process_server_imports_s": round(cold - times["flow_run_s"], 2),
        "overhead_orchestration_in_flow_s": round(times["flow_run_s"] - in_tasks, 2),
        "stage_recorded_seconds": {k: round(v, 2) for k, v in stages.items()},
        "verdict": verdict,
        **facts,
    }
    result["demo_goal_s"] = DEMO_GOAL_S
    result["cpu_profile"] = args.cpu_profile
    if args.tiny:  # a smoke run: print, keep the recorded results of the real benchmark
        print(json.dumps(result, indent=2))
        return
    if args.cpu_profile == "native":
        previous = _previous_results()
        keep = {k: v for k, v in previous.items() if k.startswith("cpu_profile_")}
        path = write_results("pipeline", {**result, **keep})
    else:  # recorded beside the native run, which (and whose README citations) stay as they are
        previous = _previous_results()
        previous.pop("benchmark", None)
        previous.pop("date", None)
        previous.pop("machine", None)
        result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), **result}
        path = write_results("pipeline", {**previous, f"cpu_profile_{args.cpu_profile}": result})
        update_readme_section(f"pipeline-{args.cpu_profile}", readme_profile(result))
        print(f"wrote {path} (key cpu_profile_{args.cpu_profile}) and its section of bench/README.md")
        return
    update_readme_section("pipeline", readme(result))
    print(f"wrote {path} and the pipeline section of bench/README.md")


def refresh_facts(args) -> None:
    data = yaml.safe_load((args.work / "run.yaml").read_text())
    results = _previous_results()
    key = f"cpu_profile_{args.cpu_profile}" if args.cpu_profile != "native" else None
    target = results[key] if key else results
    target.update(release_facts(args.work / "out", data))
    (REPO / "bench" / "results" / "pipeline.json").write_text(json.dumps(results, indent=2) + "\n")
    if key:
        update_readme_section(f"pipeline-{args.cpu_profile}", readme_profile(target))
    print(f"refreshed the release facts of {key or 'the native run'} from {args.work}")


def _previous_results() -> dict:
    path = REPO / "bench" / "results" / "pipeline.json"
    return json.loads(path.read_text()) if path.exists() else {}


def readme_profile(r: dict) -> str:
    stages = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["cold_task_seconds"].items(), key=lambda kv: -kv[1]))
    c = r["machine"]["cpu"]
    ok = "meets" if r["cold_s"] <= r["demo_goal_s"] else "misses"
    return f"""## pipeline on a CPU without AVX512-BF16 ({r["cpu_profile"]})

`python bench/pipeline.py --cpu-profile {r["cpu_profile"]}` (-> `bench/results/pipeline.json`, key
`cpu_profile_{r["cpu_profile"]}`): the default release (`make demo`'s config) cold, on {c["model"]} with torch and oneDNN
held to AVX2 kernels ({", ".join(f"{k}={v}" for k, v in c["kernel_env"].items())}), as on a CPU without AVX512-BF16;
compute dtypes the stages resolved (`compute_dtypes`): {", ".join(sorted(set(map(str, r.get("compute_dtypes", {}).values()))))}. Load average at the end: {r["machine"]["loadavg_1m_at_end"]}.

| run | wall (s) |
|---|---:|
| cold | {r["cold_s"]:.1f} ({ok} the {r["demo_goal_s"] / 60:.0f}-minute goal) |
| fully cached (median of {len(r["cached_s"])}) | {r["cached_median_s"]:.1f} |

Time inside tasks (s): {stages}. Verdict: {r["verdict"]}.
"""


def readme(r: dict) -> str:
    tasks = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["cold_task_seconds"].items(), key=lambda kv: -kv[1]))
    return f"""## pipeline

`python bench/pipeline.py` (-> `bench/results/pipeline.json`): `lorakit run` on {r["config"]}, each run a fresh
process with an ephemeral Prefect server. Cold: empty Prefect home, outputs and registry. Cached: the same
command again, {len(r["cached_s"])} times (median). Verdict of the run: {r["verdict"]}.

| run | wall (s) | share of cold |
|---|---:|---:|
| cold | {r["cold_s"]:.1f} | 100% |
| fully cached (median) | {r["cached_median_s"]:.1f} | {r["cached_over_cold"]:.1%} (goal < 5%) |
| Prefect overhead in the cold run | {r["prefect_overhead_s"]:.1f} | {r["prefect_overhead_share_of_cold"]:.1%} |

Overhead = wall time outside the task functions: process start, imports and the ephemeral server
({r["overhead_process_server_imports_s"]:.1f} s) plus orchestration inside the flow
({r["overhead_orchestration_in_flow_s"]:.1f} s). Time inside tasks (s): {tasks}. Shared, loaded 2-core machine.
"""


if __name__ == "__main__":
    main()
