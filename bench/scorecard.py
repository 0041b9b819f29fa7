"""Scorecard benchmark on the embedded SmolLM2-135M-Instruct: task accuracy speed, and the general-text corpus.

1. ``lorakit.evaluate.task_accuracy`` of the base model on the test split of each bundled task, at several
   batch sizes: examples/s, generated tokens/s, exact match and F1 (the answers must not depend on the batch
   size beyond float noise; the script records whether they are identical).
2. Perplexity of the base model on the shipped general-English corpus (``--general-text default``).

Usage: LORAKIT_THREADS=1 python bench/scorecard.py [--batch-sizes 1,8,16] [--work bench/work/scorecard]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import update_readme_section, write_results  # noqa: E402


def cpu() -> dict[str, object]:
    """CPU model and the flags that decide kernel speed (bf16 units, AVX512), and the torch thread count."""
    import torch

    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return {"model": model, "flags": [f for f in wanted if f in flags], "torch_threads": torch.get_num_threads(),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--work", default=str(BENCH / "work" / "scorecard"))
    args = ap.parse_args()
    from lorakit.runtime import configure_threads

    configure_threads()
    from lorakit.data.general import general_text_path
    from lorakit.data.prep import prepare_dataset
    from lorakit.evaluate import perplexity, task_accuracy
    from lorakit.evaluate.loading import describe_model, load_eval_model, load_tokenizer

    machine_cpu = cpu()
    work = Path(args.work)
    spec = describe_model(None)
    loaded = load_eval_model(spec, device="cpu", tokenizer=load_tokenizer(spec))
    tasks = {}
    for name in ("reverse-words", "number-words"):
        prep = prepare_dataset([f"bundled:{name}"], work / name, force=True, progress=False).output
        runs, answers = [], []
        for bs in (int(x) for x in args.batch_sizes.split(",")):
            r = task_accuracy(loaded, prep, batch_size=bs, progress=False)
            answers.append([p.prediction for p in r.predictions])
            runs.append({"batch_size": bs, "examples": r.n_examples, "wall_s": r.wall_s,
                         "examples_per_s": round(r.examples_per_s, 3),
                         "generated_tokens_per_s": round(r.generated_tokens_per_s, 2),
                         "exact_match": r.exact_match, "f1": round(r.f1, 4)})
            print(name, runs[-1], flush=True)
        tasks[name] = {"split": r.split, "decoding": r.decoding, "runs": runs,
                       "answers_identical_across_batch_sizes": all(a == answers[0] for a in answers)}
    start = time.perf_counter()
    ppl = perplexity(loaded, general_text_path(), progress=False)
    general = {"path": "lorakit/data/general/sotu.jsonl", "ppl": round(ppl.ppl, 4), "tokens": ppl.tokens,
               "seq_len": ppl.method["seq_len"], "wall_s": round(time.perf_counter() - start, 2),
               "tokens_per_s": round(ppl.tokens_per_s, 1)}
    print("general", general, flush=True)
    path = write_results("scorecard", {"model": "SmolLM2-135M-Instruct (embedded, fp32)", "cpu": machine_cpu,
                                       "task_accuracy": tasks, "general_text": general})
    lines = ["## Scorecard: task accuracy speed and the general-English corpus (`bench/scorecard.py`)", "",
             f"CPU: {machine_cpu['model']} ({', '.join(machine_cpu['flags'])}), {machine_cpu['torch_threads']} "
             f"torch thread(s). Base SmolLM2-135M-Instruct, greedy, fp32.", "",
             "| task (test split) | batch | examples | ex/s | gen tok/s | exact | F1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in tasks.items():
        for r in t["runs"]:
            lines.append(f"| {name} | {r['batch_size']} | {r['examples']} | {r['examples_per_s']:.2f} | "
                         f"{r['generated_tokens_per_s']:.1f} | {r['exact_match']:.1%} | {r['f1']:.3f} |")
    lines += ["", f"General-English corpus: perplexity {general['ppl']:.2f} over {general['tokens']} tokens "
              f"(seq_len {general['seq_len']}, non-overlapping), {general['wall_s']:.0f} s.", ""]
    update_readme_section("scorecard", "\n".join(lines))
    print(path)


if __name__ == "__main__":
    main()
