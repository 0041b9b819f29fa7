"""Which kind of linear's 4-bit rounding flips a task's answers: each kind rounded alone, and all but each kind.

Given the output folder of a ``lorakit run`` of the default release, the release's merged model is loaded once in
float32 and, for each kind of linear (q/k/v/o_proj, gate/up/down_proj), its weights in every layer are replaced
by round-to-nearest 4-bit on the release's grid (group 16, a zero point; ``lorakit.quantize.grid.fake_quantize``):

* ``only-KIND`` rounds that kind alone and keeps every other linear exact: how much of the damage it carries;
* ``all_but-KIND`` rounds every kind except that one: what keeping it in 16 bits would save;
* ``all`` rounds every kind.

Each configuration answers every question of the task's val and test splits with the scorecard's own greedy
decoding (``lorakit.evaluate.task_accuracy``), and is compared with the merged model's answers: exact match,
answers lost and gained, and, teacher-forced on the reference answer, the mean NLL per answer token and the
number of questions whose reference loses its greedy lead at some token (a continuous view of what flips).
Round-to-nearest is harsher than the release's GPTQ, so the absolute drops are larger than the release's; the
ranking is what this measures. The size a kind would add if kept in 16 bits is the GPTQ file's predicted size
(``lorakit.quantize.mixed.predicted_size_bytes``) as a share of the model's bf16 size.

Usage: python bench/linear_type_sensitivity.py --release OUT [--task reverse-words] [--modes only,all_but]
       [--results linear_type_sensitivity] [--rewrite]
``--rewrite`` measures nothing: it rewrites the results file (labels and keys in the current form, dot-free so a
document can cite them) and its README section from what the file holds.
Writes bench/results/RESULTS.json and the ``RESULTS`` section of bench/README.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import (bf16_bytes, cpu_line, release_parser, release_quant_inputs,  # noqa: E402
                          update_readme_section, write_results)

SPLITS = ("val", "test")
MODES = ("only", "all_but")


def kinds() -> tuple[str, ...]:
    from lorakit.quantize.checks import QUANTIZED_LINEARS

    return QUANTIZED_LINEARS


def short(kind: str) -> str:
    """``self_attn.k_proj`` -> ``k_proj``: labels and keys without dots, which a citation's key path splits on."""
    return kind.rsplit(".", 1)[-1]


def rewrite(path: Path) -> dict:
    """The results file's data with labels in the current form (``only:self_attn.k_proj`` -> ``only-k_proj``)."""
    import json

    data = json.loads(path.read_text())
    data["configs"] = {label.replace(":", "-").replace("self_attn.", "").replace("mlp.", ""): row
                       for label, row in data["configs"].items()}
    sizes = data["size"]["keep_kind_in_16_bits"]
    data["size"]["keep_kind_in_16_bits"] = {short(k): v for k, v in sizes.items()}
    return data  # its date and machine stay the measurement's (write_results keeps the data's own)


def answer_margins(model, tokenizer, records: list[dict]) -> tuple[float, int]:
    """Teacher-forced on each reference answer: mean NLL per answer token, and how many answers lose the greedy
    lead (the reference token is not the argmax) at one or more of their tokens."""
    import torch

    from lorakit.data.formats import prompt_token_ids

    nll_sum, n_tokens, lost_lead = 0.0, 0, 0
    with torch.no_grad():
        for rec in records:
            prompt = prompt_token_ids(rec["text"], int(rec["prompt_end"]), tokenizer)
            answer = tokenizer(rec["reference"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            logits = model(ids, use_cache=False).logits[0, len(prompt) - 1: -1].float()
            target = torch.tensor(answer)
            logp = torch.log_softmax(logits, dim=-1)
            nll_sum += float(-logp[torch.arange(len(answer)), target].sum())
            n_tokens += len(answer)
            lost_lead += int(bool((logits.argmax(-1) != target).any()))
    return nll_sum / max(n_tokens, 1), lost_lead


def score(loaded, examples: dict) -> dict:
    """Greedy answers and teacher-forced margins of the model as it stands, on every split."""
    from lorakit.evaluate.accuracy import task_accuracy

    out = {}
    for split, ex in examples.items():
        acc = task_accuracy(loaded, ex, progress=True)
        nll, lost_lead = answer_margins(loaded.model, loaded.tokenizer, ex.records)
        out[split] = {"exact": [p.exact for p in acc.predictions], "exact_match": acc.exact_match,
                      "answer_nll": round(nll, 5), "lost_greedy_lead": lost_lead}
    return out


def compare(row: dict, merged: dict) -> dict:
    from lorakit.evaluate.flips import answer_flips

    res = {}
    for split in row:
        flips = answer_flips(merged[split]["exact"], row[split]["exact"])
        res[split] = {"exact_match": round(row[split]["exact_match"], 4),
                      "drop_points": round(100 * (merged[split]["exact_match"] - row[split]["exact_match"]), 2),
                      "lost": flips.lost, "gained": flips.gained,
                      "answer_nll": row[split]["answer_nll"],
                      "answer_nll_increase": round(row[split]["answer_nll"] - merged[split]["answer_nll"], 5),
                      "lost_greedy_lead": row[split]["lost_greedy_lead"]}
    lost = sum(res[s]["lost"] for s in res)
    gained = sum(res[s]["gained"] for s in res)
    res["both_splits"] = {"lost": lost, "gained": gained, "net_lost": lost - gained}
    return res


def main() -> None:
    import torch

    from lorakit.evaluate.accuracy import read_task_examples
    from lorakit.evaluate.loading import describe_model, load_eval_model
    from lorakit.quantize.grid import fake_quantize
    from lorakit.quantize.mixed import predicted_size_bytes
    from lorakit.quantize.options import QUANTIZE

    ap = release_parser(__doc__)
    ap.add_argument("--task", default="reverse-words", help="the release dataset whose answers are scored")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--results", default="linear_type_sensitivity")
    ap.add_argument("--rewrite", action="store_true", help="rewrite the results file and README section only")
    args = ap.parse_args()
    if args.rewrite:
        data = rewrite(BENCH / "results" / f"{args.results}.json")
        path = write_results(args.results, data)
        update_readme_section(args.results, markdown(data))
        print(path)
        return
    from lorakit.runtime import configure_threads

    configure_threads()
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        ap.error(f"--modes takes {', '.join(MODES)}")
    merged_dir, _calib, preps = release_quant_inputs(args.release)
    prep = next((p for p in preps if p.name.startswith(f"{args.task}-")), None)
    if prep is None:
        ap.error(f"the release has no prep folder for task {args.task!r}")
    examples = {s: read_task_examples(prep, s) for s in SPLITS}
    loaded = load_eval_model(describe_model(str(merged_dir)), dtype="float32", device="cpu")
    model = loaded.model
    bits, group, sym = QUANTIZE.bits, QUANTIZE.group_size, bool(QUANTIZE.sym)
    linears = {kind: [(name, m) for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and name.endswith(kind)] for kind in kinds()}
    exact = {name: m.weight.detach().clone() for ms in linears.values() for name, m in ms}
    rounded = {name: fake_quantize(w, bits, group, sym).to(w.dtype) for name, w in exact.items()}

    def set_rounded(rounded_kinds: set[str]) -> None:
        with torch.no_grad():
            for kind, ms in linears.items():
                for name, m in ms:
                    m.weight.copy_(rounded[name] if kind in rounded_kinds else exact[name])

    cfg = model.config.to_dict()
    bf16 = bf16_bytes(merged_dir)  # the size the release's <= 50% goal is measured against
    base_size = predicted_size_bytes(cfg, method="gptq", bits=bits, group_size=group)

    def kept_size(kind: str) -> dict:
        keep = {f"model.layers.{i}.{kind}": 16 for i in range(cfg["num_hidden_layers"])}
        size = predicted_size_bytes(cfg, method="gptq", bits=bits, group_size=group, module_bits=keep)
        return {"predicted_bytes": size, "share_of_bf16": round(size / bf16, 4),
                "added_bytes": size - base_size}

    started = time.perf_counter()
    print(f"merged model {merged_dir}; task {args.task}: " + ", ".join(f"{s} {len(e.records)}" for s, e in
                                                                       examples.items()), file=sys.stderr, flush=True)
    set_rounded(set())
    merged = score(loaded, examples)
    configs = [("all", set(kinds()))]
    for kind in kinds():
        if "only" in modes:
            configs.append((f"only-{short(kind)}", {kind}))
        if "all_but" in modes:
            configs.append((f"all_but-{short(kind)}", set(kinds()) - {kind}))
    rows = {}
    for i, (label, rounded_kinds) in enumerate(configs, 1):
        t0 = time.perf_counter()
        set_rounded(rounded_kinds)
        rows[label] = compare(score(loaded, examples), merged)
        print(f"[{i}/{len(configs)}] {label}: net answers lost {rows[label]['both_splits']['net_lost']} "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    set_rounded(set())
    data = {
        "release": str(args.release), "merged_model": str(merged_dir), "task": args.task,
        "rounding": {"method": "round-to-nearest (lorakit.quantize.grid.fake_quantize)", "bits": bits,
                     "group_size": group, "sym": sym},
        "questions": {s: len(e.records) for s, e in examples.items()},
        "merged": {s: {"exact_match": round(merged[s]["exact_match"], 4), "answer_nll": merged[s]["answer_nll"],
                       "lost_greedy_lead": merged[s]["lost_greedy_lead"]} for s in SPLITS},
        "size": {"bf16_bytes": bf16, "gptq_all_4bit_predicted_bytes": base_size,
                 "gptq_all_4bit_share_of_bf16": round(base_size / bf16, 4),
                 "keep_kind_in_16_bits": {short(k): kept_size(k) for k in kinds()}},
        "configs": rows, "wall_s": round(time.perf_counter() - started, 1),
        "cpu": cpu_line(),
    }
    path = write_results(args.results, data)
    update_readme_section(args.results, markdown(data))
    print(path)


def markdown(data: dict) -> str:
    r = data["rounding"]
    lines = [f"## {data.get('benchmark', 'linear_type_sensitivity')}", "",
             f"Task {data['task']} of the release's merged model ({data['merged_model']}), every val and test question "
             f"({', '.join(f'{k} {v}' for k, v in data['questions'].items())}); linears of one kind rounded to "
             f"{r['bits']}-bit g{r['group_size']} {'sym' if r['sym'] else 'asym'} by round-to-nearest. Merged: "
             + ", ".join(f"{s} {100 * v['exact_match']:.1f}%" for s, v in data['merged'].items()) + ".", "",
             "| rounded | val EM | test EM | lost | gained | net lost | answer NLL +val | lost lead val | "
             "16-bit kind adds (share of bf16) |", "|---|---|---|---|---|---|---|---|---|"]
    sizes = data["size"]["keep_kind_in_16_bits"]
    for label, row in data["configs"].items():
        kind = label.split("-", 1)[1] if label.startswith("all_but-") else None
        size = f"{sizes[kind]['added_bytes'] / 2**20:.1f} MiB ({100 * sizes[kind]['share_of_bf16']:.1f}%)" if kind else ""
        lines.append(f"| {label} | {100 * row['val']['exact_match']:.1f}% | {100 * row['test']['exact_match']:.1f}% | "
                     f"{row['both_splits']['lost']} | {row['both_splits']['gained']} | {row['both_splits']['net_lost']} | "
                     f"{row['val']['answer_nll_increase']:+.4f} | {row['val']['lost_greedy_lead']} | {size} |")
    lines += ["", f"Every 4-bit GPTQ g{r['group_size']} file: {100 * data['size']['gptq_all_4bit_share_of_bf16']:.1f}% "
              f"of bf16 (predicted). Wall {data['wall_s']:.0f} s; {data['cpu']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
