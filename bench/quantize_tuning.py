"""Scale tuning after rounding (lorakit.quantize.tune) on a finished release's own 4-bit model.

Given the output folder of a ``lorakit run``, each variant copies the release's quantized folder, tunes its group
scales and norms against the release's merged model (``lorakit.quantize.tune.tune_scales``, the function
``quantize_model(..., tune_steps=N)`` calls) on calibration blocks drawn as the release drew its own (the seed,
size and general-text share its ``lorakit_quant.json`` records; a variant may change the share), then judges it as
the release does: the gate's perplexity and KL checks against the merged model (every task's val split and the
general text) and exact match on every val and test question. The rounded model itself is judged the same way
once, so each row's change is the tuning's alone: the codes are the release's.

A variant is ``tuneN[:lrX][:generalP][:answers|:awK][:bB][:roundR]``: N steps, learning rate X (default the
quantize stage's), P percent of the blocks general text (default the release's calibration share, not the quantize
stage's tuning share of 0: name ``general0`` to tune as a release does); ``answers`` takes the KL only where an
answer token comes next (``--tune-tokens answers``; default every position); ``awK`` takes it at every position
with each answer position counted K times (``answer_weight`` of ``lorakit.quantize.tune.tune_scales``); ``bB``
tunes on B blocks drawn like the calibration's instead of the release's n_samples (``--tune-samples``); ``roundR``
also learns the rounding at learning rate R (each code may move one step: ``rounding_lr`` of ``tune_scales``).

Usage: python bench/quantize_tuning.py --release OUT [--variants tune100,tune100:general25,tune100:general0:answers]
       [--work bench/work/quantize_tuning] [--results quantize_tuning]
Writes bench/results/RESULTS.json and the ``RESULTS`` section of bench/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.calibration_mix import accuracy, accuracy_drops, gate_checks  # noqa: E402
from bench.common import (cpu_line, find_one, machine, release_parser, release_quant_inputs,  # noqa: E402
                          update_readme_section, write_results)


@dataclass(frozen=True)
class Variant:
    steps: int
    lr: float | None = None  # None = QUANTIZE.tune_lr
    general_percent: int | None = None  # None = the release's calibration share
    answers: bool = False  # the KL only where an answer token comes next (tune_tokens "answers")
    answer_weight: float = 1.0  # every position, each answer position counted this many times
    blocks: int | None = None  # blocks tuning draws (None = the release's n_samples)
    rounding_lr: float = 0.0  # > 0: the codes' rounding learnt too, at this learning rate

    @classmethod
    def parse(cls, spec: str) -> Variant:
        head, *more = spec.split(":")
        if not head.startswith("tune") or not head[4:].isdigit():
            raise SystemExit(f"variant {spec!r}: expected tuneN[:lrX][:generalP][:answers|:awK][:bB][:roundR]")
        return cls(int(head[4:]), next((float(m[2:]) for m in more if m.startswith("lr")), None),
                   next((int(m[7:]) for m in more if m.startswith("general")), None), "answers" in more,
                   next((float(m[2:]) for m in more if m.startswith("aw")), 1.0),
                   next((int(m[1:]) for m in more if m.startswith("b") and m[1:].isdigit()), None),
                   next((float(m[5:]) for m in more if m.startswith("round")), 0.0))

    def key(self) -> str:
        return (f"tune{self.steps}" + (f"-lr{self.lr:.0e}" if self.lr is not None else "")
                + (f"-general{self.general_percent}" if self.general_percent is not None else "")
                + ("-answers" if self.answers else "") + (f"-aw{self.answer_weight:g}" if self.answer_weight != 1 else "")
                + (f"-b{self.blocks}" if self.blocks else "")
                + (f"-round{self.rounding_lr:.0e}" if self.rounding_lr else ""))

    def spec(self) -> str:
        return ":".join([f"tune{self.steps}"] + ([f"lr{self.lr:g}"] if self.lr is not None else [])
                        + ([f"general{self.general_percent}"] if self.general_percent is not None else [])
                        + (["answers"] if self.answers else [])
                        + ([f"aw{self.answer_weight:g}"] if self.answer_weight != 1 else [])
                        + ([f"b{self.blocks}"] if self.blocks else [])
                        + ([f"round{self.rounding_lr:g}"] if self.rounding_lr else []))


def tune(merged: Path, quantized: Path, calib: Path, v: Variant, work: Path) -> tuple[Path, dict]:
    """A copy of ``quantized`` tuned per ``v``; returns it and the tuning record."""
    from lorakit.compute import resolve_compute_dtype
    from lorakit.quantize import read_quant_meta
    from lorakit.quantize.calibration import build_calibration
    from lorakit.quantize.core import _load_tokenizer, _tuning_blocks
    from lorakit.quantize.options import QUANTIZE
    from lorakit.quantize.tune import tune_scales

    meta = read_quant_meta(quantized)
    p, cal = meta.params, meta.calibration
    release_share = (cal.get("general") or {}).get("fraction", 0.0)
    share = v.general_percent / 100 if v.general_percent is not None else release_share
    tokenizer = _load_tokenizer(merged)
    calibration = build_calibration(calib, tokenizer, n_samples=p.n_samples, seq_len=p.seq_len, seed=p.seed,
                                    general="default" if release_share else None, general_fraction=release_share)
    # the blocks quantize_model(..., tune_general_fraction=share) would tune on, and the general ones it watches
    blocks, answer_mask, watched = _tuning_blocks(calibration, calib, tokenizer, share, "default",
                                                  n_samples=p.n_samples, seq_len=p.seq_len, seed=p.seed,
                                                  tune_samples=v.blocks)
    folder = work / v.key()
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(quantized, folder)
    kind = "gptq" if p.layout == "gptq-v1" else "awq"
    record = tune_scales(merged, folder, blocks, kind=kind, steps=v.steps,
                         lr=QUANTIZE.tune_lr if v.lr is None else v.lr, general_blocks=watched,
                         tokens="answers" if v.answers else "all", answer_mask=answer_mask,
                         answer_weight=v.answer_weight, rounding_lr=v.rounding_lr,
                         dtype=resolve_compute_dtype(p.compute_dtype or "auto", "quantize", "cpu"), seed=p.seed)
    return folder, {**record, "general_fraction": share}


def readme(data: dict, name: str) -> str:
    tasks = list(data["merged_accuracy"])
    rows = {"rounded (the release's own)": data["rounded"], **data["variants"]}
    lines = [f"## {name}", "",
             f"`python bench/quantize_tuning.py --release {data['release']} --variants "
             + ",".join(Variant(**v["variant"]).spec() for v in data["variants"].values())
             + (f" --results {name}" if name != "quantize_tuning" else "") + "`: the release's own 4-bit model, its "
             "group scales and norms tuned by distillation from its merged model (codes unchanged, except in a "
             "`roundR` variant, which also learns each code's rounding, one step at most), judged by the "
             "release gate (perplexity vs the merged model, mean KL in nats) and by exact match on every val and test "
             "question (points lost vs the merged model: val / test). Held-out KL: on the calibration blocks tuning "
             f"did not train on. CPU: {cpu_line(data.get('machine', {}).get('cpu'))}.", "",
             "| model | general share | held-out KL before → after | kept | tuning s | "
             + " | ".join(f"{c} ppl / KL" for c in data["rounded"]["checks"])
             + "".join(f" | {t} drop" for t in tasks) + " |",
             "|---|---|---|---|---|" + "---|" * (len(data["rounded"]["checks"]) + len(tasks))]
    for label, r in rows.items():
        t = r.get("tuning")
        held = f"{t['held_out_kl_before']:.4f} → {t['held_out_kl_after']:.4f}" if t else ""
        if t and "held_out_answer_kl_before" in t:  # tuned on answers: judged there, so both are shown
            held = (f"every position {held}; answer positions {t['held_out_answer_kl_before']:.4f} → "
                    f"{t['held_out_answer_kl_after']:.4f}")
        if t and "held_out_weighted_kl_before" in t:  # answers weighed up: judged on the weighted KL
            held += (f"; weighted x{t['answer_weight']:g} (judged) {t['held_out_weighted_kl_before']:.4f} → "
                     f"{t['held_out_weighted_kl_after']:.4f}")
        if t and "codes_moved" in t:  # the rounding learnt too
            held += f"; codes moved {t['codes_moved']} (rounding lr {t['rounding_lr']:g})"
        head = ([f"{t['general_fraction']:.0%}", held,
                 "yes" if t["kept"] else "no", f"{t['seconds']:.0f}"] if t else ["", "", "", ""])
        cells = [f"{c['degradation']:+.1%} / {c['kl_mean']:.3f}" for c in r["checks"].values()]
        cells += [" / ".join(f"{100 * s['drop']:+.1f}" for s in r["accuracy"][task].values()) for task in tasks]
        lines.append(f"| {label} | " + " | ".join(head + cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "quantize_tuning")
    ap.add_argument("--variants", default="tune100", help="tuneN[:lrX][:generalP], comma-separated")
    ap.add_argument("--results", default="quantize_tuning")
    args = ap.parse_args()
    from lorakit.runtime import configure_threads

    configure_threads()
    merged, calib, preps = release_quant_inputs(args.release)
    quantized = find_one(args.release, "quantized/*", dirs=True)
    results = BENCH / "results" / f"{args.results}.json"
    previous = json.loads(results.read_text()) if results.exists() else {}
    if previous.get("quantized") != str(quantized):
        previous = {}
    data = {"release": str(args.release), "merged": str(merged), "quantized": str(quantized), "machine": machine(),
            "variants": previous.get("variants", {})}
    data["merged_accuracy"] = previous.get("merged_accuracy") or accuracy(merged, preps, None)
    if "rounded" in previous:
        data["rounded"] = previous["rounded"]
    else:
        gate_s, checks = gate_checks(merged, quantized, preps)
        data["rounded"] = {"checks": checks, "gate_s": gate_s,
                           **accuracy_drops(quantized, preps, data["merged_accuracy"], None)}
    write_results(args.results, data)
    args.work.mkdir(parents=True, exist_ok=True)
    for item in filter(None, args.variants.split(",")):
        v = Variant.parse(item)
        folder, record = tune(merged, quantized, calib, v, args.work)
        gate_s, checks = gate_checks(merged, folder, preps)
        data["variants"][v.key()] = {"variant": {"steps": v.steps, "lr": v.lr, "general_percent": v.general_percent,
                                                 "answers": v.answers, "answer_weight": v.answer_weight,
                                                 "blocks": v.blocks, "rounding_lr": v.rounding_lr},
                                     "tuning": record, "checks": checks, "gate_s": gate_s,
                                     **accuracy_drops(folder, preps, data["merged_accuracy"], None)}
        print(v.key(), json.dumps(record), json.dumps(data["variants"][v.key()]["accuracy"]), flush=True)
        write_results(args.results, data)
    update_readme_section(args.results, readme(data, args.results))
    print(results)


if __name__ == "__main__":
    main()
