"""The default release's scorecard, and which merge default keeps the tasks (issue 12, items 7-8).

Given the output folder of a ``lorakit run`` of the default release (``bench/pipeline.py`` keeps it in
``bench/work/pipeline/out``):

1. ``release``: the scorecard the release's own scorecard stage wrote (every task x base / adapter / merged /
   quantized, val and test, exact match, F1, NLL, retention, accuracy drop), the stage's wall time, and the gate's
   verdict, copied from the run's outputs (predictions left out); every stage's recorded wall time; and exact match
   on 40 fresh questions per task (``--fresh-questions``; unseen words and numbers) for the adapter, the merged
   and the quantized model.
2. ``merge_defaults``: the same adapters merged exactly by each candidate default (linear 1/n each, linear 1.0
   each = task arithmetic, TIES at density 0.5 with weights 1.0) and scored by ``build_scorecard`` without a
   quantized model: retention of each task on val and test, on exact match and on NLL, and the merged model's
   general-text perplexity against the base.

Usage: python bench/release_scorecard.py --release bench/work/pipeline/out [--work bench/work/release_scorecard]
       [--skip-merges] [--skip-fresh] [--fresh-questions 40] [--results release_scorecard]
Writes bench/results/RESULTS.json and the ``RESULTS`` section of bench/README.md (a release measured on another
kind of CPU gets its own name, e.g. ``--results release_scorecard_avx2``, beside the one the README cites).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import find_one, release_parser, update_readme_section, write_results  # noqa: E402
from bench.train_sweep import FRESH_QUESTIONS  # noqa: E402

CANDIDATES = {  # name -> merge_adapters keyword arguments (weights filled per adapter count)
    "linear_uniform": {"method": "linear", "weight": "1/n"},
    "linear_1.0_each": {"method": "linear", "weight": 1.0},
    "ties_d0.5_1.0_each": {"method": "ties", "weight": 1.0, "density": 0.5},
}


def release_card(out_dir: Path) -> tuple[Path, dict]:
    """The scorecard.json a release run's scorecard stage wrote (exactly one), and its content."""
    card = find_one(out_dir, "scorecard/*/scorecard.json")
    return card, json.loads(card.read_text())


def release_parts(out_dir: Path) -> dict:
    """Adapters, prep folders (by task, in the run config's order), merged model and scorecard of one run."""
    from lorakit.train.loop import read_train_record

    card, data = release_card(out_dir)
    tasks = list(data.get("task_order") or data["tasks"])
    adapters, preps = {}, {}
    for folder in sorted(out_dir.glob("adapters/*")):
        if not (folder / "lorakit_train.json").exists():
            continue
        record = read_train_record(folder)
        prep = Path(record.prep["path"]) if "path" in record.prep else None
        for task in tasks:
            if folder.name.startswith(task) or (prep is not None and prep.name.startswith(task)):
                adapters[task], preps[task] = folder, prep
    missing = [t for t in tasks if t not in adapters]
    if missing:
        raise SystemExit(f"--release {out_dir}: no adapter folder found for {missing}")
    for task in tasks:
        if preps[task] is None or not preps[task].exists():
            preps[task] = find_one(out_dir, f"prep/{task}*")
    return {"scorecard": card, "data": data, "tasks": tasks, "adapters": adapters, "preps": preps,
            "merged": find_one(out_dir, "merged/model-*")}


def summary(card: dict) -> dict:
    """Per task and split: exact match of every role, retention (EM, NLL), quantized accuracy drop."""
    out = {}
    for task, entry in card["tasks"].items():
        out[task] = {}
        for split, s in entry["splits"].items():
            out[task][split] = {
                "exact_match": {role: m.get("exact_match") for role, m in s["models"].items()},
                "nll": {role: m.get("mean_nll") for role, m in s["models"].items()},
                "retention_exact_match": (s["retention"].get("exact_match") or {}).get("value"),
                "retention_nll": (s["retention"].get("nll") or {}).get("value"),
                "accuracy_drop": s.get("accuracy_drop")}
    return out


def _baseline(search: dict) -> str:
    """The search's unsearched baseline, as the section names it (results before it was recorded: linear 1/n)."""
    b = search.get("baseline")
    if b is None or b["method"] != "regmean":
        return "1/n"
    return f"{b['method']} at {', '.join(f'{w:g}' for w in b['weights'])}"


def release_merge(merged: Path) -> dict:
    """How the release merged: method and weights, and when its merge searched them, what the search measured."""
    meta = json.loads((merged / "lorakit_merge.json").read_text())
    out = {"method": meta.get("method"), "weights": meta.get("weights"), "searched": "search" in meta}
    if "regmean" in meta:  # what RegMean read and how far each task's layer outputs moved (lorakit.merge.regmean)
        out["regmean"] = {k: meta["regmean"].get(k) for k in ("alpha", "examples", "tokens", "residual")}
    s = meta.get("search")
    if s:
        out["search"] = {k: s.get(k) for k in ("objective_name", "objective_chosen_by", "n_trials", "chosen",
                                               "stopped", "search_s", "trial_s_median", "report")}
        baseline = s["trials"][s["uniform"]]  # linear 1/n, or RegMean 1.0 each (lorakit.merge.search)
        out["search"]["baseline"] = {"method": baseline["method"], "weights": baseline["params"]["weights"]}
    return out


def merge_defaults(parts: dict, work: Path) -> dict:
    from lorakit.merge.core import merge_adapters
    from lorakit.scorecard.core import ScorecardTask, build_scorecard

    tasks = parts["tasks"]
    score_tasks = [ScorecardTask(t, parts["preps"][t], parts["adapters"][t]) for t in tasks]
    results = {}
    release_merge = json.loads((parts["merged"] / "lorakit_merge.json").read_text())
    for name, spec in CANDIDATES.items():
        weight = 1.0 / len(tasks) if spec["weight"] == "1/n" else float(spec["weight"])
        if (spec["method"] == release_merge.get("method") and spec.get("density") is None
                and release_merge.get("weights") == [weight] * len(tasks)):
            # the release's own merge: its scorecard already holds these numbers (same adapters, same merge)
            results[name] = {"method": spec["method"], "weights": [weight] * len(tasks), "density": None,
                             "from": "the release's own scorecard", "tasks": summary(parts["data"]),
                             "general_text": parts["data"].get("general_text")}
            continue
        merged = work / f"merged-{name}"
        if not merged.exists():
            merge_adapters([str(parts["adapters"][t]) for t in tasks], [weight] * len(tasks), merged,
                           method=spec["method"], output_kind="model", density=spec.get("density"), progress=False)
        started = time.perf_counter()
        card = build_scorecard(None, score_tasks, merged, None, output=work / f"card-{name}", force=True,
                               general="default", progress=True,
                               max_examples=(parts["data"].get("params") or {}).get("max_examples"))
        results[name] = {"method": spec["method"], "weights": [weight] * len(tasks),
                         "density": spec.get("density"), "wall_s": round(time.perf_counter() - started, 1),
                         "tasks": summary(card.data), "general_text": card.data.get("general_text")}
        print(name, json.dumps(results[name]["tasks"]), flush=True)
    return results


def fresh_exact_match(models: dict[tuple[str, str], str | Path], preps: dict[str, Path], work: Path,
                      progress: bool = True, n: int = FRESH_QUESTIONS) -> dict:
    """Exact match on ``n`` fresh questions per task (words and numbers the bundled data never uses;
    ``lorakit.data.bundled.generate.fresh_records``), prepared as the task's own data was (its max_length).

    ``models``: (task, role) -> model folder; a folder that serves several tasks is loaded once. Returns
    {task: {"n": questions, role: {"exact_match", "f1"}}}."""
    from bench.train_sweep import all_examples, fresh_prep

    examples = {}
    for task in dict.fromkeys(t for t, _ in models):
        max_length = json.loads((Path(preps[task]) / "prep.json").read_text())["max_length"]
        examples[task] = all_examples(fresh_prep(task, work, max_length, n=n))
    return exact_match_by_folder(models, examples, "fresh", progress)


def load_folder(folder: str | Path):
    """A model folder (HF, PEFT adapter or GPTQ/AWQ) loaded as ``lorakit eval`` loads it."""
    from lorakit.evaluate.loading import describe_model, load_eval_model, load_tokenizer

    spec = describe_model(folder)
    return load_eval_model(spec, tokenizer=load_tokenizer(spec), stage="eval")


def score_loaded(loaded, examples: dict, progress: bool = True) -> dict:
    """A loaded model scored on each of ``examples`` (key -> TaskExamples): key -> TaskAccuracy, its per-question
    ``predictions`` included (what flips against another model are counted from)."""
    from lorakit.evaluate import task_accuracy

    return {key: task_accuracy(loaded, ex, progress=progress) for key, ex in examples.items()}


def score_folder(folder: str | Path, examples: dict, progress: bool = True) -> dict:
    """One model folder loaded once and scored on each of ``examples``: :func:`score_loaded`."""
    return score_loaded(load_folder(folder), examples, progress)


def exact_match_by_folder(models: dict[tuple[str, str], str | Path], examples: dict, label: str,
                          progress: bool = True) -> dict:
    """Exact match of every (task, role) model on ``examples[task]`` (TaskExamples), each folder loaded once:
    {task: {"n": questions, role: {"exact_match", "f1"}}}, and where a task has a merged model, ``ROLE_vs_merged``
    for every other role but the adapter (``quantized_vs_merged``, ...): the answers that model lost and gained
    against the merged one, with McNemar's p-value (``lorakit.evaluate.flips``)."""
    from lorakit.evaluate.flips import answer_flips

    out: dict = {task: {"n": len(ex.records)} for task, ex in examples.items()}
    answers: dict[tuple[str, str], list[bool]] = {}
    by_folder: dict[str, list[tuple[str, str]]] = {}
    for key, folder in models.items():
        by_folder.setdefault(str(folder), []).append(key)
    for folder, keys in by_folder.items():
        for (task, role), acc in score_folder(folder, {key: examples[key[0]] for key in keys}, progress).items():
            out[task][role] = {"exact_match": acc.exact_match, "f1": acc.f1}
            answers[task, role] = [bool(p.exact) for p in acc.predictions]
            print(task, role, f"{label} EM {acc.exact_match:.1%}", flush=True)
    for (task, role), mine in answers.items():
        if role not in ("merged", "adapter") and (task, "merged") in answers:
            out[task][f"{role}_vs_merged"] = answer_flips(answers[task, "merged"], mine).to_dict()
    return out


def release_models(parts: dict, out_dir: Path) -> dict[tuple[str, str], Path]:
    """(task, role) -> folder for every task's adapter, the merged and the quantized model of a release."""
    quantized = find_one(out_dir, "quantized/*", dirs=True)
    models = {}
    for task in parts["tasks"]:
        models.update({(task, "adapter"): parts["adapters"][task], (task, "merged"): parts["merged"],
                       (task, "quantized"): quantized})
    return models


def all_test_scores(parts: dict, out_dir: Path) -> dict:
    """Exact match of each task's adapter, the merged and the quantized model on every question of the task's test
    split (the release scorecard reads its first ``scorecard.max_examples``)."""
    from lorakit.evaluate.accuracy import read_task_examples

    examples = {task: read_task_examples(parts["preps"][task], "test", None) for task in parts["tasks"]}
    return exact_match_by_folder(release_models(parts, out_dir), examples, "test")


def fresh_scores(parts: dict, out_dir: Path, work: Path, n: int = FRESH_QUESTIONS) -> dict:
    """The release's fresh-question scores: each task's adapter, the merged and the quantized model."""
    return fresh_exact_match(release_models(parts, out_dir), parts["preps"], work, n=n)


def quantization_line(release: dict) -> str:
    """What the quantize stage used (results written before it was recorded say nothing)."""
    q = release.get("quantization")
    if not q:
        return ""
    zero = "symmetric" if q["sym"] else "with a zero point"
    tuning = q.get("tuning")
    tuned = "" if not tuning else (
        f", scales tuned {tuning['steps']} steps (held-out KL {tuning['held_out_kl_before']} -> "
        f"{tuning['held_out_kl_after']}, {tuning['seconds']:.0f} s" + ("" if tuning["kept"] else ", not kept") + ")")
    return (f" Quantization: {q['method'].upper()} {q['bits']}-bit, group {q['group_size']}, {zero}"
            + (", act-order" if q.get("desc_act") else "") + tuned + ".")


def training_line(release: dict) -> str:
    """The adapters' compute dtype, training seed and steps (one phrase; results written before the seed was recorded
    say only the dtype), so two runs of the same recipe that differ only there are told apart, and runs of two
    recipes (steps, tokens per step, learning rate) are too."""
    training = release.get("adapter_training") or {}
    runs = list(training.values())
    if not runs:
        return ""
    dtypes = sorted({r.get("compute_dtype") for r in runs if r.get("compute_dtype")})
    seeds = sorted({r["seed"] for r in runs if r.get("seed") is not None})
    parts = [f"compute dtype {', '.join(dtypes)}"] if dtypes else []
    parts += [f"seed {', '.join(map(str, seeds))}"] if seeds else []
    steps = [f"{task} {r['steps']} steps of ~{r['tokens'] / r['steps']:.0f} tokens at lr {r['lr']:g}"
             for task, r in sorted(training.items()) if r.get("steps") and r.get("tokens")]
    parts += ["; ".join(steps)] if steps else []
    return f" Adapters trained with {', '.join(parts)}." if parts else ""


def readme(release: dict, merges: dict | None, name: str = "release_scorecard") -> str:
    tail = "" if name == "release_scorecard" else f" --results {name}"
    fresh_n = next((f.get("n", FRESH_QUESTIONS) for f in (release.get("fresh") or {}).values()), FRESH_QUESTIONS)
    tail += "" if fresh_n == FRESH_QUESTIONS else f" --fresh-questions {fresh_n}"
    tail += " --all-test" if release.get("all_test") else ""
    lines = [f"## {name}", "",
             f"`python bench/release_scorecard.py --release {release['source']}{tail}`: the release's own scorecard "
             f"(stage wall time {release['scorecard_wall_s']:.0f} s, {release['scorecard_share_of_span']:.0%} of the "
             f"{release['stage_span_s']:.0f} s during which a stage ran; training "
             f"{release['training_span_s']:.0f} s of it), exact match per model." + quantization_line(release)
             + training_line(release), "",
             "| task | split | base | adapter | merged | quantized | retention (EM) | retention (NLL) | quantized drop |",
             "|---|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    def pct1(x):  # fresh and all-test scores: one answer of 200 is half a point
        return "-" if x is None else f"{x:.1%}"

    def num(x):
        return "-" if x is None else f"{x:.2f}"

    for task, splits in release["summary"].items():
        for split, s in splits.items():
            em = s["exact_match"]
            lines.append(f"| {task} | {split} | {pct(em.get('base'))} | {pct(em.get('adapter'))} | "
                         f"{pct(em.get('merged'))} | {pct(em.get('quantized'))} | {num(s['retention_exact_match'])} | "
                         f"{num(s['retention_nll'])} | {num(None if s['accuracy_drop'] is None else 100 * s['accuracy_drop'])} pts |")
    def flips(f: dict) -> str:  # quantized_vs_merged
        return f" {f['lost']} / {f['gained']} (p {f['p_value']:.2g}) |"

    def exact_match_table(title: str, scores: dict) -> list[str]:  # {task: {role: {"exact_match"}}}
        # results written before the answers were compared have no such column
        compared = all("quantized_vs_merged" in t for t in scores.values())
        head = "| task | adapter | merged | quantized |" + (" quantized vs merged: lost / gained (McNemar p) |"
                                                            if compared else "")
        return ["", title, "", head, "|---|---|---|---|" + ("---|" if compared else "")] + [
            f"| {task} | {pct1(t['adapter']['exact_match'])} | {pct1(t['merged']['exact_match'])} | "
            f"{pct1(t['quantized']['exact_match'])} |{flips(t['quantized_vs_merged']) if compared else ''}" for task, t in scores.items()]

    if release.get("all_test"):
        n_test = "/".join(str(t["n"]) for t in release["all_test"].values())
        lines += exact_match_table(f"Every test question ({n_test} per task, `--all-test`), exact match:",
                                   release["all_test"])
    if release.get("fresh"):
        lines += exact_match_table(f"Fresh questions ({fresh_n} per task, words and numbers the bundled data never "
                                   "uses), exact match:", release["fresh"])
    g = release.get("general_text")
    if g and g.get("models"):
        lines += ["", f"General text ({next(iter(g['models'].values()))['tokens']} tokens of the shipped corpus), "
                  "perplexity of each model and its change against the base (quantized: against merged):", "",
                  "| model | perplexity | change |", "|---|---|---|"]
        for key, m in g["models"].items():
            ch = g["quantized_vs_merged"] if key == "quantized" else g["vs_base"].get(key)
            lines.append(f"| {key} | {m['ppl']:.2f} | {'-' if ch is None else f'{ch:+.1%}'}"
                         f"{' vs merged' if key == 'quantized' else ''} |")
    if release.get("gate"):
        from flows.report import verdict_line

        lines += ["", f"Gate: {verdict_line(release['gate'], 0.05)}."]
        lines += [f"- {c['check']}: {c['message']}" for c in release["gate"].get("scorecard_checks") or []]
    m = release.get("merge")
    if m:
        how = f"{m['method']} weights {', '.join(f'{w:.4g}' for w in m['weights'])}"
        if m.get("search"):
            r = m["search"]["report"]
            how += (f", chosen by the merge search ({m['search']['objective_name']}, {m['search']['n_trials']} trials, "
                    f"{m['search']['search_s']:.0f} s; worst-task retention val {r['val']['chosen']:.2f}, "
                    f"{_baseline(m['search'])} {r['val']['uniform']:.2f})")
        lines += ["", f"Merge: {how}."]
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in release["stage_seconds"].items())]
    if merges:
        lines += ["", "Merge defaults on the same adapters (exact merges, scored without quantization; general text: "
                  "the merged model's perplexity change against the base):", "",
                  "| merge | task | split | merged EM | retention (EM) | retention (NLL) | general text |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in merges.items():
            g = (m.get("general_text") or {}).get("vs_base", {}).get("merged")
            for task, splits in m["tasks"].items():
                for split, s in splits.items():
                    lines.append(f"| {name} | {task} | {split} | {pct(s['exact_match'].get('merged'))} | "
                                 f"{num(s['retention_exact_match'])} | {num(s['retention_nll'])} | "
                                 f"{'-' if g is None else f'{g:+.1%}'} |")
    return "\n".join(lines)


def adapter_training(adapter: Path) -> dict:
    """How an adapter of the release trained: threads, peak memory, time, dtype, steps, tokens, its recipe (learning
    rate, LoRA+ ratio, rank, dropout), and whether the shared-prompt path ran (with the token positions it computed);
    null where an older record lacks it."""
    from lorakit.train.loop import read_train_record

    rec = read_train_record(adapter)
    out = {k: getattr(rec, k) for k in ("torch_threads", "peak_rss_mib", "wall_time_s", "compute_dtype", "steps",
                                        "tokens", "computed_tokens")}
    for key in ("lr", "lora_plus_ratio", "r", "alpha", "dropout", "variant", "init", "seed"):
        out[key] = rec.config.get(key)
    out["shared_prefix"] = (rec.shared_prefix or {}).get("used")
    return out


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "release_scorecard")
    ap.add_argument("--skip-merges", action="store_true", help="keep the merge comparison already in the results file")
    ap.add_argument("--skip-fresh", action="store_true", help="keep the fresh-question scores already in the results "
                    "file when they are of the same --release, else record none")
    ap.add_argument("--fresh-questions", type=int, default=FRESH_QUESTIONS, help="fresh questions per task (at 40 "
                    "one answer is 2.5 points, more than the 2-point bar between merged and quantized)")
    ap.add_argument("--all-test", action="store_true", help="also score each adapter, the merged and the quantized "
                    "model on every test question (else keep those already in the results file for the same --release)")
    ap.add_argument("--results", default="release_scorecard", help="results file (bench/results/NAME.json) and README "
                    "section name")
    args = ap.parse_args()
    from lorakit.runtime import configure_threads

    configure_threads()
    parts = release_parts(args.release)
    card = parts["data"]
    gate = sorted(args.release.glob("gate/*/gate.json"))
    from bench.pipeline import span_seconds, stage_intervals

    intervals = stage_intervals(args.release)
    stages = {name: round(end - start, 1) for name, (start, end) in intervals.items()}
    total, span = sum(stages.values()), span_seconds(intervals)
    quant_meta = json.loads((find_one(args.release, "quantized/*") / "lorakit_quant.json").read_text())
    quant = quant_meta["params"]
    release = {"source": str(args.release), "tasks": parts["tasks"], "summary": summary(card),
               "quantization": {**{k: quant.get(k) for k in ("method", "bits", "group_size", "sym", "desc_act",
                                                            "tune_steps")},
                                "tuning": quant_meta.get("tuning") or None},
               "scorecard_wall_s": card.get("wall_s"),
               # each stage's own recorded wall time; their sum is the chain's time without Prefect's start-up
               "stage_seconds": stages, "stage_seconds_total": round(total, 1),
               "stage_seconds_by_stage": {kind: round(sum(v for k, v in stages.items() if k.split("/")[0] == kind), 1)
                                          for kind in sorted({k.split("/")[0] for k in stages})},
               "scorecard_share_of_stages": round(card["wall_s"] / total, 3) if total and card.get("wall_s") else None,
               # time during which a stage ran: less than the sum where stages overlapped (adapters at once)
               "stage_span_s": span, "training_span_s": span_seconds(intervals, "adapters"),
               "scorecard_share_of_span": round(card["wall_s"] / span, 3) if span and card.get("wall_s") else None,
               # where each adapter trained: its threads and its process's peak memory (null: not recorded then)
               "adapter_training": {task: adapter_training(p) for task, p in parts["adapters"].items()},
               "merge": release_merge(parts["merged"]),
               "general_text": card.get("general_text"),
               "timings": card.get("timings"), "params": card.get("params"),
               "gate": json.loads(gate[0].read_text()) if gate else None}
    previous = BENCH / "results" / f"{args.results}.json"
    kept = json.loads(previous.read_text()) if previous.exists() else {}
    # --skip-fresh keeps the fresh-question scores already recorded for this same release folder
    same = (kept.get("release") or {}).get("source") == str(args.release)
    release["fresh"] = ((kept["release"].get("fresh") if same else None) if args.skip_fresh
                        else fresh_scores(parts, args.release, args.work, args.fresh_questions))
    release["all_test"] = (all_test_scores(parts, args.release) if args.all_test
                           else (kept["release"].get("all_test") if same else None))
    merges = kept.get("merge_defaults") if args.skip_merges else merge_defaults(parts, args.work)
    path = write_results(args.results, {"release": release, "merge_defaults": merges})
    update_readme_section(args.results, readme(release, merges, args.results))
    print(path)


if __name__ == "__main__":
    main()
