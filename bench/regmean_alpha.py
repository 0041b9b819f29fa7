"""RegMean's two knobs on the default release's own adapters: how much of each task the merged model keeps.

RegMean (``lorakit.merge.regmean``) solves each layer for the weights that keep every adapter's outputs on its own
task's train inputs; ``regmean_alpha`` scales the Gram matrices' off-diagonal part (1 = the full least-squares
solution, 0 = only the diagonal: a per-input-feature weighted average) and ``regmean_examples`` is how many train
examples per task the Grams read. The release uses alpha 0.9 and 128 examples, never tuned; the scorecard shows the
merge losing reverse-words answers on val. Each variant merges the release's two adapters (weights 1 each unless given) into
the base and scores the merged model as the release scorecard does: greedy exact match on the first
``scorecard.max_examples`` examples of every task's val and test split, retention on val against the base's and the
adapter's exact match from the release's own scorecard (what the gate's ``min_retention`` judges), 40 fresh
questions per task (``--fresh-questions``), and perplexity on the gate's general text against the base's
(``max_general_forgetting``).

Usage: python bench/regmean_alpha.py --release OUT [--variants 0.9:128,1.0:128,0.9:128:1.2/1] [--work DIR]
A variant is ``alpha:examples[:w1/w2/...][:aLAMBDA]``: the merge weights, one per task in the release's order (default
1 each; RegMean scales each projected update by its weight, as the linear merge does), and the general-text anchor's
weight (``regmean_anchor``, default 0: off). Writes bench/results/NAME.json (``--results``, default regmean_alpha) and its bench/README.md section.
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

from bench.common import release_parser, update_readme_section, write_results  # noqa: E402
from bench.release_scorecard import adapter_training, release_card  # noqa: E402
from bench.train_sweep import FRESH_QUESTIONS  # noqa: E402

DEFAULT_VARIANTS = "0.9:128,0.5:128,1.0:128,0.9:512"


def variant_key(alpha: float, examples: int, weights: list[float] | None = None, anchor: float = 0.0) -> str:
    """``alpha90-examples128`` (``-w120-100`` with weights, ``-a100`` with an anchor): no dots, so a README figure
    can cite it by key path."""
    tail = "-w" + "-".join(str(round(w * 100)) for w in weights) if weights and set(weights) != {1.0} else ""
    tail += f"-a{round(anchor * 100)}" if anchor else ""
    return f"alpha{round(alpha * 100)}-examples{examples}{tail}"


def parse_variant(item: str) -> tuple[float, int, list[float] | None, float]:
    """``alpha:examples[:w1/w2/...][:aLAMBDA]`` -> (alpha, examples, weights or None, anchor)."""
    alpha, examples, *rest = item.split(":")
    anchor = next((float(r[1:]) for r in rest if r.startswith("a")), 0.0)
    weights = next(([float(w) for w in r.split("/")] for r in rest if not r.startswith("a")), None)
    return float(alpha), int(examples), weights, anchor


def reference_scores(card: dict, max_examples: int | None) -> dict:
    """{task: {split: {"base": em, "adapter": em}}} on the first ``max_examples`` (None = all): retention's
    reference when the variants are scored on other examples than the release scorecard's."""
    from lorakit.evaluate import task_accuracy

    out: dict = {}
    for t in card["task_order"]:
        prep = card["tasks"][t]["data"]
        out[t] = {split: {"base": task_accuracy(card["models"]["base"]["folder"], prep, split=split,
                                                max_examples=max_examples, progress=True).exact_match,
                          "adapter": task_accuracy(card["tasks"][t]["adapter"], prep, split=split,
                                                   base=card["models"]["base"]["folder"], max_examples=max_examples,
                                                   progress=True).exact_match}
                  for split in card["tasks"][t]["splits"]}
    return out


def measure(card: dict, alpha: float, examples: int, work: Path,
            weights: list[float] | None = None, anchor: float = 0.0, max_examples: int | None = -1,
            reference: dict | None = None, fresh_questions: int = FRESH_QUESTIONS) -> dict:
    """``max_examples`` -1 = the release scorecard's examples (retention against its base and adapter); else the
    first N (None = all), retention against ``reference`` (:func:`reference_scores` on the same examples)."""
    from bench.release_scorecard import fresh_exact_match
    from bench.train_sweep import general_perplexity
    from lorakit.evaluate import task_accuracy
    from lorakit.evaluate.loading import describe_model, load_eval_model, load_tokenizer
    from lorakit.evaluate.retention import retention
    from lorakit.merge import merge_adapters

    tasks = card["task_order"]
    adapters = [card["tasks"][t]["adapter"] for t in tasks]
    preps = {t: Path(card["tasks"][t]["data"]) for t in tasks}
    weights = weights or [1.0] * len(tasks)
    out = work / variant_key(alpha, examples, weights, anchor)
    started = time.perf_counter()
    merge_adapters(adapters, weights, out, method="regmean", output_kind="model",
                   base=card["models"]["base"]["folder"], data=[preps[t] for t in tasks], regmean_alpha=alpha,
                   regmean_examples=examples, regmean_anchor=anchor, force=True, progress=True)
    merge_s = time.perf_counter() - started
    spec = describe_model(str(out))
    loaded = load_eval_model(spec, tokenizer=load_tokenizer(spec), stage="eval")
    scores: dict = {}
    for t in tasks:
        scores[t] = {}
        for split, entry in card["tasks"][t]["splits"].items():
            n = card["params"]["max_examples"] if max_examples == -1 else max_examples
            em = task_accuracy(loaded, str(preps[t]), split=split, max_examples=n, progress=False).exact_match
            recorded = entry["models"] if reference is None else {
                "merged": {"exact_match": None}, **{r: {"exact_match": v} for r, v in reference[t][split].items()}}
            ret = retention(recorded["base"]["exact_match"], recorded["adapter"]["exact_match"], em,
                            higher_is_better=True)
            scores[t][split] = {"exact_match": em, "release_merged": recorded["merged"]["exact_match"],
                                "adapter": recorded["adapter"]["exact_match"], "retention": ret.value}
    general = general_perplexity(loaded)
    base_ppl = card["general_text"]["models"]["base"]["ppl"]
    del loaded
    fresh = fresh_exact_match({(t, "merged"): out for t in tasks}, preps, work, progress=False, n=fresh_questions)
    return {"alpha": alpha, "examples": examples, "weights": weights, "anchor": anchor, "merge_s": round(merge_s, 1),
            "tasks": scores,
            "fresh": {t: fresh[t]["merged"]["exact_match"] for t in tasks},
            "worst_val_retention": min(s["val"]["retention"] for s in scores.values()),
            "general_text": {"ppl": general["ppl"], "vs_base": round(general["ppl"] / base_ppl - 1, 4)}}


def recipe_line(data: dict) -> str:
    """How the merged adapters trained (results written before it was recorded say nothing)."""
    training = data.get("adapter_training")
    if not training:
        return ""

    def recipe(t: dict) -> str:
        plus = f", LoRA+ ratio {t['lora_plus_ratio']:g}" if t.get("lora_plus_ratio") else ""
        return f"{t['steps']} steps at lr {t['lr']:g}{plus}"

    return " Adapters: " + "; ".join(f"{task} {recipe(t)}" for task, t in training.items()) + "."


def readme(data: dict, name: str = "regmean_alpha") -> str:
    tail = "" if name == "regmean_alpha" else f" --results {name}"
    n = data.get("max_examples", -1)
    tail += "" if n == -1 else f" --max-examples {'all' if n is None else n}"
    fresh_n = data.get("fresh_questions", FRESH_QUESTIONS)
    tail += "" if fresh_n == FRESH_QUESTIONS else f" --fresh-questions {fresh_n}"
    scope = "first 50" if n == -1 else "every example" if n is None else f"first {n}"
    against = "the release scorecard's base and adapter" if n == -1 else "the base and adapters on the same examples"
    lines = [f"## {name}", "",
             f"`python bench/regmean_alpha.py --release {data['release']}{tail}`: the default release's two adapters merged "
             "by RegMean at other off-diagonal scales (alpha) and Gram sizes (train examples per task); exact match "
             f"on val / test ({scope}) and {fresh_n} fresh questions, retention on val against {against} "
             "(the gate's `min_retention`, 0.9), general-text perplexity against the base's (the gate's "
             "`max_general_forgetting`, 10%). The release merges with alpha 0.9, 128 examples." + recipe_line(data), "",
             "| alpha | examples | weights | anchor | task | merged val / test | fresh | retention val | general vs base | merge s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    digits = 0 if n == -1 else 1  # on 200 questions one answer is half a point
    for v in data["variants"].values():
        weights = " / ".join(f"{w:g}" for w in v.get("weights") or [1.0] * len(v["tasks"]))
        for t, s in v["tasks"].items():
            lines.append(f"| {v['alpha']} | {v['examples']} | {weights} | {v.get('anchor') or 0:g} | {t} | "
                         f"{s['val']['exact_match']:.{digits}%} / "
                         f"{s['test']['exact_match']:.{digits}%} | {v['fresh'][t]:.1%} | {s['val']['retention']:.3f} | "
                         f"{v['general_text']['vs_base']:+.1%} | {v['merge_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="alpha:examples[:w1/w2/...][:aLAMBDA], "
                    "comma-separated")
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "regmean_alpha")
    ap.add_argument("--max-examples", default=None, help="score every variant on the first N val/test examples, or "
                    "'all' (default: the release scorecard's), with the base and adapters rescored on the same")
    ap.add_argument("--fresh-questions", type=int, default=FRESH_QUESTIONS, help="fresh questions per task")
    ap.add_argument("--results", default="regmean_alpha", help="results file (bench/results/NAME.json) and README "
                    "section name: one per release, since every row of one file merges the same adapters")
    args = ap.parse_args()
    results = BENCH / "results" / f"{args.results}.json"
    from lorakit.runtime import configure_threads

    configure_threads()
    _, card = release_card(args.release)
    previous = json.loads(results.read_text()) if results.exists() else {}
    if previous.get("release") not in (None, str(args.release)):
        print(f"{results.name} holds another release's adapters ({previous['release']}); starting it afresh")
        previous = {}
    data = {"release": str(args.release), "adapters": {t: card["tasks"][t]["adapter"] for t in card["task_order"]},
            "adapter_training": {t: adapter_training(Path(card["tasks"][t]["adapter"])) for t in card["task_order"]},
            "variants": previous.get("variants", {})}
    if previous.get("fresh_questions", FRESH_QUESTIONS) != args.fresh_questions:
        data["variants"] = {}  # rows scored on other fresh questions do not compare
    data["fresh_questions"] = args.fresh_questions
    n, reference = -1, None
    if args.max_examples:
        n = None if args.max_examples == "all" else int(args.max_examples)
        if previous.get("max_examples", -1) != n:
            data["variants"] = {}  # rows scored on other examples do not compare
        reference = previous.get("reference") if previous.get("max_examples", -1) == n else None
        reference = reference or reference_scores(card, n)
        data.update(max_examples=n, reference=reference)
    for item in filter(None, args.variants.split(",")):
        alpha, examples, weights, anchor = parse_variant(item)
        key = variant_key(alpha, examples, weights, anchor)
        data["variants"][key] = measure(card, alpha, examples, args.work, weights, anchor, n, reference,
                                         args.fresh_questions)
        print(key, json.dumps({t: s["val"] for t, s in data["variants"][key]["tasks"].items()}),
              json.dumps(data["variants"][key]["fresh"]), flush=True)
        write_results(args.results, data)  # after every variant: a long run keeps what it measured
    write_results(args.results, data)
    update_readme_section(args.results, readme(data, args.results))


if __name__ == "__main__":
    main()
