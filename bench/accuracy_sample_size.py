"""How much of the scorecard's quantized accuracy drop is sampling noise: the same two models on 50 examples vs all.

The release scorecard scores the first ``scorecard.max_examples`` (50) examples of each task's val and test split,
and the gate's ``max_accuracy_drop`` (2 points) judges merged minus quantized exact match on val: one answer is 2
points. This scores a release's merged and quantized models on every example of both splits (200 each for the
bundled tasks) with the scorecard's decoding, and reports per task and split the drop on the first 50 and on all,
and the discordant answers behind it (merged right / quantized wrong and the reverse): what a larger sample would
have told the gate.

Usage: python bench/accuracy_sample_size.py --release OUT [--results accuracy_sample_size]
Writes bench/results/NAME.json and its bench/README.md section.
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
from bench.release_scorecard import release_card  # noqa: E402

FIRST = 50  # the scorecard's max_examples


def score(folder: str, preps: dict[str, Path], splits: tuple[str, ...]) -> dict:
    """{task: {split: [exact per example]}} for every example, in split order."""
    from lorakit.evaluate import task_accuracy
    from lorakit.evaluate.loading import describe_model, load_eval_model, load_tokenizer

    spec = describe_model(folder)
    loaded = load_eval_model(spec, tokenizer=load_tokenizer(spec), stage="eval")
    return {t: {s: [bool(p.exact) for p in task_accuracy(loaded, str(prep), split=s, progress=True).predictions]
                for s in splits} for t, prep in preps.items()}


def compare(merged: list[bool], quantized: list[bool]) -> dict:
    from lorakit.evaluate.flips import answer_flips

    n, flips = len(merged), answer_flips(merged, quantized)
    return {"n": n, "merged": sum(merged) / n, "quantized": sum(quantized) / n,
            "drop": (flips.lost - flips.gained) / n, "merged_right_quantized_wrong": flips.lost,
            "quantized_right_merged_wrong": flips.gained, "p_value": flips.p_value}


def quant_label(folder: str) -> str:
    """What the quantized model is, from its own record (the folder may be gone when the README is regenerated)."""
    try:
        p = json.loads((Path(folder) / "lorakit_quant.json").read_text())["params"]
    except (OSError, KeyError, ValueError):
        return "quantization record not available"
    extra = p.get("method_params", {})
    return (f"{p['method']} {p['bits']}-bit g{p['group_size']}"
            + (f", GPTAQ {extra['gptaq_alpha']:g}" if extra.get("gptaq_alpha") else "")
            + (", clipping search" if extra.get("clip_norm") or extra.get("clip") else ""))


def readme(data: dict, name: str) -> str:
    results = "" if name == "accuracy_sample_size" else f" --results {name}"
    lines = [f"## {name}", "", f"`python bench/accuracy_sample_size.py --release {data['release']}{results}`: the "
             f"release's ({data['quantized'].rsplit('/', 1)[-1]}: {quant_label(data['quantized'])}) "
             "merged and quantized models on every val and test example instead of the scorecard's first 50; drop = "
             "merged minus quantized exact match (the gate's `max_accuracy_drop` is 2 points on val), with the "
             "discordant answers behind it.", "",
             "| task | split | drop, first 50 | drop, all | n | merged right, quantized wrong | the reverse |",
             "|---|---|---|---|---|---|---|"]
    for t, splits in data["tasks"].items():
        for s, v in splits.items():
            lines.append(f"| {t} | {s} | {100 * v['first']['drop']:+.1f} | {100 * v['all']['drop']:+.1f} | "
                         f"{v['all']['n']} | {v['all']['merged_right_quantized_wrong']} | "
                         f"{v['all']['quantized_right_merged_wrong']} |")
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--results", default="accuracy_sample_size")
    args = ap.parse_args()
    from lorakit.runtime import configure_threads

    configure_threads()
    _, card = release_card(args.release)
    preps = {t: Path(card["tasks"][t]["data"]) for t in card["task_order"]}
    splits = ("val", "test")
    merged = score(card["models"]["merged"]["folder"], preps, splits)
    quantized = score(card["models"]["quantized"]["folder"], preps, splits)
    tasks = {t: {s: {"first": compare(merged[t][s][:FIRST], quantized[t][s][:FIRST]),
                     "all": compare(merged[t][s], quantized[t][s])} for s in splits} for t in preps}
    data = {"release": str(args.release), "merged": card["models"]["merged"]["folder"],
            "quantized": card["models"]["quantized"]["folder"], "first": FIRST, "tasks": tasks}
    write_results(args.results, data)
    update_readme_section(args.results, readme(data, args.results))
    print(json.dumps({t: {s: (v["first"]["drop"], v["all"]["drop"]) for s, v in sp.items()} for t, sp in tasks.items()}))


if __name__ == "__main__":
    main()
