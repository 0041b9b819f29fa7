"""RegMean against the searched linear merge, on the same adapters: what each merged (and quantized) model keeps.

A release folder that ran twice with different ``merge.method`` (same adapters: the training stage is a cache hit)
holds one merged model, one quantized model and one scorecard per merge. For each scorecard this reads the merge's
record (method, weights, search or RegMean statistics, its time) and the scorecard's exact match of every role on
every task and split, with retention and the quantized drop; then scores every merged and quantized model on 40 fresh
questions per task (``lorakit.data.bundled.generate.fresh_records``).

Usage: python bench/merge_regmean.py --release OUT [--work DIR]
Writes bench/results/merge_regmean.json and the ``## merge_regmean`` section of bench/README.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import release_parser, update_readme_section, write_results  # noqa: E402
from bench.release_scorecard import fresh_exact_match, summary  # noqa: E402


def merge_record(merged: Path) -> dict:
    meta = json.loads((merged / "lorakit_merge.json").read_text())
    out = {"method": meta["method"], "weights": meta["weights"], "merge_s": meta.get("wall_time_s")}
    if "search" in meta:
        s = meta["search"]
        out["search"] = {"n_trials": s.get("n_trials"), "chosen": s["trials"][s["chosen"]]["params"],
                         "search_s": s.get("search_s")}
    if "regmean" in meta:
        r = meta["regmean"]
        out["regmean"] = {k: r[k] for k in ("alpha", "examples", "tokens", "residual")}
    return out


def fresh(card: dict, work: Path) -> dict:
    """{task: {role: exact match}} of the merged and quantized model on the fresh questions."""
    models = {(task, role): card["models"][role]["folder"] for task in card["tasks"] for role in ("merged", "quantized")}
    scores = fresh_exact_match(models, {task: Path(e["data"]) for task, e in card["tasks"].items()}, work,
                               progress=False)
    return {task: {role: scores[task][role]["exact_match"] for role in ("merged", "quantized")} for task in scores}


def readme(variants: dict) -> str:
    lines = ["## merge_regmean", "", "RegMean against the searched linear merge on the same two 80-step adapters of "
             "one release folder (`python bench/merge_regmean.py --release OUT`): exact match on the test split "
             "(first 50) and on 40 fresh questions; retention on val (what the gate judges).",
             "The merge times are each release's own merge stage; the RegMean one in this folder ran while tests ran beside it (a quiet default release's RegMean merge stage: `## release_scorecard_avx2_regmean`).", "",
             "| merge | task | adapter test | merged test | quantized test | merged fresh | quantized fresh | "
             "retention val | merge s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        for task, splits in v["tasks"].items():
            t, val = splits["test"], splits["val"]
            lines.append(f"| {name} | {task} | {t['exact_match']['adapter']:.0%} | {t['exact_match']['merged']:.0%} | "
                         f"{t['exact_match']['quantized']:.0%} | {v['fresh'][task]['merged']:.1%} | "
                         f"{v['fresh'][task]['quantized']:.1%} | {val['retention_exact_match']:.3f} | "
                         f"{v['merge']['merge_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "merge_regmean")
    args = ap.parse_args()
    from lorakit.runtime import configure_threads

    configure_threads()
    variants = {}
    for path in sorted(args.release.glob("scorecard/*/scorecard.json")):
        card = json.loads(path.read_text())
        merged = Path(card["models"]["merged"]["folder"])
        record = merge_record(merged)
        name = record["method"] + ("-searched" if "search" in record else "")
        variants[name] = {"scorecard": str(path), "merged": str(merged),
                          "quantized": card["models"]["quantized"]["folder"], "merge": record,
                          "tasks": summary(card), "general_text": card.get("general_text"),
                          "worst_val_retention": min(s["val"]["retention_exact_match"] for s in summary(card).values()),
                          "fresh": fresh(card, args.work)}
    if len(variants) < 2:
        raise SystemExit(f"{args.release}: found {list(variants)}; run the release once per merge method into it")
    write_results("merge_regmean", {"release": str(args.release), "variants": variants})
    update_readme_section("merge_regmean", readme(variants))


if __name__ == "__main__":
    main()
