"""Benchmark: what running a batch's shared prompt once buys, in training (lorakit.train.prefix) and in greedy
generation (lorakit.evaluate.accuracy.generate_greedy), against the same work on full prompts, in one run.

**Training.**
The default release's training (its prep and ``lora`` settings from ``flows.plan.ReleasePlan``, the base in NF4
with the compute dtype ``auto`` picks here), for each bundled task: the first micro-batches of the run, each timed
forward + backward both ways in one process, alternating which goes first, with the same LoRA weights (B drawn
small and non-zero, as after a few steps). Reported: seconds per micro-batch (median), the token positions the
decoder ran, the prefix length, and how far the two paths' loss and LoRA gradients sit apart (relative).

**Generation.** With ``--release OUT`` (a finished ``lorakit run`` of the default config), the release's merged
model answers the scorecard's examples (first ``scorecard.max_examples`` of each task's test split, the
scorecard's batch size and margin) with and without the shared prefix, alternating, ``--repeats`` times each:
seconds (median), prompt positions run, and how many predictions differ (greedy on the same logits up to float
rounding: expected none).

    LORAKIT_THREADS=1 python bench/shared_prefix.py [--micro 6] [--release OUT] [--work bench/work/shared_prefix]

Threads: the release trains its two adapters at once with one thread each on a 2-core machine, so 1 thread is
what a release step sees here (the scorecard runs with every core; pass LORAKIT_THREADS=2 for its view).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import cpu_line, ensure_release_prep, update_readme_section, write_results  # noqa: E402


def measure_task(ds, plan, micro: int) -> dict:
    from lorakit.compute import dtype_name, resolve_compute_dtype
    from lorakit.models import ensure_default_model
    from lorakit.models.synthetic import lora_grad_vector, randomize_lora_b
    from lorakit.train import loop
    from lorakit.train.batches import Schedule, load_rows
    from lorakit.train.model import load_for_training, parse_targets
    from lorakit.train.prefix import prefix_batch

    prep = ensure_release_prep(plan, ds)
    p = plan.train(ds, prep)["params"]
    dtype = dtype_name(resolve_compute_dtype(p["compute_dtype"], "train", "cpu"))
    model = load_for_training(ensure_default_model(), quant=p["quant"], device="cpu", r=p["r"], alpha=p["alpha"],
                              dropout=0.0, targets=parse_targets(p["target"]), rslora=p["rslora"], seed=p["seed"],
                              gradient_checkpointing=False, compute_dtype=dtype).model
    randomize_lora_b(model, scale=0.01)
    model.train()
    rows = load_rows(Path(prep), "train")
    sched = Schedule(len(rows), p["batch_size"], p["grad_accum"], p["seed"])
    batches = [idx for step in range(micro) for idx in sched.step_microbatches(step)][:micro]
    times = {"packed": [], "shared": []}
    loss_rel, grad_rel, computed, prefix_lens, docs = [], [], [], [], []
    for i, idx in enumerate(batches):
        got = {}
        order = ("packed", "shared") if i % 2 == 0 else ("shared", "packed")
        for path in order:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = loop._batch_loss_sum(model, rows, idx, "cpu", shared_prefix=(path == "shared"))
            loss.backward()
            times[path].append(time.perf_counter() - t0)
            got[path] = (float(loss.detach()), lora_grad_vector(model))
        (lp, gp), (ls, gs) = got["packed"], got["shared"]
        loss_rel.append(abs(ls - lp) / abs(lp))
        grad_rel.append(float((gs - gp).norm() / gp.norm()))
        b = prefix_batch(rows.input_ids[idx], rows.labels[idx], rows.position_ids[idx], pad_id=0)
        computed.append(b.computed_tokens)
        prefix_lens.append(b.prefix_len)
        docs.append(int(b.suffix_ids.shape[0]))
        print(f"{ds.name} micro-batch {i + 1}/{len(batches)}: packed {times['packed'][-1]:.2f} s, shared "
              f"{times['shared'][-1]:.2f} s", flush=True)
    packed_s, shared_s = statistics.median(times["packed"]), statistics.median(times["shared"])
    return {"compute_dtype": dtype, "micro_batches": len(batches), "packed_tokens": int(rows.input_ids[batches[0]].numel()),
            "real_tokens_median": statistics.median(int(rows.tokens[idx].sum()) for idx in batches),
            "computed_tokens_median": statistics.median(computed), "prefix_tokens": sorted(set(prefix_lens)),
            "documents_median": statistics.median(docs), "packed_s": round(packed_s, 3), "shared_s": round(shared_s, 3),
            "speedup": round(packed_s / shared_s, 2), "max_loss_rel_diff": max(loss_rel),
            "max_grad_rel_diff": max(grad_rel), "times": {k: [round(t, 3) for t in v] for k, v in times.items()}}


def measure_generation(release: Path, repeats: int) -> dict:
    """The release's merged model on each task's scorecard examples, generated with and without the shared prefix."""
    from lorakit.data.formats import prompt_token_ids
    from lorakit.evaluate.accuracy import DEFAULT_GEN_BATCH_SIZE, DEFAULT_MARGIN, generate_greedy, \
        read_task_examples, stop_token_ids
    from lorakit.evaluate.loading import describe_model, load_eval_model
    from lorakit.scorecard.options import SCORECARD

    from bench.common import find_one

    merged = find_one(release, "merged/*", dirs=True)
    loaded = load_eval_model(describe_model(merged), dtype="auto")
    tok = loaded.tokenizer
    out = {"model": str(merged), "dtype": loaded.dtype, "batch_size": DEFAULT_GEN_BATCH_SIZE, "tasks": {}}
    for prep in sorted(p for p in (release / "prep").iterdir() if not p.name.startswith("calibration")):
        examples = read_task_examples(prep, "test", SCORECARD.max_examples)
        prompts = [prompt_token_ids(r["text"], int(r["prompt_end"]), tok) for r in examples.records]
        limits = [len(tok(r["reference"], add_special_tokens=False)["input_ids"]) + DEFAULT_MARGIN
                  for r in examples.records]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        kw = dict(stop_ids=stop_token_ids(tok, loaded.model, examples), pad_id=int(pad),
                  batch_size=DEFAULT_GEN_BATCH_SIZE, device=loaded.device)
        times, tokens, answers = {"full": [], "shared": []}, {}, {}
        for r in range(repeats):
            for path in (("full", "shared") if r % 2 == 0 else ("shared", "full")):
                stats: dict[str, int] = {}
                t0 = time.perf_counter()
                answers[path] = generate_greedy(loaded.model, prompts, limits, share_prefix=(path == "shared"),
                                                stats=stats, **kw)
                times[path].append(time.perf_counter() - t0)
                tokens[path] = stats["prefill_tokens"]
                print(f"generation {prep.name} {path}: {times[path][-1]:.1f} s", flush=True)
        full_s, shared_s = statistics.median(times["full"]), statistics.median(times["shared"])
        out["tasks"][prep.name.rsplit("-", 1)[0]] = {
            "examples": len(prompts), "prefill_tokens_full": tokens["full"], "prefill_tokens_shared": tokens["shared"],
            "full_s": round(full_s, 2), "shared_s": round(shared_s, 2), "speedup": round(full_s / shared_s, 2),
            "predictions_differing": sum(a != b for a, b in zip(answers["full"], answers["shared"])),
            "times": {k: [round(t, 2) for t in v] for k, v in times.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, default=6, help="micro-batches timed per task (each both ways)")
    ap.add_argument("--release", help="a finished `lorakit run` output folder: also measure generation")
    ap.add_argument("--repeats", type=int, default=2, help="generation runs per way and task")
    ap.add_argument("--work", default=str(REPO / "bench" / "work" / "shared_prefix"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from flows.config import ReleaseConfig
    from flows.plan import ReleasePlan
    from lorakit.runtime import configure_threads

    configure_threads()
    cfg = ReleaseConfig(output_dir=args.work)
    plan = ReleasePlan(cfg)
    tasks = {ds.name: measure_task(ds, plan, args.micro) for ds in cfg.datasets}
    generation = measure_generation(Path(args.release), args.repeats) if args.release else None
    load = round(os.getloadavg()[0], 2)
    write_results("shared_prefix", {"threads": torch.get_num_threads(), "loadavg_1m": load, "training": tasks,
                                    "generation": generation})
    rows = "\n".join(
        f"| {name} | {t['compute_dtype']} | {t['real_tokens_median']:.0f} | {t['prefix_tokens'][0]}"
        f"{'-' + str(t['prefix_tokens'][-1]) if len(t['prefix_tokens']) > 1 else ''} | {t['documents_median']:.0f} | "
        f"{t['computed_tokens_median']:.0f} | {t['packed_s']:.2f} | {t['shared_s']:.2f} | **{t['speedup']:.2f}x** | "
        f"{t['max_loss_rel_diff']:.1e} / {t['max_grad_rel_diff']:.1e} |" for name, t in tasks.items())
    gen_md = ""
    if generation:
        gen_rows = "\n".join(
            f"| {name} | {g['examples']} | {g['prefill_tokens_full']} | {g['prefill_tokens_shared']} | {g['full_s']:.1f} | "
            f"{g['shared_s']:.1f} | **{g['speedup']:.2f}x** | {g['predictions_differing']} |"
            for name, g in generation["tasks"].items())
        gen_md = f"""
Generation (`--release`): the release's merged model ({generation['dtype']}) answers the scorecard's examples
(test split, batches of {generation['batch_size']}), {args.repeats} runs each way, median:

| task | examples | prompt positions run (full) | (shared) | full s | shared s | speed-up | predictions differing |
|---|---|---|---|---|---|---|---|
{gen_rows}
"""
    update_readme_section("shared_prefix", f"""## shared_prefix

`LORAKIT_THREADS={torch.get_num_threads()} python bench/shared_prefix.py --micro {args.micro}{' --release OUT' if generation else ''}` — one training micro-batch of the default
release (2 packed rows of 512 tokens, NF4 base, LoRA r16 all-linear), forward + backward, on packed rows vs with
the documents' shared prompt run once (`lorakit.train.prefix`); {args.micro} micro-batches per task, both ways each,
median. {cpu_line()}, {torch.get_num_threads()} thread(s), load {load} at the end.

| task | dtype | real tokens | prefix | documents | tokens run (shared) | packed s | shared s | speed-up | loss / grad rel. diff |
|---|---|---|---|---|---|---|---|---|---|
{rows}

The two paths compute the same sums in another order (the differences above are float rounding).
{gen_md}""")


if __name__ == "__main__":
    main()
