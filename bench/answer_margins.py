"""How close each answer sits to a wrong one: the teacher-forced answer margins of a release's models, and the answers 4 bits flip.

Why: the default release's 4-bit model loses a few reverse-words answers on some draws and not on others
(docs/release-status.md). Exact match says *that* an answer flipped, not how near the edge it was. This bench
reads every val/test question of every task with each model teacher-forced on the reference answer (rendered
exactly as training rendered it, the end-of-turn token included) and takes, at every answer position, the
log-probability of the reference token minus the best other token's: the answer's **margin** is the smallest of
them (negative: greedy decoding leaves the reference there). It then compares the 4-bit model's greedy answers
with the merged model's: which answers flipped, how far the merged model's margin was from zero on those, how far
quantization moved every answer's margin, and what a lost answer looks like (the last word said again, or another
change).

``--weights`` adds RegMean re-merges of the release's own adapters at other weights (the release's merge
settings, only the weights changed): whether another point of the merge search gives answers more room.
``--quantized LABEL=FOLDER`` adds other 4-bit models of the release's merged model (another tuning of the same codes,
say), each compared with the merged model as the release's own is; ``--no-adapters`` leaves the adapters out.

Usage: python bench/answer_margins.py --release OUT [--splits val,test] [--weights 1.2188,0.9375;1.5,1.0]
       [--quantized aw4=DIR,...] [--no-adapters] [--work bench/work/answer_margins] [--results answer_margins]
Writes bench/results/RESULTS.json and the ``RESULTS`` section of bench/README.md.
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

from bench.calibration_mix import task_name  # noqa: E402
from bench.common import (cpu_line, find_one, release_parser, release_quant_inputs, update_readme_section,  # noqa: E402
                          write_results)

QUANTILES = (0.1, 0.25, 0.5)
BELOW = (1.0, 2.0)  # nats: answers this close to a wrong token are counted


def answer_margins(loaded, examples) -> list[dict]:
    """Per example: the smallest margin over its answer positions (log p(reference) - max log p(other), nats),
    where it falls (index into the answer tokens, of how many), and the end-of-turn token's index and margin."""
    import torch

    from lorakit.data.formats import IGNORE_INDEX, tokenize_prepped
    from lorakit.evaluate.accuracy import stop_token_ids
    from lorakit.progress import bar

    tok = loaded.tokenizer
    stops = set(stop_token_ids(tok, loaded.model, examples))
    out = []
    for rec in bar(examples.records, desc="answer margins", unit="ex", leave=False):
        t = tokenize_prepped(rec["text"], int(rec["prompt_end"]), tok)
        ids = torch.tensor([t.input_ids], device=loaded.device)
        targets = torch.tensor(t.labels[1:])
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(ids).logits[0, :-1].float().cpu(), dim=-1)
        pos = (targets != IGNORE_INDEX).nonzero().flatten()
        picked, y = logp[pos], targets[pos]
        ref = picked.gather(1, y[:, None])[:, 0]
        picked.scatter_(1, y[:, None], float("-inf"))
        margins = (ref - picked.max(dim=1).values).tolist()
        at = min(range(len(margins)), key=margins.__getitem__)
        end_at = next((i for i, t_id in enumerate(y.tolist()) if t_id in stops), None)
        out.append({"margin": round(margins[at], 4), "at": at, "answer_tokens": len(margins), "end_at": end_at,
                    "end_of_turn_margin": None if end_at is None else round(margins[end_at], 4)})
    return out


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def summary(margins: list[dict], exact: list[bool]) -> dict:
    m = [r["margin"] for r in margins]
    ends = [r["end_of_turn_margin"] for r in margins if r["end_of_turn_margin"] is not None]
    return {"n": len(m), "exact_match": sum(exact) / len(exact),
            "margin_quantiles": {f"q{int(q * 100)}": round(quantile(m, q), 3) for q in QUANTILES},
            **{f"below_{b:g}_nats": sum(x < b for x in m) for b in BELOW},
            "negative": sum(x < 0 for x in m),
            "end_of_turn_margin_min": round(min(ends), 3) if ends else None,
            "smallest_at_end_of_turn": sum(r["at"] == r["end_at"] for r in margins)}


def flip_kind(reference: str, lost_to: str) -> str:
    """'last_word_repeated' when the answer is the reference followed by its last word again (or a longer form
    of it: 'parrot parrott'); else 'other' (a word dropped, swapped, changed or said twice inside the answer)."""
    ref, pred = reference.split(), lost_to.split()
    if ref and len(pred) > len(ref) and pred[: len(ref)] == ref and pred[len(ref)].startswith(ref[-1]):
        return "last_word_repeated"
    return "other"


def flips(merged: dict, quantized: dict) -> dict:
    """The quantized model's answers that differ in correctness from the merged model's, with both margins."""
    ranks = sorted(range(len(merged["margins"])), key=lambda i: merged["margins"][i]["margin"])
    share_below = {i: r / max(len(ranks) - 1, 1) for r, i in enumerate(ranks)}  # 0 = the split's smallest margin
    lost, gained = [], []
    for i, (a, b) in enumerate(zip(merged["predictions"], quantized["predictions"])):
        if a["exact"] == b["exact"]:
            continue
        row = {"index": i, "reference": a["reference"], "merged": a["prediction"], "quantized": b["prediction"],
               "merged_margin": merged["margins"][i]["margin"],
               "merged_margin_rank": round(share_below[i], 3),
               "quantized_margin": quantized["margins"][i]["margin"]}
        if a["exact"]:
            lost.append({**row, "kind": flip_kind(a["reference"], b["prediction"])})
        else:
            gained.append(row)
    shift = [q["margin"] - m["margin"] for m, q in zip(merged["margins"], quantized["margins"])]
    kinds: dict[str, int] = {"last_word_repeated": 0, "other": 0}
    for r in lost:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {"lost": len(lost), "gained": len(gained), "lost_kinds": kinds,
            "lost_merged_margin_max": max((r["merged_margin"] for r in lost), default=None),
            "lost_merged_margin_rank_median": quantile([r["merged_margin_rank"] for r in lost], 0.5) if lost else None,
            "margin_shift": {"median": round(quantile(shift, 0.5), 3),
                             "abs_q90": round(quantile([abs(s) for s in shift], 0.9), 3),
                             "abs_max": round(max(abs(s) for s in shift), 3)},
            "lost_answers": lost, "gained_answers": gained}


def remerge(release: Path, weights: list[float], preps: list[Path], work: Path) -> Path:
    """The release's own adapters merged again with its recorded method and settings, at ``weights``."""
    from lorakit.io.atomic import read_json
    from lorakit.merge.core import merge_adapters

    record = read_json(find_one(release, "merged/model-*", dirs=True) / "lorakit_merge.json", "merge record")
    adapters = [find_one(release, f"adapters/{task_name(p)}-*", dirs=True) for p in preps]
    out = work / ("merge-" + "-".join(f"{w:g}" for w in weights))
    done = read_json(out / "lorakit_merge.json", "merge record") if (out / "lorakit_merge.json").exists() else {}
    # reused only when it merged these very adapters (another release's re-merge at the same weights is not)
    if [i.get("path") for i in done.get("inputs", [])] != [str(a) for a in adapters] or done.get("weights") != weights:
        merge_adapters([str(a) for a in adapters], weights, out, method=record["method"], output_kind="model",
                       data=[str(p) for p in preps], force=True, progress=True, **record["params"])
    return out


def score(path: Path, preps: list[Path], splits: list[str]) -> dict:
    """{task: {split: {predictions, margins}}} of one model, loaded once."""
    from lorakit.evaluate.accuracy import read_task_examples, task_accuracy
    from lorakit.evaluate.loading import describe_model, load_eval_model

    loaded = load_eval_model(describe_model(str(path)), dtype="float32")
    out: dict[str, dict] = {}
    for prep in preps:
        for split in splits:
            examples = read_task_examples(prep, split)
            acc = task_accuracy(loaded, examples, progress=True)
            out.setdefault(task_name(prep), {})[split] = {
                "predictions": [{"reference": p.reference, "prediction": p.prediction, "exact": p.exact}
                                for p in acc.predictions],
                "margins": answer_margins(loaded, examples)}
    return out


def readme(data: dict, name: str) -> str:
    lines = [f"## {name}", "",
             f"`python bench/answer_margins.py --release {data['release']} --splits {','.join(data['splits'])}"
             + (f" --weights '{';'.join(','.join(f'{w:g}' for w in ws) for ws in data['weights'])}'"
                if data["weights"] else "")
             + (" --quantized " + ",".join(f"{k}={v}" for k, v in data.get("quantized_other", {}).items())
                if data.get("quantized_other") else "")
             + (" --no-adapters" if data.get("no_adapters") else "")
             + (f" --results {name}" if name != "answer_margins" else "") + "`: "
             "each model teacher-forced on every reference answer; an answer's margin is its smallest "
             "log p(reference token) - max log p(other token) over the answer's tokens and its end of turn, in nats "
             f"(negative: greedy decoding leaves the reference). CPU: {cpu_line(data['machine'].get('cpu'))}.", "",
             "| task | split | model | exact match | margin q10 / q25 / median | answers under 1 / 2 nats | "
             "smallest at the end of turn | end-of-turn margin, least |",
             "|---|---|---|---|---|---|---|---|"]
    for task, splits in data["tasks"].items():
        for split, row in splits.items():
            for label, s in row["models"].items():
                q = s["margin_quantiles"]
                if label in data["remerges"]:
                    label = "merged at " + ", ".join(f"{w:g}" for w in data["remerges"][label])
                lines.append(f"| {task} | {split} | {label} | {100 * s['exact_match']:.1f}% | "
                             f"{q['q10']:.2f} / {q['q25']:.2f} / {q['q50']:.2f} | "
                             f"{s['below_1_nats']} / {s['below_2_nats']} of {s['n']} | {s['smallest_at_end_of_turn']} | "
                             f"{s['end_of_turn_margin_min']:.2f} |")
    lines += ["", "Answers the 4-bit model flipped against the merged model: lost / gained, what the lost answers "
              "look like, the merged model's margin on them (largest; the median lost answer's rank among the split's "
              "answers by margin, 0% the smallest) "
              "and how far 4 bits moved every answer's margin (median shift; 90th percentile and largest of its "
              "size).", "",
              "| task | split | 4-bit model | lost / gained | lost: kinds | merged margin of lost: largest / median "
              "rank | margin shift: median / \\|q90\\| / \\|max\\| |", "|---|---|---|---|---|---|---|"]
    for task, splits in data["tasks"].items():
        for split, row in splits.items():
            for label, f in {"quantized": row["flips"], **row.get("flips_other", {})}.items():
                lines.append(_flips_row(task, split, label, f))
    return "\n".join(lines)


def _flips_row(task: str, split: str, label: str, f: dict) -> str:
    """One 4-bit model's flips against the merged model, as a row of the README's table."""
    kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in f["lost_kinds"].items() if n) or "none"
    big = f"{f['lost_merged_margin_max']:.2f} / {f['lost_merged_margin_rank_median']:.0%}" if f["lost"] else ""
    sh = f["margin_shift"]
    return (f"| {task} | {split} | {label} | {f['lost']} / {f['gained']} | {kinds} | {big} | "
            f"{sh['median']:+.2f} / {sh['abs_q90']:.2f} / {sh['abs_max']:.2f} |")


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--splits", default="val,test")
    ap.add_argument("--weights", default="", help="RegMean re-merges to add: 'w1,w2;w1,w2'")
    ap.add_argument("--quantized", default="", help="other 4-bit models of the merged model: 'label=dir,...'")
    ap.add_argument("--no-adapters", action="store_true", help="score the merged and quantized models only")
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "answer_margins")
    ap.add_argument("--results", default="answer_margins")
    args = ap.parse_args()
    from lorakit.runtime import configure_threads

    configure_threads()
    splits = [s for s in args.splits.split(",") if s]
    weights = [[float(w) for w in ws.split(",")] for ws in args.weights.split(";") if ws.strip()]
    merged, _, preps = release_quant_inputs(args.release)
    quantized = find_one(args.release, "quantized/*", dirs=True)
    models = {} if args.no_adapters else {
        f"adapter ({task_name(p)})": find_one(args.release, f"adapters/{task_name(p)}-*", dirs=True) for p in preps}
    models.update({"merged": merged, "quantized": quantized})
    others = dict(item.split("=", 1) for item in args.quantized.split(",") if item.strip())
    if {"merged", "quantized"} & set(others) or any("." in k or k.startswith("adapter") for k in others):
        raise SystemExit("--quantized labels name a key of the results: not merged/quantized/adapter*, no dots")
    models.update({label: Path(folder) for label, folder in others.items()})
    args.work.mkdir(parents=True, exist_ok=True)
    remerges = {f"remerge{i + 1}": ws for i, ws in enumerate(weights)}  # keys a citation can name (no dots)
    for label, ws in remerges.items():
        models[label] = remerge(args.release, ws, preps, args.work)
    started = time.perf_counter()
    scored = {label: score(path, preps, splits) for label, path in models.items()}
    tasks: dict[str, dict] = {}
    for prep in preps:
        task = task_name(prep)
        for split in splits:
            per = {label: s[task][split] for label, s in scored.items()
                   if not label.startswith("adapter (") or label == f"adapter ({task})"}
            tasks.setdefault(task, {})[split] = {
                "models": {("adapter" if label.startswith("adapter (") else label):
                           summary(r["margins"], [p["exact"] for p in r["predictions"]]) for label, r in per.items()},
                "flips": flips(per["merged"], per["quantized"]),
                **({"flips_other": {label: flips(per["merged"], per[label]) for label in others}} if others else {})}
    data = {"release": str(args.release), "splits": splits, "weights": weights, "remerges": remerges,
            "quantized_other": {label: str(folder) for label, folder in others.items()},
            "no_adapters": bool(args.no_adapters),
            "models": {label: str(path) for label, path in models.items()},
            "merge_weights": json.loads((merged / "lorakit_merge.json").read_text())["weights"],
            "tasks": tasks, "seconds": round(time.perf_counter() - started, 1)}
    path = write_results(args.results, data)
    update_readme_section(args.results, readme(json.loads(path.read_text()), args.results))
    print(path)


if __name__ == "__main__":
    main()
