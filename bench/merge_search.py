"""Merge-weight search on the default release: searched vs uniform 1/n vs 1.0 each, worst-task retention.

The default release's two adapters are built exactly as ``lorakit run configs/default.yaml`` builds them (the
stage arguments come from ``flows.plan.ReleasePlan`` of the default config: prep, then QLoRA training with the
default ``lora`` section), under ``bench/work/merge_search`` (kept between runs; delete it to retrain). Then
``lorakit.merge.search.search_merge`` searches the linear merge weights on the tasks' val splits with the gate's
window length, writes the chosen merge as a model folder and reports val and test. The 1.0-each merge is scored
here with the same in-memory evaluator (its denominators are the search's own base and adapter NLLs).

Time per trial vs one evaluation pass: the search's median trial (merge applied in memory + scoring both val
splits) against ``lorakit.evaluate.perplexity`` of the written merged model on the same val splits (scoring time,
load excluded): what a trial would cost at least if every candidate were a model on disk. Goal: <= 1.5x.

``--objective accuracy``: the search maximises the worst task's retention of greedy exact match on val instead
(``objective="accuracy"``), the uniform and 1.0-each merges scored by the same exact-match evaluator, and the val
NLL of base and adapters recorded (whether the NLL objective could run); written to
``results/merge_search_accuracy.json`` and the README section ``## merge_search_accuracy``.

``--release-out DIR`` takes the preps and adapters of a finished default release (``DIR/prep/NAME-*``,
``DIR/adapters/NAME-*``, e.g. the ``output_dir`` of ``bench/release_scorecard.py``) instead of training them again;
their training configuration is read from each adapter's ``lorakit_train.json`` and checked against the default.

    LORAKIT_THREADS=1 python -m bench.merge_search [--max-trials 16] [--methods linear] [--objective accuracy]
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from bench.common import ensure_release_prep, find_one, update_readme_section, write_results

WORK = Path(__file__).resolve().parent / "work" / "merge_search"
GOAL = 1.5


def build_release_adapters(work: Path) -> tuple[dict[str, str], list[str], dict]:
    """The default release's preps and adapters, made by the stage calls the release flow makes."""
    from flows.config import ReleaseConfig
    from flows.plan import ReleasePlan
    from lorakit.train import train_adapter

    cfg = ReleaseConfig(output_dir=str(work / "out"))
    plan = ReleasePlan(cfg)
    preps, adapters, made = {}, [], {}
    for ds in cfg.datasets:
        prep = ensure_release_prep(plan, ds)
        t = plan.train(ds, prep)
        if not Path(t["output"], "adapter_config.json").exists():
            t0 = time.perf_counter()
            train_adapter(t["prep_dir"], t["output"], force=True, progress=True, **t["params"])
            made[f"train_{ds.name}_s"] = round(time.perf_counter() - t0, 1)
        preps[ds.name] = prep
        adapters.append(t["output"])
    return preps, adapters, {"config": "configs/default.yaml defaults (flows.config.ReleaseConfig())",
                             "lora": cfg.lora.model_dump(), "seq_len": cfg.gate.seq_len, **made}


def release_adapters(out: Path) -> tuple[dict[str, str], list[str], dict]:
    """The preps and adapters of a finished default release under ``out``; refuses ones trained otherwise."""
    from flows.config import ReleaseConfig
    from lorakit.io.atomic import read_json

    cfg = ReleaseConfig(output_dir=str(out))
    preps, adapters = {}, []
    for ds in cfg.datasets:
        found = {kind: [find_one(out, f"{kind}/{ds.name}-*", dirs=True)] for kind in ("prep", "adapters")}
        used = read_json(found["adapters"][0] / "lorakit_train.json", "train metadata")["config"]
        wanted = cfg.lora.model_dump()
        if wanted["max_steps"] is None and wanted["epochs"] is None:  # what train_adapter records for "the default"
            from lorakit.train.options import DEFAULT_MAX_STEPS

            wanted["max_steps"] = DEFAULT_MAX_STEPS
        differs = {k: (used.get(k), v) for k, v in wanted.items() if k in used and used.get(k) != v
                   and not (isinstance(v, float) and used.get(k) == v)}
        if differs:
            raise SystemExit(f"{found['adapters'][0]} was not trained with the default lora section: {differs}")
        preps[ds.name] = str(found["prep"][0])
        adapters.append(str(found["adapters"][0]))
    return preps, adapters, {"config": f"configs/default.yaml defaults, adapters of the release run in {out}",
                             "lora": cfg.lora.model_dump(), "seq_len": cfg.gate.seq_len}


def in_memory_evaluator(adapters: list[str], preps: dict[str, str], base: str, seq_len: int, *,
                        objective: str = "nll", batch_size: int = 4):
    """The search's own evaluator on the base loaded once (what the bench scores merges and denominators with)."""
    import torch

    from lorakit.adapters import load_adapter
    from lorakit.merge.in_memory import InMemoryMerge
    from lorakit.merge.options import MERGE_SEARCH
    from lorakit.merge.search import Evaluator, task_streams

    loaded = [load_adapter(a) for a in adapters]
    # the search's default examples (the first 50 of each split), so its numbers and these score the same ones
    streams = task_streams(list(preps.items()), loaded, Path(base), seq_len, None, objective, MERGE_SEARCH.max_examples)
    return Evaluator(InMemoryMerge(Path(base), loaded, torch.device("cpu")), streams,
                     batch_size=batch_size, objective=objective)


def ones_each(ev, denominators: dict[str, tuple[dict, dict]], n: int) -> dict:
    """The linear merge at weight 1.0 per adapter, per split, retention against the given (base, adapter) scores."""
    from lorakit.merge.linear import LINEAR

    out = {}
    for split, (b, a) in denominators.items():
        scores, _ = ev.merged_scores(LINEAR, {"weights": [1.0] * n}, split)
        ret = ev.retentions(b, a, scores)
        out[split] = {ev.metric: scores, "retention": ret, "worst_retention": min(ret.values())}
    return out


def accuracy_search(adapters: list[str], preps: dict[str, str], base: str, seq_len: int, max_trials: int,
                    time_budget: float, methods: list[str] | None = None) -> dict:
    """The search with the accuracy objective, and the uniform and 1.0-each merges by the same exact-match scorer."""
    from lorakit.merge.search import search_merge

    out = WORK / "searched-accuracy"
    result = search_merge(adapters, preps, out, objective="accuracy", max_trials=max_trials, time_budget_s=time_budget,
                          methods=methods or ["linear"], output_kind="model", base=base, seq_len=seq_len, device="cpu",
                          force=True, progress=True)
    s = result.metadata["search"]
    chosen, uniform = s["trials"][s["chosen"]], s["trials"][s["uniform"]]
    ev = in_memory_evaluator(adapters, preps, base, seq_len, objective="accuracy", batch_size=s["method"]["batch_size"])
    denominators = {"val": ({k: v["base_exact_match"] for k, v in s["tasks"].items()},
                            {k: v["adapter_exact_match"] for k, v in s["tasks"].items()}),
                    "test": (s["test"]["base_exact_match"], s["test"]["adapter_exact_match"])}
    ones = {split: {**v, "worst_retention": round(v["worst_retention"], 4)}
            for split, v in ones_each(ev, denominators, len(adapters)).items()}

    def row(trial: dict, test: dict) -> dict:
        return {"method": trial["method"], "params": trial["params"],
                "val": {"worst_retention": round(trial["worst_retention"], 4), "retention": trial["retention"],
                        "exact_match": trial["exact_match"]},
                "test": {"worst_retention": test["worst_retention"], "retention": test["retention"],
                         "exact_match": test["exact_match"]}}

    return {"objective": s["objective"], "methods": s["methods"], "n_trials": s["n_trials"], "stopped": s["stopped"],
            "search_s": s["search_s"],
            "trial_s_median": s["trial_s_median"], "tasks": s["tasks"],
            "test_denominators": {"base_exact_match": s["test"]["base_exact_match"],
                                  "adapter_exact_match": s["test"]["adapter_exact_match"]},
            "variants": {"searched": row(chosen, s["test"]["chosen"]), "uniform": row(uniform, s["test"]["uniform"]),
                         "ones": {"method": "linear", "params": {"weights": [1.0] * len(adapters)}, **ones}},
            "trials": [{"params": t["params"], "exact_match": t["exact_match"],
                        "worst_retention": round(t["worst_retention"], 4), "seconds": t["seconds"]}
                       for t in s["trials"]]}


def train_meta(adapter: str) -> dict:
    from lorakit.io.atomic import read_json

    meta = read_json(Path(adapter) / "lorakit_train.json", "train metadata")
    return {k: meta.get(k) for k in ("steps", "first_loss", "final_loss", "compute_dtype") if k in meta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-trials", type=int, default=16)
    ap.add_argument("--time-budget", type=float, default=3600.0)
    ap.add_argument("--methods", default="linear")
    ap.add_argument("--objective", choices=["nll", "accuracy"], default="nll",
                    help="nll -> results/merge_search.json; accuracy -> results/merge_search_accuracy.json")
    ap.add_argument("--release-out", type=Path, help="use the preps and adapters of this finished default release")
    ap.add_argument("--readme-only", action="store_true", help="rewrite the README section from the result file")
    ap.add_argument("--results", help="results file and README section name (default: by objective)")
    args = ap.parse_args()
    name = args.results or ("merge_search" if args.objective == "nll" else "merge_search_accuracy")
    if args.readme_only:
        import json

        data = json.loads((Path(__file__).parent / "results" / f"{name}.json").read_text())
        update_readme_section(name, readme(data) if args.objective == "nll" else accuracy_readme(data, name))
        return
    from lorakit.runtime import configure_threads

    configure_threads()
    import torch

    from lorakit.evaluate import perplexity
    from lorakit.merge.search import search_merge
    from lorakit.models import ensure_default_model

    preps, adapters, setup = (release_adapters(args.release_out) if args.release_out
                              else build_release_adapters(WORK))
    base = ensure_default_model()
    seq_len = setup["seq_len"]
    if args.objective == "accuracy":
        data = {"setup": {**setup, "base": str(base), "adapters": adapters, "data": preps,
                          "training": {n: train_meta(a) for n, a in zip(preps, adapters)},
                          "lorakit_commit": _git_commit(), "threads": torch.get_num_threads()},
                "nll_gain": nll_gains(adapters, preps, str(base), seq_len),
                **accuracy_search(adapters, preps, str(base), seq_len, args.max_trials, args.time_budget,
                                  args.methods.split(","))}
        print(f"wrote {write_results(name, data)}")
        update_readme_section(name, accuracy_readme(data, name))
        return
    out = WORK / "searched"
    t0 = time.perf_counter()
    result = search_merge(adapters, preps, out, methods=args.methods.split(","), max_trials=args.max_trials,
                          time_budget_s=args.time_budget, output_kind="model", base=str(base), seq_len=seq_len,
                          device="cpu", force=True, progress=True)
    wall = time.perf_counter() - t0
    s = result.metadata["search"]
    chosen, uniform = s["trials"][s["chosen"]], s["trials"][s["uniform"]]

    # 1.0 each, with the same evaluator and the search's own denominators
    ev = in_memory_evaluator(adapters, preps, str(base), seq_len, batch_size=s["method"]["batch_size"])
    ones = ones_each(ev, {"val": ({k: v["base_nll"] for k, v in s["tasks"].items()},
                                  {k: v["adapter_nll"] for k, v in s["tasks"].items()}),
                          "test": (s["test"]["base_nll"], s["test"]["adapter_nll"])}, len(adapters))
    del ev

    # one ordinary evaluation pass of the written merged model over the same val splits (scoring time)
    passes = [perplexity(str(out), p, seq_len=seq_len, device="cpu", progress=False) for p in preps.values()]
    eval_pass_s = sum(r.wall_s for r in passes)
    assert all(abs(r.mean_nll - chosen["nll"][n]) <= 1e-5 * abs(r.mean_nll) for r, n in zip(passes, preps)), \
        "the written model does not reproduce the chosen trial"

    def row(trial: dict, test: dict | None) -> dict:
        return {"method": trial["method"], "params": trial["params"],
                "val": {"worst_retention": round(trial["worst_retention"], 4),
                        "retention": {k: round(v, 4) for k, v in trial["retention"].items()}, "nll": trial["nll"]},
                "test": None if test is None else {"worst_retention": round(test["worst_retention"], 4),
                                                   "retention": {k: round(v, 4) for k, v in test["retention"].items()},
                                                   "nll": test["nll"]}}

    trial_s = s["trial_s_median"]
    data = {
        "setup": {**setup, "base": str(base), "adapters": adapters, "data": preps,
                  "training": {n: train_meta(a) for n, a in zip(preps, adapters)},
                  "lorakit_commit": _git_commit(), "threads": torch.get_num_threads()},
        "search": {"methods": s["methods"], "max_trials": args.max_trials, "n_trials": s["n_trials"],
                   "stopped": s["stopped"], "wall_s": round(wall, 1), "search_s": s["search_s"],
                   "tasks": s["tasks"], "test_denominators": {"base_nll": s["test"]["base_nll"],
                                                              "adapter_nll": s["test"]["adapter_nll"]},
                   "trials": [{"params": t["params"], "worst_retention": round(t["worst_retention"], 4),
                               "seconds": t["seconds"]} for t in s["trials"]]},
        "variants": {"searched": row(chosen, s["test"]["chosen"]), "uniform": row(uniform, s["test"]["uniform"]),
                     "ones": {"method": "linear", "params": {"weights": [1.0] * len(adapters)},
                              **{k: {"worst_retention": round(v["worst_retention"], 4),
                                     "retention": {t: round(x, 4) for t, x in v["retention"].items()},
                                     "nll": v["nll"]} for k, v in ones.items()}}},
        "timing": {"trial_s_median": trial_s, "apply_s_median": s["apply_s_median"],
                   "eval_pass_s": round(eval_pass_s, 3), "val_tokens": sum(r.tokens for r in passes),
                   "trial_vs_eval_pass": round(trial_s / eval_pass_s, 3), "goal": GOAL,
                   "meets_goal": trial_s / eval_pass_s <= GOAL,
                   "trial_vs_own_eval_median": s["trial_vs_eval_pass"]},
    }
    path = write_results("merge_search", data)
    print(f"wrote {path}")
    update_readme_section("merge_search", readme(data))


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def readme(d: dict) -> str:
    v, t, s = d["variants"], d["timing"], d["search"]
    rows = []
    for label, key in (("searched", "searched"), ("uniform 1/n", "uniform"), ("1.0 each", "ones")):
        x = v[key]
        w = ",".join(f"{a:g}" for a in x["params"]["weights"])
        test = x["test"]["worst_retention"] if x.get("test") else "n/a"
        rows.append(f"| {label} | {w} | {x['val']['worst_retention']:.3f} | {test:.3f} | "
                    f"{', '.join(f'{k} {r:.3f}' for k, r in x['test']['retention'].items())} |")
    gains = "; ".join(f"{k} {t['base_nll']:.4f} -> {t['adapter_nll']:.4f}" for k, t in s["tasks"].items())
    return "\n".join([
        "## merge_search",
        "",
        f"`LORAKIT_THREADS=1 python -m bench.merge_search` — the default release's two adapters "
        f"({d['setup']['config']}; {d['setup']['lora']['max_steps']} steps at lr {d['setup']['lora']['lr']:g}), "
        "linear merge weights searched on the val splits (worst task's retention of "
        f"NLL, `lorakit.evaluate.retention`), windows of {d['setup']['seq_len']} tokens; test is reported only. "
        f"{s['n_trials']} trials (stopped: {', '.join(f'{m} {w}' for m, w in s['stopped'].items())}), "
        f"search {s['search_s']:.0f} s. Shared, loaded 2-core CPU; single run.",
        "",
        "| merge | weights | worst-task retention, val | worst-task retention, test | test retention per task |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Val NLL, base -> its own adapter alone: {gains}. Retention divides by that gain: an adapter whose own gain "
        "is small gets a large, noisy retention from any merge that lowers its task's NLL by other means (here the "
        "other adapter), and the worst-task objective then stops protecting it.",
        "",
        f"Time per trial (merge applied in memory + both val splits scored): median {t['trial_s_median']:.1f} s, of "
        f"which applying the merge {t['apply_s_median']:.2f} s; one evaluation pass of the written merged model over "
        f"the same {t['val_tokens']} val tokens (`lorakit.evaluate.perplexity`, load excluded): "
        f"{t['eval_pass_s']:.1f} s; ratio {t['trial_vs_eval_pass']:.2f} (goal <= {t['goal']}).",
    ])


def nll_gains(adapters: list[str], preps: dict[str, str], base: str, seq_len: int) -> dict:
    """Val NLL of the base and of each adapter alone on its task: whether the NLL objective can run at all."""
    ev = in_memory_evaluator(adapters, preps, base, seq_len)
    b, a = ev.base_scores("val"), ev.adapter_scores("val")
    return {k: {"base_nll": round(b[k], 4), "adapter_nll": round(a[k], 4), "lowers_nll": a[k] < b[k]} for k in b}


def accuracy_readme(a: dict, name: str = "merge_search_accuracy") -> str:
    rows = []
    for label, key in (("searched (accuracy)", "searched"), ("uniform 1/n", "uniform"), ("1.0 each", "ones")):
        x = a["variants"][key]
        w = ",".join(f"{v:g}" for v in x["params"]["weights"])
        if x.get("method", "linear") != "linear":
            w = f"{x['method']} {w}" + (f", density {x['params']['density']:g}" if x["params"].get("density") else "")
        em = ", ".join(f"{k} {v:.3f}" for k, v in x["test"]["exact_match"].items())
        rows.append(f"| {label} | {w} | {x['val']['worst_retention']:.3f} | {x['test']['worst_retention']:.3f} | {em} |")
    gains = "; ".join(f"{k} {t['base_exact_match']:.3f} -> {t['adapter_exact_match']:.3f}" for k, t in a["tasks"].items())
    nll = "; ".join(f"{k} {g['base_nll']:.4f} -> {g['adapter_nll']:.4f}" for k, g in a["nll_gain"].items())
    refused = [k for k, g in a["nll_gain"].items() if not g["lowers_nll"]]
    trained = {str(t.get("steps")) for t in a["setup"].get("training", {}).values()}  # as recorded by each adapter
    steps = "/".join(sorted(trained)) if trained else a["setup"]["lora"]["max_steps"]
    why = (f"The NLL objective cannot run on these adapters: the adapter of {', '.join(refused)} does not lower its "
           f"task's val NLL (base -> adapter: {nll}), so the search refuses it as not learned, while exact match "
           "shows it did learn; that is what the accuracy objective is for." if refused else
           f"Val NLL, base -> adapter alone: {nll}.")
    methods = a.get("methods", ["linear"])
    tail = (f" --methods {','.join(methods)}" if methods != ["linear"] else "") + (
        f" --results {name}" if name != "merge_search_accuracy" else "")
    return "\n".join([
        f"## {name}",
        "",
        f"`LORAKIT_THREADS={a['setup'].get('threads', 1)} python -m bench.merge_search --objective accuracy --release-out DIR{tail}` — "
        f"`lorakit merge --search --objective accuracy` on the default release's two adapters "
        f"({a['setup']['config']}; {steps} steps at lr {a['setup']['lora']['lr']:g}): the "
        f"worst task's retention of greedy exact match on val, test reported only. {a['n_trials']} trials (stopped: "
        f"{', '.join(f'{m} {w}' for m, w in a['stopped'].items())}), median trial {a['trial_s_median']:.1f} s, search "
        f"{a['search_s']:.0f} s; shared 2-core CPU, single run. Val exact match, base -> adapter alone: {gains}.",
        "",
        "| merge | weights | worst-task EM retention, val | worst-task EM retention, test | test exact match |",
        "|---|---|---|---|---|",
        *rows,
        "",
        why,
    ])


if __name__ == "__main__":
    main()
