"""The quantize stage's run-to-run spread: one release's merged model rounded again under other calibration seeds.

Why: the bfloat16 seed-2 release at 360 steps lost 5 reverse-words test answers in 4 bits, half a point past the
2-point goal, while the same merged model quantized with the same settings at another thread count lost 2 and
gained 1 (``bench/results/keep_sensitive_bf16_rw360_seed2.json``, variant ``0-redone``). One rounding is one draw;
whether a release meets the 4-bit goal is then a probability per draw, and this bench measures it on one merged
model. It also answers whether choosing among roundings by the gate's split (val) would help: a roll's val drop
and its test / fresh-question drop are only worth selecting on if they go together.

Given the output folder of a finished ``lorakit run``: for each seed in ``--seeds``, the merged model is quantized
again with exactly the settings its ``lorakit_quant.json`` records (checked field by field after) except the
calibration shuffle's seed, at the bench's torch thread count (recorded: it orders GPTQ's float sums). The release's
own 4-bit model is the roll ``release``; ``--existing LABEL=FOLDER`` adds 4-bit models of the same merged model
quantized elsewhere (their settings are checked the same way). Every roll is judged as the release scorecard judges:
per-question greedy exact match on every val and test question and on fresh questions (``bench.release_scorecard``'s
generator), the answers it lost and gained against the merged model, and the release gate's perplexity and KL
checks (every task's val split and the general text). A roll meets the goals when on every task its test and
fresh-question exact match are within 2 points of the merged model's and general text within 5%; the gate passes it
when its val drops are within 2 points and every perplexity check within 5%.

Whether the rolls differ at all: with ``--fresh-questions`` in the thousands each roll's drop is measured to a
fraction of a point (its 95% interval is recorded), and the spread says whether the rolls' lost answers are consistent
with one common rate (a homogeneity test) and, from the rates pooled over every roll, how often a split of the test
split's size would show a drop past the 2-point bar by the luck of which questions it holds. If the rolls share one
rate, a roll that misses the goal on 200 questions is the evaluation's draw, not a worse rounding, and choosing
among roundings cannot help. ``--checks-from NAME`` takes the gate's perplexity checks of a 4-bit folder already
measured under ``--results NAME`` (same model, same data: the same numbers) instead of running them again.

Each roll is kept in ``WORK/roll-LABEL.json`` as soon as it is measured (the merged model's answers in
``WORK/merged.json``), so two runs with disjoint ``--seeds`` can go side by side (one thread each on a 2-core
machine), and each run writes the results of every roll the work folder holds.

Usage: LORAKIT_THREADS=1 python bench/quantize_spread.py --release OUT --seeds 1,2 [--existing redo=FOLDER]
           [--fresh-questions 200] [--checks-from NAME] [--results quantize_spread]
Writes bench/results/RESULTS.json and the ``RESULTS`` section of bench/README.md.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.calibration_mix import gate_checks, task_name  # noqa: E402
from bench.common import cpu_line, release_parser, update_readme_section, write_results  # noqa: E402
from bench.keep_sensitive import release_quantization, settings_differ  # noqa: E402
from bench.release_scorecard import FRESH_QUESTIONS, score_folder  # noqa: E402
from lorakit.evaluate.flips import Z95, answer_flips, drop_interval  # noqa: E402

SPLITS = ("val", "test", "fresh")
MAX_ACCURACY_DROP = 0.02  # the 4-bit goal and the gate's default max_accuracy_drop
MAX_DEGRADATION = 0.05  # the gate's default max_degradation and general_max_degradation
SEED_IS_A_ROLL = ("seed",)  # what a roll may change in the record besides thread count and timings
NO_SEEDS = "''"  # how the usage line writes an empty --seeds


def examples_by_split(preps: list[Path], work: Path, fresh_n: int) -> dict[str, dict]:
    """{split: {task: TaskExamples}}: every val and test question of each task and ``fresh_n`` fresh ones."""
    from bench.train_sweep import all_examples, fresh_prep
    from lorakit.evaluate.accuracy import read_task_examples

    out: dict[str, dict] = {split: {} for split in SPLITS}
    for prep in preps:
        task = task_name(prep)
        out["val"][task] = read_task_examples(prep, "val", None)
        out["test"][task] = read_task_examples(prep, "test", None)
        if fresh_n:
            max_length = json.loads((prep / "prep.json").read_text())["max_length"]
            out["fresh"][task] = all_examples(fresh_prep(task, work, max_length, n=fresh_n))
    return {split: tasks for split, tasks in out.items() if tasks}


def answers(folder: Path, examples: dict[str, dict]) -> dict[str, dict[str, list[bool]]]:
    """{split: {task: right/wrong per question}} of one model, loaded once."""
    scored = score_folder(folder, {(split, task): ex for split, tasks in examples.items() for task, ex in tasks.items()})
    out: dict[str, dict[str, list[bool]]] = {}
    for (split, task), acc in scored.items():
        out.setdefault(split, {})[task] = [bool(p.exact) for p in acc.predictions]
        print(folder.name, task, split, f"EM {acc.exact_match:.1%}", flush=True)
    return out


def save(path: Path, data: dict) -> None:
    from lorakit.io.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def claim(path: Path) -> bool:
    """Take ``path``'s measurement for this process (a ``.lock`` beside it), so runs side by side share the work;
    False when it is done or another run holds it (a run killed mid-roll leaves its lock: delete it to redo)."""
    if path.exists():
        return False
    try:
        os.close(os.open(path.with_suffix(".lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        print(f"{path.name}: another run is measuring it ({path.with_suffix('.lock')})", flush=True)
        return False
    return True


def measure_roll(label: str, folder: Path, merged: Path, preps: list[Path], examples: dict, release_meta,
                 quantize_s: float | None, threads: int, measured: dict[str, dict] | None = None) -> dict:
    """One 4-bit model's record: its settings against the release's, gate checks (taken from ``measured``, the
    roll records of an earlier run by folder, when it holds this folder) and per-question answers."""
    from lorakit.quantize import read_quant_meta

    meta = read_quant_meta(folder)
    params, release_params = meta.to_dict()["params"], release_meta.to_dict()["params"]
    differ = [k for k in settings_differ(release_meta, meta) if k not in SEED_IS_A_ROLL]
    differ += [k for k in ("module_bits", "keep_sensitive") if params.get(k) != release_params.get(k) and params.get(k)]
    if differ:
        raise SystemExit(f"roll {label}: {folder} was quantized with other settings than the release ({differ}); "
                         "it is not a roll of the same quantization")
    earlier = (measured or {}).get(str(folder))
    gate_s, checks = (earlier["gate_s"], earlier["checks"]) if earlier else gate_checks(merged, folder, preps)
    recorded_threads = params.get("threads") or None  # records before e06c42d leave it out
    return {"label": label, "folder": str(folder), "seed": meta.params.seed,
            "threads": threads if quantize_s is not None else recorded_threads,
            "quantize_s": round(quantize_s if quantize_s is not None else meta.wall_time_s, 1),
            "size_mb": round(meta.size_after_bytes / 1e6, 1), "tuning": meta.tuning, "checks": checks, "gate_s": gate_s,
            **({"checks_from": earlier["results"]} if earlier else {}), "answers": answers(folder, examples)}


def earlier_checks(work_root: Path, name: str | None) -> dict[str, dict]:
    """{4-bit folder: {checks, gate_s, results}} of every roll measured under ``--results name``."""
    if not name:
        return {}
    rolls = sorted((work_root / name).glob("roll-*.json"))
    if not rolls:
        raise SystemExit(f"--checks-from {name}: no roll measured in {work_root / name}")
    return {r["folder"]: {"checks": r["checks"], "gate_s": r["gate_s"], "results": name}
            for r in (json.loads(p.read_text()) for p in rolls)}


def p_drop_past(n: int, p_lost: float, p_gained: float, bar: float = MAX_ACCURACY_DROP) -> float:
    """Probability that ``n`` questions, each lost with probability ``p_lost`` and gained with ``p_gained``
    independently, show a drop (lost - gained) / n past ``bar``: how often a split of that size misses the bar by
    which questions it holds, when every roll shares the same per-question rates. Exact (trinomial sum)."""
    limit = math.floor(bar * n + 1e-9)  # the largest net loss still within the bar
    if p_lost <= 0:
        return 0.0
    p_none = 1.0 - p_lost - p_gained
    log = lambda x: math.log(x) if x > 0 else -math.inf  # noqa: E731
    total = 0.0
    for lost in range(limit + 1, n + 1):
        for gained in range(0, min(lost - limit - 1, n - lost) + 1):
            rest = n - lost - gained
            if (gained and p_gained <= 0) or (rest and p_none <= 0):
                continue
            total += math.exp(math.lgamma(n + 1) - math.lgamma(lost + 1) - math.lgamma(gained + 1)
                              - math.lgamma(rest + 1) + lost * log(p_lost) + (gained * log(p_gained) if gained else 0)
                              + (rest * log(p_none) if rest else 0))
    return min(total, 1.0)


def lost_homogeneity_p(lost: list[int], right: int) -> float | None:
    """p-value that every roll loses answers at one common rate (chi-square test of the rolls' lost / kept counts
    among the ``right`` questions the merged model answered); None when nothing was lost or only one roll."""
    if len(lost) < 2 or not any(lost) or right <= 0:
        return None
    from scipy.stats import chi2_contingency

    return float(chi2_contingency([[k, right - k] for k in lost], correction=False).pvalue)


def summarize(roll: dict, merged: dict) -> dict:
    """A roll's exact match and flips against the merged model per split and task, and its two verdicts."""
    scores: dict = {}
    for split, tasks in roll["answers"].items():
        for task, mine in tasks.items():
            base = merged[split][task]
            em, em_merged = sum(mine) / len(mine), sum(base) / len(base)
            scores.setdefault(split, {})[task] = {"exact_match": em, "merged": em_merged, "drop": em_merged - em,
                                                  **answer_flips(base, mine).to_dict()}
    ppl_ok = all(c["degradation"] <= MAX_DEGRADATION for c in roll["checks"].values())
    general_ok = all(c["degradation"] <= MAX_DEGRADATION for c in roll["checks"].values() if c["kind"] == "general")
    within = {split: all(s["drop"] <= MAX_ACCURACY_DROP + 1e-9 for s in scores.get(split, {}).values())
              for split in SPLITS}
    return {"scores": scores, "meets_goals": within["test"] and within["fresh"] and general_ok,
            "gate_passes": within["val"] and ppl_ok,
            "worst_drop": {split: max((s["drop"] for s in scores.get(split, {}).values()), default=None)
                           for split in SPLITS}}


def question_diffs(answers_by_roll: list[dict], merged: dict) -> dict[tuple[str, str], list[float]]:
    """{(split, task): per question, the rolls' mean of lost (+1) / gained (-1) / same (0) against the merged model}:
    the rolls share their questions, so the pooled drop's uncertainty is over questions, not over answers."""
    out: dict[tuple[str, str], list[float]] = {}
    for split, tasks in merged.items():
        for task, base in tasks.items():
            rows = [roll[split][task] for roll in answers_by_roll if task in roll.get(split, {})]
            if rows and len(rows) == len(answers_by_roll):
                out[(split, task)] = [statistics.fmean(int(b) - int(r[q]) for r in rows) for q, b in enumerate(base)]
    return out


def spread(rolls: dict[str, dict], diffs: dict[tuple[str, str], list[float]] | None = None) -> dict:
    """Across rolls: how many met the goals and passed the gate, each task's drop per split (min / median / max),
    flips pooled per task and split (``pooled_flips``; the drop's interval over ``diffs``' questions when given),
    and what choosing the roll with the smallest worst-task val drop would have given on test and fresh."""
    out: dict = {"rolls": len(rolls), "meet_goals": sum(r["meets_goals"] for r in rolls.values()),
                 "gate_passes": sum(r["gate_passes"] for r in rolls.values()),
                 "meet_goals_and_gate_passes": sum(r["meets_goals"] and r["gate_passes"] for r in rolls.values()),
                 "gate_passes_missing_goals": sum(r["gate_passes"] and not r["meets_goals"] for r in rolls.values()),
                 "drops": {}}
    tasks = sorted({t for r in rolls.values() for t in r["scores"]["test"]})
    for split in SPLITS:
        for task in tasks:
            drops = sorted(r["scores"][split][task]["drop"] for r in rolls.values() if task in r["scores"].get(split, {}))
            if drops:
                out["drops"].setdefault(task, {})[split] = {"min": drops[0], "median": statistics.median(drops),
                                                            "max": drops[-1]}
            pooled = pooled_flips([r["scores"][split][task] for r in rolls.values()
                                   if task in r["scores"].get(split, {})], (diffs or {}).get((split, task)))
            if pooled:
                out.setdefault("pooled", {}).setdefault(task, {})[split] = pooled
    if "pooled" in out:
        out["noise_only_meet_rate"] = noise_only_meet_rate(out["pooled"])
    if len(rolls) > 1:
        def on_val(k: str) -> tuple[float, float]:  # worst task first, then every task's drop together
            return rolls[k]["worst_drop"]["val"], sum(t["drop"] for t in rolls[k]["scores"]["val"].values())

        chosen = min(rolls, key=lambda k: (on_val(k), k))
        out["chosen_on_val"] = {"roll": chosen, "tied": sum(on_val(k) == on_val(chosen) for k in rolls),
                                **{f"worst_{s}_drop": rolls[chosen]["worst_drop"][s] for s in SPLITS},
                                "meets_goals": rolls[chosen]["meets_goals"]}
        for s in ("test", "fresh"):
            worst = [r["worst_drop"][s] for r in rolls.values() if r["worst_drop"][s] is not None]
            out[f"median_worst_{s}_drop"] = statistics.median(worst) if worst else None
    return out


def pooled_flips(scores: list[dict], diffs: list[float] | None = None) -> dict | None:
    """One task's split across rolls: flips pooled into per-question rates, the drop they imply with its 95%
    interval, whether the rolls lose answers at one rate, and how often a split of this size would drop past the bar
    at the pooled rates (also at 200 questions, the test split's size). None when rolls asked different counts.

    The interval is over questions: ``diffs`` holds each question's mean flip across the rolls, which share the
    questions (without it, every roll's answers count as independent, which is narrower than it should be)."""
    if not scores or len({s["questions"] for s in scores}) != 1:
        return None
    n, lost, gained = scores[0]["questions"], sum(s["lost"] for s in scores), sum(s["gained"] for s in scores)
    total = n * len(scores)
    p_lost, p_gained = lost / total, gained / total
    right = round(scores[0]["merged"] * n)
    by_question = diffs is not None and len(diffs) == n
    if by_question:
        half = Z95 * statistics.pstdev(diffs) / math.sqrt(n)
        interval = [statistics.fmean(diffs) - half, statistics.fmean(diffs) + half]
    else:
        interval = list(drop_interval(lost, gained, total))
    return {"questions": n, "rolls": len(scores), "lost": lost, "gained": gained, "p_lost": p_lost,
            "p_gained": p_gained, "drop": p_lost - p_gained, "drop_ci95": interval,
            "interval_over": "questions" if by_question else "answers",
            "lost_homogeneity_p": lost_homogeneity_p([s["lost"] for s in scores], right),
            "p_past_bar": p_drop_past(n, p_lost, p_gained), "p_past_bar_n200": p_drop_past(200, p_lost, p_gained)}


def noise_only_meet_rate(pooled: dict[str, dict[str, dict]]) -> dict[str, float]:
    """The share of rolls that would meet the goals (test and fresh within the bar on every task) if every roll
    shared the pooled per-question rates and only the questions' luck varied: at the splits' own sizes, and with
    fresh questions counted at 200 as the earlier spreads asked."""
    own = n200 = 1.0
    for splits in pooled.values():
        for split in ("test", "fresh"):
            if split in splits:
                own *= 1 - splits[split]["p_past_bar"]
                n200 *= 1 - splits[split]["p_past_bar_n200"]
    return {"own_sizes": own, "fresh_at_200": n200}


def readme(data: dict, name: str) -> str:
    rolls, s = data["rolls"], data["spread"]
    tasks = sorted(next(iter(rolls.values()))["scores"]["test"])
    splits = [sp for sp in SPLITS if any(sp in r["scores"] for r in rolls.values())]
    existing = data.get("existing", {})
    seeds = ",".join(str(r["seed"]) for k, r in rolls.items() if k.startswith("seed") and k not in existing)
    lines = [f"## {name}", "",
             f"`LORAKIT_THREADS={data['threads']} python bench/quantize_spread.py --release {data['release']} --seeds "
             f"{seeds or NO_SEEDS} --fresh-questions {data['fresh_questions']}"
             + "".join(f" --existing {k}=..." for k in existing)
             + (f" --checks-from {data['checks_from']}" if data.get("checks_from") else "")
             + (f" --results {name}" if name != "quantize_spread" else "") + "`: one release's merged model rounded "
             "again with the settings its `lorakit_quant.json` records (checked) but the calibration seed, at the "
             "thread count shown (?: not recorded, quantized before `lorakit_quant.json` kept it); `release` is the "
             "release's own 4-bit model. Exact match on every val and test "
             f"question and on {data['fresh_questions']} fresh questions per task, with the answers lost / gained "
             "against the merged model; general text is the gate's perplexity change. \"goals\": test and fresh "
             "within 2 points of the merged model on every task and general text within 5%; \"gate\": the release "
             f"gate's val and perplexity checks. Compute dtype {data['compute_dtype']}. "
             f"CPU: {cpu_line(data.get('machine', {}).get('cpu'))}.", "",
             "| roll | seed | threads | general text | "
             + " | ".join(f"{t} {sp} (lost/gained)" for t in tasks for sp in splits) + " | goals | gate |",
             "|---|---|---|---|" + "---|" * len(splits) * len(tasks) + "---|---|"]
    first = next(iter(rolls.values()))["scores"]
    lines.append("| merged | | | | " + " | ".join(f"{100 * first[sp][t]['merged']:.1f}%" for t in tasks for sp in splits)
                 + " | | |")
    for label, r in rolls.items():
        general = next(c["degradation"] for c in r["checks"].values() if c["kind"] == "general")
        cells = [f"{100 * r['scores'][sp][t]['exact_match']:.1f}% ({r['scores'][sp][t]['lost']}/"
                 f"{r['scores'][sp][t]['gained']})" for t in tasks for sp in splits]
        lines.append(f"| {label} | {r['seed']} | {r['threads'] or '?'} | {general:+.1%} | " + " | ".join(cells)
                     + f" | {'met' if r['meets_goals'] else 'missed'} | {'passed' if r['gate_passes'] else 'failed'} |")
    lines += ["", f"{s['meet_goals']} of {s['rolls']} rolls met every accuracy goal; the gate passed "
              f"{s['gate_passes']}, {s['gate_passes_missing_goals']} of them missing a goal."]
    if "chosen_on_val" in s:
        c = s["chosen_on_val"]
        tied = f" (first of {c['tied']} tied)" if c["tied"] > 1 else ""
        lines.append(f"Choosing the roll with the smallest worst-task val drop picks `{c['roll']}`{tied}: worst test drop "
                     f"{100 * c['worst_test_drop']:.1f} points (median roll {100 * s['median_worst_test_drop']:.1f})"
                     + (f", fresh {100 * c['worst_fresh_drop']:.1f} (median {100 * s['median_worst_fresh_drop']:.1f})"
                        if c.get("worst_fresh_drop") is not None else "") + ".")
    if "pooled" in s:
        lines += ["", "Pooled over the rolls (per-question rates; drop with its 95% interval over the questions, "
                  "which the rolls share; p of one common lost rate across rolls; how often a split of its size, and "
                  "one of 200, drops past 2 points at these rates):", "",
                  "| task | split | questions x rolls | lost / gained | drop (points) | 95% interval | "
                  "one rate p | past the bar: own size | at 200 |", "|---|---|---|---|---|---|---|---|---|"]
        for task, splits in s["pooled"].items():
            for split, q in splits.items():
                homog = "" if q["lost_homogeneity_p"] is None else f"{q['lost_homogeneity_p']:.2f}"
                lines.append(f"| {task} | {split} | {q['questions']} x {q['rolls']} | {q['lost']} / {q['gained']} | "
                             f"{100 * q['drop']:.2f} | {100 * q['drop_ci95'][0]:.2f} to "
                             f"{100 * q['drop_ci95'][1]:.2f} | "
                             f"{homog} | {q['p_past_bar']:.3f} | {q['p_past_bar_n200']:.3f} |")
        rate = s["noise_only_meet_rate"]
        lines += ["", f"If every roll shared these rates, {rate['own_sizes']:.0%} of rolls would meet the goals on "
                  f"splits of these sizes ({rate['fresh_at_200']:.0%} with 200 fresh questions per task) against "
                  f"{s['meet_goals']} of {s['rolls']} measured."]
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--seeds", default="1", help="calibration seeds to quantize with, comma-separated ('' for none: "
                    "assemble the rolls measured so far)")
    ap.add_argument("--existing", action="append", default=[], metavar="LABEL=FOLDER",
                    help="a 4-bit model of the same merged model quantized elsewhere with the release's settings")
    ap.add_argument("--fresh-questions", type=int, default=FRESH_QUESTIONS, help="fresh questions per task (0: none)")
    ap.add_argument("--checks-from", metavar="NAME", help="take the gate checks of a 4-bit folder already measured "
                    "under --results NAME (same work folder root) instead of running them again")
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "quantize_spread")
    ap.add_argument("--results", default="quantize_spread")
    args = ap.parse_args()
    from lorakit.quantize import quantize_model
    from lorakit.runtime import configure_threads

    configure_threads()
    import torch

    threads = torch.get_num_threads()
    merged, calib, preps, quantized, release_meta, kwargs = release_quantization(args.release)
    work = args.work / args.results
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "release.json"
    if stamp.exists() and json.loads(stamp.read_text()) != {"quantized": str(quantized), "fresh": args.fresh_questions}:
        raise SystemExit(f"{work} holds rolls of another release or question count: use another --results")
    save(stamp, {"quantized": str(quantized), "fresh": args.fresh_questions})
    measured = earlier_checks(args.work, args.checks_from)
    examples = examples_by_split(preps, work, args.fresh_questions)
    merged_path = work / "merged.json"
    if claim(merged_path):
        save(merged_path, {"folder": str(merged), "answers": answers(merged, examples)})
        merged_path.with_suffix(".lock").unlink()
    todo: list[tuple[str, Path, int | None]] = [("release", quantized, None)]
    todo += [(label, Path(folder), None) for label, _, folder in (e.partition("=") for e in args.existing)]
    todo += [(f"seed{s}", work / f"seed{s}-t{threads}", int(s)) for s in args.seeds.split(",") if s.strip()]
    for label, folder, seed in todo:
        path = work / f"roll-{label}.json"
        if not claim(path):
            continue
        quantize_s = None
        if seed is not None:
            t0 = time.perf_counter()
            quantize_model(merged, folder, calib=calib, force=True, progress=True, **{**kwargs, "seed": seed})
            quantize_s = time.perf_counter() - t0
        roll = measure_roll(label, folder, merged, preps, examples, release_meta, quantize_s, threads,
                            measured if seed is None else None)
        save(path, roll)
        path.with_suffix(".lock").unlink()
        print(label, json.dumps({c: round(v["degradation"], 4) for c, v in roll["checks"].items()}), flush=True)
    if not merged_path.exists():
        raise SystemExit("the merged model's answers are still being measured by another run; when it is done, "
                         f"assemble with --seeds ''")
    merged_answers = json.loads(merged_path.read_text())["answers"]
    rolls, answers_by_roll = {}, []
    for path in sorted(work.glob("roll-*.json"), key=lambda p: (p.stem != "roll-release", p.stem)):
        roll = json.loads(path.read_text())
        rolls[roll["label"]] = {**{k: v for k, v in roll.items() if k != "answers"}, **summarize(roll, merged_answers)}
        answers_by_roll.append(roll["answers"])
    if not rolls:
        raise SystemExit("no roll is measured yet (another run holds them): when it is done, assemble with --seeds ''")
    data = {"release": str(args.release), "merged": str(merged), "quantized": str(quantized), "threads": threads,
            "compute_dtype": release_meta.params.compute_dtype, "fresh_questions": args.fresh_questions,
            "recorded_settings": kwargs, "existing": {e.partition("=")[0]: e.partition("=")[2] for e in args.existing},
            "checks_from": args.checks_from,
            "rolls": rolls, "spread": spread(rolls, question_diffs(answers_by_roll, merged_answers))}
    print(json.dumps(data["spread"]), flush=True)
    write_results(args.results, data)
    update_readme_section(args.results, readme(data, args.results))


if __name__ == "__main__":
    main()
