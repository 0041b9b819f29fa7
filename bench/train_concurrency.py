"""Benchmark: the release's adapters trained one after another in one process vs side by side in child processes.

What ``train_concurrency: auto`` buys on this machine (``flows.release.train_adapters``). Both placements train
the default release's adapters (its prep and ``lora`` settings, from ``flows.plan.ReleasePlan`` of the default
config) for the same few optimizer steps, in one invocation, so the ratio compares like with like:

* **in turn**: ``lorakit.train.train_adapter`` for each dataset, one after another, with every core this process
  may use (what ``train_concurrency: 1`` does);
* **at once**: ``lorakit.train.train_in_child`` for each dataset, all started together, the cores split between
  them (:func:`lorakit.runtime.training_slots`, what ``auto`` picks here).

Wall time of each placement (model loading included, as in a run), final losses of both (the same training; only
the thread count, so float summation order, differs), each child's peak memory, the machine and its load.

    python bench/train_concurrency.py [--steps 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import BENCH, ensure_release_prep, machine, update_readme_section, write_results  # noqa: E402


def release_stage_args(work: Path, steps: int) -> list[dict]:
    """Prep (made here when missing) and training arguments of the default release's datasets, ``steps`` steps."""
    from flows.config import ReleaseConfig
    from flows.plan import ReleasePlan
    from lorakit.models import ensure_default_model

    cfg = ReleaseConfig(output_dir=str(work))
    plan = ReleasePlan(cfg)
    base = str(ensure_default_model())
    out = []
    for ds in cfg.datasets:
        prep = ensure_release_prep(plan, ds)
        params = {**plan.train(ds, prep)["params"], "base": base, "max_steps": steps, "checkpoint_every": None}
        out.append({"name": ds.name, "prep": prep, "params": params})
    return out


def in_turn(jobs: list[dict], work: Path) -> dict:
    from lorakit.train import train_adapter

    started, losses = time.perf_counter(), {}
    for job in jobs:
        result = train_adapter(job["prep"], work / "in-turn" / job["name"], force=True, progress=True, **job["params"])
        losses[job["name"]] = result.final_loss
    return {"wall_s": round(time.perf_counter() - started, 1), "final_loss": losses}


def at_once(jobs: list[dict], work: Path, threads: int) -> dict:
    """All at once, as the release flow runs them (``flows.parallel.run_concurrently``); a failure is raised."""
    from flows.parallel import run_concurrently
    from lorakit.train import train_in_child

    def one(job: dict):
        return train_in_child(job["prep"], work / "at-once" / job["name"], threads=threads, label=job["name"],
                              force=True, progress=True, **job["params"])

    started = time.perf_counter()
    results = dict(zip([j["name"] for j in jobs], run_concurrently(one, jobs, len(jobs))))
    wall = time.perf_counter() - started
    return {"wall_s": round(wall, 1), "final_loss": {n: r.final_loss for n, r in results.items()},
            "children": {n: {k: r.metadata.get(k) for k in ("torch_threads", "peak_rss_mib", "wall_time_s")}
                         for n, r in results.items()}}


def readme(data: dict) -> str:
    m = data["machine"]
    return "\n".join([
        "## train_concurrency", "",
        f"`python bench/train_concurrency.py --steps {data['steps']}`: the default release's {len(data['tasks'])} adapters, "
        f"{data['steps']} QLoRA steps each, on {m['cpu']['model']} ({data['in_turn']['threads']} cores for this process, "
        f"1-min load {data['machine_before']['loadavg_1m_at_end']} before, {m['loadavg_1m_at_end']} after).", "",
        "| placement | threads | wall s |", "|---|---|---|",
        f"| in turn, one process | {data['in_turn']['threads']} | {data['in_turn']['wall_s']:.0f} |",
        f"| at once, a process each | {data['at_once']['threads']} each | {data['at_once']['wall_s']:.0f} |", "",
        f"At once / in turn: {data['speedup']:.2f}x faster. Final losses in turn "
        + ", ".join(f"{k} {v:.4f}" for k, v in data['in_turn']['final_loss'].items()) + "; at once "
        + ", ".join(f"{k} {v:.4f}" for k, v in data['at_once']['final_loss'].items())
        + " (same training, other thread counts). Peak memory per child (MiB): "
        + ", ".join(f"{k} {v['peak_rss_mib']}" for k, v in data['at_once']['children'].items()) + "."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "train_concurrency")
    args = ap.parse_args()
    from lorakit.runtime import configure_threads, quiet_third_party_logs, training_slots

    quiet_third_party_logs()
    cores = configure_threads()
    jobs = release_stage_args(args.work, args.steps)
    slots, threads = training_slots("auto", len(jobs), "cpu")
    if threads is None:
        raise SystemExit(f"{cores} core(s): auto trains one adapter at a time here; nothing to compare")
    before = machine()  # the load before the runs
    turn = {**in_turn(jobs, args.work), "threads": cores}
    once = {**at_once(jobs, args.work, threads), "threads": threads, "slots": slots}
    data = {"steps": args.steps, "tasks": [j["name"] for j in jobs], "in_turn": turn, "at_once": once,
            "speedup": round(turn["wall_s"] / once["wall_s"], 3), "machine_before": before}
    path = write_results("train_concurrency", data)
    data["machine"] = machine()
    update_readme_section("train_concurrency", readme(data))
    print(path, f"speedup {data['speedup']:.2f}x")


if __name__ == "__main__":
    main()
