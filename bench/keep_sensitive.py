"""``--keep-sensitive K`` measured: a finished release's quantization redone with its K most sensitive linears kept.

Why: on SmolLM2-135M a few linears' rounding error dominates every other's by an order of magnitude
(``lorakit.quantize.sensitivity``'s RTN output error puts ``model.layers.11.mlp.down_proj`` first, then the last
layers' ``down_proj``; the ``ranking`` each results file records), and the 4-bit answers a release loses against its merged model are
lost in GPTQ's rounding, not in the tuning after it (``bench/results/quantize_rounding_rw360_seed2.json``).
Keeping K whole linears at 16 bits (plain weights, named out of ``modules_in_block_to_quantize``) is a layout
plain transformers and vLLM load, at 1536 x 576 x 2 bytes per SmolLM2 ``down_proj``.

Given the output folder of a finished ``lorakit run``: the modules are ranked by ``lorakit.quantize.sensitivity``
on the release's own calibration blocks (its seed, size and general-text share), and for each K its merged model
is quantized again with exactly the settings its ``lorakit_quant.json`` records (method, grid, act-order, GPTAQ,
clipping, calibration, scale tuning, compute dtype; the new record is checked to match, module_bits and
keep_sensitive aside) plus ``keep_sensitive=K``. K = 0 is the release's own 4-bit model (not redone). Every model
is judged as the release scorecard judges: exact match on every val and test question and on fresh questions
(``bench.release_scorecard``'s), with the answers it lost and gained against the merged model, and the release
gate's perplexity and KL checks (every task's val split and the general text); plus its size.
The torch thread count is recorded: it orders GPTQ's float sums, so the same merged model and settings at another
count round differently from the first layer on (a K row measured at one count is one draw of that rounding).

Usage: python bench/keep_sensitive.py --release OUT [--keep 3] [--fresh-questions 200] [--results keep_sensitive]
Writes bench/results/RESULTS.json and the ``RESULTS`` section of bench/README.md (one release per results file;
run it again with other K to add rows; a K already measured is judged again, not redone).
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

from bench.calibration_mix import gate_checks, task_name  # noqa: E402
from bench.common import (bf16_bytes, cpu_line, find_one, machine, release_parser, release_quant_inputs,  # noqa: E402
                          update_readme_section, write_results)
from bench.release_scorecard import FRESH_QUESTIONS, exact_match_by_folder, fresh_exact_match  # noqa: E402

REDONE = "0-redone"  # the release's own settings quantized again by the bench (--redo)
SAME_SETTINGS_IGNORED = ("module_bits", "keep_sensitive", "threads", "method_params.quantize_s")  # what a kept module may change in the record


def recorded_kwargs(meta) -> dict:
    """``quantize_model`` keyword arguments that redo the quantization a ``lorakit_quant.json`` records."""
    p, cal = meta.params, meta.calibration
    general = cal.get("general") or {}
    mp = p.method_params
    return {"method": p.method, "bits": p.bits, "group_size": p.group_size_requested, "sym": p.sym,
            "desc_act": p.desc_act, "gptaq_alpha": mp.get("gptaq_alpha", 0.0),
            "clip_search": bool(mp.get("clip", mp.get("clip_norm"))),
            "calib_general": "default" if general else None, "calib_general_fraction": general.get("fraction", 0.0),
            "n_samples": cal.get("n_samples_requested"), "seq_len": p.seq_len, "seed": p.seed, "device": p.device,
            "compute_dtype": p.compute_dtype or "auto", "tune_steps": p.tune_steps, "tune_lr": p.tune_lr,
            "tune_general_fraction": p.tune_general_fraction, "tune_tokens": p.tune_tokens or "all",
            "tune_answer_weight": p.tune_answer_weight, "tune_samples": p.tune_samples or None}


def release_quantization(release: Path):
    """What a bench that quantizes a finished release again starts from: its merged model, calibration data, prep
    folders, its own 4-bit folder with that folder's record, and the ``quantize_model`` arguments that redo it."""
    from lorakit.quantize import read_quant_meta

    merged, calib, preps = release_quant_inputs(release)
    quantized = find_one(release, "quantized/*", dirs=True)
    meta = read_quant_meta(quantized)
    return merged, calib, preps, quantized, meta, recorded_kwargs(meta)


def settings_differ(release_meta, new_meta) -> list[str]:
    """Recorded parameters (module_bits and timings aside) on which a redone quantization differs from the release's."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "module_bits":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(release_meta.to_dict()["params"]), flat(new_meta.to_dict()["params"])
    return sorted(k for k in set(a) | set(b) if k not in SAME_SETTINGS_IGNORED and a.get(k) != b.get(k))


def ranking(merged: Path, calib: Path, kwargs: dict) -> list[dict]:
    """Every quantized linear by RTN output error on the release's calibration blocks, most sensitive first."""
    from lorakit.quantize.calibration import build_calibration
    from lorakit.quantize.core import _load_tokenizer
    from lorakit.quantize.sensitivity import module_sensitivity

    blocks = build_calibration(calib, _load_tokenizer(merged), n_samples=kwargs["n_samples"],
                               seq_len=kwargs["seq_len"], seed=kwargs["seed"], general=kwargs["calib_general"],
                               general_fraction=kwargs["calib_general_fraction"]).blocks
    sens = module_sensitivity(merged, blocks, bits=kwargs["bits"], group_size=kwargs["group_size"],
                              sym=kwargs["sym"])
    return [{"module": m, "output_mse": sens.output_mse[m], "relative": sens.relative[m]} for m in sens.ranking]


def judge(models: dict[str, Path], merged: Path, preps: list[Path], work: Path, fresh_n: int) -> dict:
    """Every model's exact match (every val and test question, ``fresh_n`` fresh ones) with the answers it lost and
    gained against the merged model's."""
    from lorakit.evaluate.accuracy import read_task_examples

    by_task = {task_name(p): p for p in preps}
    roles = {(task, role): folder for task in by_task for role, folder in {"merged": merged, **models}.items()}
    out = {split: exact_match_by_folder(roles, {t: read_task_examples(p, split, None) for t, p in by_task.items()},
                                        split) for split in ("val", "test")}
    out["fresh"] = fresh_exact_match(roles, by_task, work, n=fresh_n) if fresh_n else {}
    return out


def readme(data: dict, name: str) -> str:
    tasks = list(data["judged"]["test"])
    splits = [s for s in ("val", "test", "fresh") if data["judged"].get(s)]
    ks = sorted(data["variants"], key=lambda k: (int(k.split("-")[0]), k))
    lines = [f"## {name}", "",
             f"`LORAKIT_THREADS={data.get('threads', '?')} python bench/keep_sensitive.py --release {data['release']} --keep "
             f"{','.join(k for k in ks if k not in ('0', REDONE))} --fresh-questions {data['fresh_questions']}"
             + (" --redo" if REDONE in ks else "")
             + (f" --results {name}" if name != "keep_sensitive" else "") + "`: the release's quantization redone "
             "with its k most sensitive linears left unquantized (ranked by `lorakit.quantize.sensitivity` on its "
             "own calibration blocks; every other setting as its `lorakit_quant.json` records, checked), k = 0 being "
             "the release's own 4-bit model (0-redone: the same settings quantized again by the bench, at its thread "
             "count). Exact match on every val (the gate's split) and test question and on "
             f"{data['fresh_questions']} fresh questions per task, with the answers lost / gained against the "
             "merged model; the gate's perplexity change vs the merged model on general text. "
             f"Compute dtype {data['compute_dtype']}. CPU: {cpu_line(data.get('machine', {}).get('cpu'))}.", "",
             "| k | kept | size MB | general text | "
             + " | ".join(f"{t} {split} (lost/gained)" for t in tasks for split in splits) + " |",
             "|---|---|---|---|" + "---|" * len(splits) * len(tasks)]
    merged_cells = []
    for t in tasks:
        for split in splits:
            em = data["judged"][split].get(t, {}).get("merged", {}).get("exact_match")
            merged_cells.append("" if em is None else f"{100 * em:.1f}%")
    lines.append("| merged | | | | " + " | ".join(merged_cells) + " |")
    for k in ks:
        v = data["variants"][k]
        role = f"k{k}"
        cells = []
        for t in tasks:
            for split in splits:
                s = data["judged"][split].get(t, {})
                if role not in s:
                    cells.append("")
                    continue
                f = s[f"{role}_vs_merged"]
                cells.append(f"{100 * s[role]['exact_match']:.1f}% ({f['lost']}/{f['gained']})")
        kept = ", ".join(m.removeprefix("model.layers.").replace(".mlp.", " ").replace(".self_attn.", " ")
                         for m in v["kept"]) or "none"
        general = v["checks"]["general-text"]["degradation"]
        lines.append(f"| {k} | {kept} | {v['size_mb']:.1f} | {general:+.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--keep", default="3", help="k values to measure, comma-separated (k = 0 is always the "
                    "release's own model)")
    ap.add_argument("--fresh-questions", type=int, default=FRESH_QUESTIONS, help="fresh questions per task (0: none)")
    ap.add_argument("--redo", action="store_true", help="also quantize with the release's settings again here (K = 0, "
                    f"row {REDONE!r}): how far the rounding moves with the thread count alone")
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "keep_sensitive")
    ap.add_argument("--results", default="keep_sensitive")
    args = ap.parse_args()
    from lorakit.quantize import quantize_model, read_quant_meta
    from lorakit.runtime import configure_threads

    configure_threads()
    merged, calib, preps, quantized, release_meta, kwargs = release_quantization(args.release)
    work = args.work / args.results
    work.mkdir(parents=True, exist_ok=True)
    results = BENCH / "results" / f"{args.results}.json"
    previous = json.loads(results.read_text()) if results.exists() else {}
    if previous.get("quantized") != str(quantized) or previous.get("fresh_questions") != args.fresh_questions:
        previous = {}
    import torch

    data = {"release": str(args.release), "merged": str(merged), "quantized": str(quantized), "machine": machine(),
            "threads": torch.get_num_threads(), "compute_dtype": release_meta.params.compute_dtype, "fresh_questions": args.fresh_questions,
            "recorded_settings": kwargs, "merged_mb": round(bf16_bytes(merged) / 1e6, 1)}
    started = time.perf_counter()
    data["ranking"] = previous.get("ranking") or ranking(merged, calib, kwargs)
    data["ranking_s"] = previous.get("ranking_s", round(time.perf_counter() - started, 1))
    print("most sensitive:", json.dumps(data["ranking"][:6]), flush=True)
    variants = previous.get("variants", {})
    if "0" not in variants:
        gate_s, checks = gate_checks(merged, quantized, preps)
        variants["0"] = {"folder": str(quantized), "kept": [], "size_mb": round(release_meta.size_after_bytes / 1e6, 1),
                         "quantize_s": round(release_meta.wall_time_s, 1), "checks": checks, "gate_s": gate_s}
    data["variants"] = variants
    todo = [(str(k), k) for k in sorted({int(x) for x in args.keep.split(",") if x.strip()} - {0})]
    for key, k in ([(REDONE, 0)] if args.redo else []) + todo:
        kept = [r["module"] for r in data["ranking"][:k]]
        folder = work / f"keep{k}" if key != REDONE else work / REDONE
        if key in variants and variants[key]["kept"] == kept and Path(variants[key]["folder"]).exists():
            continue  # measured before: judged again below (a rerun adds what the judging gained since)
        t0 = time.perf_counter()
        result = quantize_model(merged, folder, calib=calib, keep_sensitive=k, force=True, progress=True, **kwargs)
        quantize_s = time.perf_counter() - t0
        new_meta = read_quant_meta(folder)
        if k and new_meta.quality["sensitivity"]["kept"] != kept:  # the stage ranked on the bench's blocks
            raise SystemExit(f"keep {k}: quantize kept {new_meta.quality['sensitivity']['kept']}, the bench ranked {kept}")
        differ = settings_differ(release_meta, new_meta)
        if differ:  # kept in the record (a table row would not be the release's quantization plus k kept)
            print(f"warning: keep {k}: the redone quantization differs from the release's on {differ}", flush=True)
        gate_s, checks = gate_checks(merged, folder, preps)
        variants[key] = {"folder": str(folder), "kept": kept, "size_mb": round(result.metadata["size_after_bytes"] / 1e6, 1),
                         "quantize_s": round(quantize_s, 1), "threads": torch.get_num_threads(),
                         "settings_differ": differ, "tuning": new_meta.tuning, "checks": checks, "gate_s": gate_s}
        print(f"{key}", json.dumps({c: round(v["degradation"], 4) for c, v in checks.items()}), flush=True)
        write_results(args.results, {**data, "judged": previous.get("judged", {})})
    models = {f"k{k}": Path(v["folder"]) for k, v in variants.items()}
    data["judged"] = judge(models, merged, preps, work, args.fresh_questions)
    write_results(args.results, data)
    update_readme_section(args.results, readme(data, args.results))
    print(results)


if __name__ == "__main__":
    main()
