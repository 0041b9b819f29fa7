"""Benchmark: adapters on the top decoder layers only (``lora.layers``), against adapters on every layer, in one run.

**Time.** The default release's training recipe for one task (its prep, ``lora`` settings and per-task overrides
from ``configs/default.yaml``) runs ``--time-steps`` optimizer steps with each ``--layers`` spec, each in its own
``lorakit train`` process at one torch thread (as a release trains its adapters side by side), the specs in turn and
then in reverse order; reported: seconds per step (median over both runs, first step left out) and each spec's
speed-up over ``all``.

**What the adapter learns.** Each spec's adapter trained with the whole recipe (``--adapter SPEC=DIR`` for one
trained already, e.g. by a release run; ``--train`` trains the missing ones here): exact match on every question
of the task's test split and on ``--fresh-questions`` fresh questions (words and numbers the bundled data never
uses), the answers each spec lost and gained against ``all`` on the same questions (McNemar p and the drop's 95%
interval, ``lorakit.evaluate.flips``), and perplexity on the gate's general text against the base's (forgetting).
An adapter given with ``--adapter`` must have been trained with the recipe but for ``layers`` (refused otherwise).

    LORAKIT_THREADS=1 python bench/train_layers.py --task reverse-words --layers all top:15 top:10 \\
        [--adapter all=DIR ...] [--train] [--steps top:15=504] [--time-steps 12] [--fresh-questions 2000] \\
        [--results train_layers]

``--steps SPEC=N`` trains SPEC for N steps instead of the recipe's: N = the recipe's steps x SPEC's measured
speed-up gives it the training time ``all`` takes, the comparison that says whether the saving buys anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import cpu_line, ensure_release_prep, update_readme_section, write_results  # noqa: E402

WORK = REPO / "bench" / "work" / "train_layers"
# What may differ between two adapters of one comparison besides the layers (checkpoint cadence and the sanity
# threshold change nothing that is trained).
NOT_THE_RECIPE = ("layers", "checkpoint_every", "min_loss_drop")


def release_recipe(task: str) -> tuple[str, dict]:
    """The default release's prep folder for ``task`` and the ``lorakit train`` options its adapter trains with."""
    from flows.config import load_config
    from flows.plan import ReleasePlan

    cfg = load_config(REPO / "configs" / "default.yaml")
    plan = ReleasePlan(cfg.model_copy(update={"output_dir": str(WORK / "release")}))
    ds = next((d for d in cfg.datasets if d.name == task), None)
    if ds is None:
        raise SystemExit(f"--task {task}: the default config's tasks are {', '.join(d.name for d in cfg.datasets)}")
    prep = ensure_release_prep(plan, ds)
    return prep, plan.train(ds, prep)["params"]


def cli_args(params: dict, layers: str, steps: int | None = None) -> list[str]:
    """``lorakit train`` options for ``params`` (a plan's train params) with ``layers`` (and ``steps`` if given)."""
    params = {**params, "layers": layers, "checkpoint_every": None, "min_loss_drop": None}
    if steps is not None:
        params.update(max_steps=steps, epochs=None)
    args = []
    for key, value in params.items():
        if key in ("progress", "force", "resume") or value is None and key not in ("checkpoint_every", "min_loss_drop"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, "none" if value is None else str(value)]
    return args


def train(prep: str, params: dict, layers: str, out: Path, steps: int | None = None) -> dict:
    """One ``lorakit train`` process at one thread; its record (lorakit_train.json) and per-step seconds."""
    env = {**os.environ, "LORAKIT_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorakit", "train", prep, "-o", str(out), "--force", *cli_args(params, layers, steps)]
    print(" ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    record = json.loads((out / "lorakit_train.json").read_text())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {"record": record, "step_s": [e["step_time_s"] for e in log if "step_time_s" in e]}


def measure_time(prep: str, params: dict, specs: list[str], steps: int) -> dict:
    """Seconds per optimizer step of each spec: two runs each, in turn and then in reverse order."""
    runs: dict[str, list[float]] = {spec: [] for spec in specs}
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        for order in (specs, specs[::-1]):
            for spec in order:
                got = train(prep, params, spec, Path(tmp) / spec.replace(":", "-"), steps)
                runs[spec] += got["step_s"][1:]  # the first step pays for warm-up
    median = {spec: statistics.median(v) for spec, v in runs.items()}
    return {"steps_per_run": steps, "runs_per_spec": 2, "loadavg_at_end": os.getloadavg()[0],
            "step_s": {spec: round(v, 3) for spec, v in median.items()},
            "speedup_vs_all": ({spec: round(median["all"] / v, 2) for spec, v in median.items()}
                               if "all" in median else {}),
            "all_steps_s": {spec: [round(t, 3) for t in v] for spec, v in runs.items()}}


def check_recipe(spec: str, folder: Path, prep: str, params: dict) -> dict:
    """The adapter's train record, refused unless it trained on ``prep``'s data with the recipe (``params``, its
    step count as ``--steps`` set it) and ``spec``."""
    record = json.loads((folder / "lorakit_train.json").read_text())
    digest = json.loads((Path(prep) / "prep.json").read_text())["data_digest"]
    if record["prep"]["digest"] != digest:
        raise SystemExit(f"{folder}: trained on other data ({record['prep']['path']}) than the release's {prep}")
    config = record["config"]
    if config.get("layers", "all") != spec:
        raise SystemExit(f"{folder}: trained with layers {config.get('layers', 'all')!r}, given as {spec!r}")
    differ = [k for k, v in params.items() if k in config and k not in NOT_THE_RECIPE and config[k] != v]
    if differ:
        raise SystemExit(f"{folder}: trained with other {', '.join(differ)} than the release recipe: "
                         + ", ".join(f"{k} {config[k]!r} (recipe {params[k]!r})" for k in differ))
    return record


def score(adapters: dict[str, Path], prep: str, task: str, fresh_n: int) -> dict:
    """Each adapter on every test question, ``fresh_n`` fresh ones and the general text; flips against ``all``."""
    from bench.release_scorecard import load_folder, score_loaded
    from bench.train_sweep import all_examples, fresh_prep, general_text
    from lorakit.evaluate.accuracy import read_task_examples
    from lorakit.evaluate.flips import answer_flips

    examples = {"test": read_task_examples(Path(prep), "test", None)}
    if fresh_n:
        max_length = json.loads((Path(prep) / "prep.json").read_text())["max_length"]
        examples["fresh"] = all_examples(fresh_prep(task, WORK, max_length, n=fresh_n))
    out, answers = {}, {}
    for spec, folder in adapters.items():
        loaded = load_folder(folder)  # once, for the answers and the general text
        scored = score_loaded(loaded, examples)
        out[spec] = {"general_text": general_text(loaded)}
        for split, acc in scored.items():
            answers[spec, split] = [bool(p.exact) for p in acc.predictions]
            out[spec][split] = {"n": len(acc.predictions), "exact_match": acc.exact_match}
            print(spec, split, f"EM {acc.exact_match:.1%}", flush=True)
    for spec in adapters:
        for split in examples:
            if spec != "all" and ("all", split) in answers:
                out[spec][split]["vs_all"] = answer_flips(answers["all", split], answers[spec, split]).to_dict()
    return out


def readme(data: dict) -> str:
    t, task = data.get("time"), data["task"]
    lines = [f"## {data['benchmark']}", "",
             f"`{data['usage']}` → `bench/results/{data['benchmark']}.json`. The default release's recipe for "
             f"**{task}**, with LoRA on every decoder layer (`all`) or on the top ones only (`top:N`, PEFT's "
             f"`layers_to_transform`); {cpu_line(data['machine']['cpu'])}.", ""]
    if t:
        lines += [f"Time: {t['steps_per_run']} optimizer steps per run, two runs per spec (in turn, then reversed), "
                  f"one thread each, load average {t['loadavg_at_end']:.1f} at the end.", "",
                  "| layers | s / step | speed-up over all |", "|---|---:|---:|"]
        lines += [f"| {spec} | {s:.2f} | {t['speedup_vs_all'].get(spec, float('nan')):.2f}x |"
                  for spec, s in t["step_s"].items()]
        lines.append("")
    acc = data.get("accuracy")
    if acc:
        lines += ["What each adapter learned, with the whole recipe (test: every test question; fresh: questions of "
                  "words and numbers the bundled data never uses; general text: perplexity on the gate's corpus "
                  "against the base's):", "",
                  "| layers | trained in | test EM | fresh EM | fresh vs all: lost / gained (p; drop's 95% interval) "
                  "| general text vs base |", "|---|---:|---:|---:|---|---:|"]
        for spec, row in acc.items():
            fresh = row.get("fresh", {})
            flips = fresh.get("vs_all")
            vs = (f"{flips['lost']} / {flips['gained']} (p {flips['p_value']:.2g}; "
                  f"{flips['drop_ci95'][0] * 100:.1f} to {flips['drop_ci95'][1] * 100:.1f} points)") if flips else "—"
            wall = data["trained"][spec]
            lines.append(f"| {spec} | {wall['wall_time_s']:.0f} s ({wall['steps']} steps, {wall['threads']} thread) "
                         f"| {row['test']['exact_match']:.1%} | "
                         f"{fresh['exact_match']:.1%} | {vs} | {row['general_text']['vs_base']:+.1%} |"
                         if fresh else f"| {spec} | {wall['wall_time_s']:.0f} s | {row['test']['exact_match']:.1%} "
                         f"| — | — | {row['general_text']['vs_base']:+.1%} |")
        lines += ["", "Training times in that table come from each adapter's own record: adapters trained in other "
                  "runs (a release's, beside its other adapter) do not compare in time; the time table does."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="reverse-words")
    ap.add_argument("--layers", nargs="+", default=["all", "top:15", "top:10"])
    ap.add_argument("--adapter", action="append", default=[], metavar="SPEC=DIR")
    ap.add_argument("--train", action="store_true", help="train the specs no --adapter names, with the whole recipe")
    ap.add_argument("--steps", action="append", default=[], metavar="SPEC=N",
                    help="train SPEC for N steps instead of the recipe's (e.g. the steps 'all' takes the time of)")
    ap.add_argument("--time-steps", type=int, default=12, help="0 = no timing")
    ap.add_argument("--fresh-questions", type=int, default=2000)
    ap.add_argument("--results", default="train_layers")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    given = dict(a.split("=", 1) for a in args.adapter)
    unknown = set(given) - set(args.layers)
    if unknown:
        raise SystemExit(f"--adapter {', '.join(sorted(unknown))}: not in --layers {' '.join(args.layers)}")
    prep, params = release_recipe(args.task)
    steps = {spec: int(n) for spec, n in (a.split("=", 1) for a in args.steps)}
    started = time.time()
    data: dict = {"task": args.task, "prep": prep, "recipe": {k: v for k, v in params.items() if k != "progress"},
                  "steps": steps,
                  "usage": "LORAKIT_THREADS=1 python bench/train_layers.py " + " ".join(sys.argv[1:])}
    if args.time_steps:
        data["time"] = measure_time(prep, params, args.layers, args.time_steps)
    adapters: dict[str, Path] = {}
    for spec in args.layers:
        if spec in given:
            adapters[spec] = Path(given[spec])
        elif args.train:
            tag = f"-{steps[spec]}steps" if spec in steps else ""
            adapters[spec] = WORK / f"{args.task}-{spec.replace(':', '-')}{tag}"
            if not (adapters[spec] / "lorakit_train.json").exists():
                train(prep, params, spec, adapters[spec], steps.get(spec))
    if adapters:
        records = {spec: check_recipe(spec, folder, prep, {**params, **({"max_steps": steps[spec], "epochs": None}
                                                                       if spec in steps else {})})
                   for spec, folder in adapters.items()}
        data["trained"] = {spec: {"folder": str(adapters[spec]), "wall_time_s": r["wall_time_s"], "steps": r["steps"],
                                  "threads": r.get("torch_threads"), "trainable_params": r["trainable_params"],
                                  "compute_dtype": r["compute_dtype"], "seed": r["config"]["seed"]}
                           for spec, r in records.items()}
        data["accuracy"] = score(adapters, prep, args.task, args.fresh_questions)
    data["wall_s"] = round(time.time() - started, 1)
    path = write_results(args.results, data)
    data = json.loads(path.read_text())
    update_readme_section(args.results, readme(data))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
