"""How many prompts one greedy decode step should serve: the scorecard's generation batch size, measured.

Task accuracy (``lorakit.evaluate.task_accuracy``) generates every answer greedily in left-padded batches sorted by
prompt length; each decode step runs the whole model once for the batch. On CPU a 135M model's step is dominated
by per-step overhead and by reading the weights, so more prompts per step is cheaper per answer, until padding and
waiting for the batch's longest answer eat the gain. Every model of a default release (the base, each task's
adapter on the base through PEFT, the merged and the quantized model) answers every val question of its tasks at
each batch size, in this one process, one size after another, so the ratios compare like with like at this load;
``identical`` says whether every answer equals the one the first size gave (greedy answers must not depend on
which prompts shared a batch).

Usage: python bench/gen_batch.py --release OUT [--sizes 32,64,128] [--split val]
Writes bench/results/gen_batch.json and the ``## gen_batch`` section of bench/README.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import cpu_line, release_parser, update_readme_section, write_results  # noqa: E402
from bench.release_scorecard import release_models, release_parts  # noqa: E402


def scored_models(parts: dict, out_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """role -> (model folder, the tasks it answers), as the release scorecard scores them: the base, each task's
    adapter on its own task, the merged and the quantized model on every task."""
    models = {"base": (parts["data"]["models"]["base"]["folder"], list(parts["tasks"]))}
    by_role: dict[str, tuple[str, list[str]]] = {}
    for (task, role), folder in release_models(parts, out_dir).items():
        by_role.setdefault(f"adapter:{task}" if role == "adapter" else role, (str(folder), []))[1].append(task)
    models.update({k: v for k, v in by_role.items() if k.startswith("adapter:")})
    models.update({k: v for k, v in by_role.items() if not k.startswith("adapter:")})
    return models


def measure(folder: str, base: str, preps: dict[str, Path], tasks: list[str], sizes: list[int], split: str) -> dict:
    from lorakit.evaluate import task_accuracy
    from lorakit.evaluate.loading import describe_model, load_eval_model, load_tokenizer

    spec = describe_model(folder, base=base)
    loaded = load_eval_model(spec, tokenizer=load_tokenizer(spec), stage="eval")
    out: dict = {"path_used": loaded.path_used, "sizes": {}}
    first: dict[str, list[str]] = {}
    for size in sizes:
        wall, answers, exact, identical = 0.0, 0, {}, True
        for t in tasks:
            started = time.perf_counter()
            acc = task_accuracy(loaded, str(preps[t]), split=split, batch_size=size, progress=False)
            wall += time.perf_counter() - started
            answers += acc.n_examples
            exact[t] = acc.exact_match
            predictions = [p.prediction for p in acc.predictions]
            identical &= first.setdefault(t, predictions) == predictions
        out["sizes"][str(size)] = {"wall_s": round(wall, 2), "answers": answers,
                                   "answers_per_s": round(answers / wall, 2), "exact_match": exact,
                                   "identical_to_first_size": identical}
        print(folder, size, out["sizes"][str(size)], flush=True)
    del loaded
    return out


def totals(models: dict, sizes: list[int]) -> dict:
    """Every model's generation time summed per size, and its ratio against the first size."""
    walls = {str(s): round(sum(m["sizes"][str(s)]["wall_s"] for m in models.values()), 2) for s in sizes}
    first = walls[str(sizes[0])]
    return {"wall_s": walls, "speedup_vs_first": {s: round(first / w, 3) for s, w in walls.items()},
            "all_identical": all(m["sizes"][str(s)]["identical_to_first_size"] for m in models.values() for s in sizes)}


def readme(data: dict) -> str:
    sizes = data["sizes"]
    lines = ["## gen_batch", "",
             f"`python bench/gen_batch.py --release {data['release']} --sizes {','.join(map(str, sizes))}`: every model "
             f"of the release answers every {data['split']} question of its tasks (greedy, `task_accuracy`) at each "
             f"generation batch size, in one process on {data['cpu']}. Seconds per model; the last row is the sum and "
             f"its speed-up against {sizes[0]}. Answers identical to the first size's: "
             f"{'yes, every one' if data['total']['all_identical'] else 'NO (see the json)'}.", "",
             "| model | answers | " + " | ".join(f"batch {s}" for s in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for role, m in data["models"].items():
        first = m["sizes"][str(sizes[0])]
        lines.append(f"| {role} | {first['answers']} | "
                     + " | ".join(f"{m['sizes'][str(s)]['wall_s']:.1f} s" for s in sizes) + " |")
    t = data["total"]
    lines.append("| all | | " + " | ".join(f"{t['wall_s'][str(s)]:.1f} s ({t['speedup_vs_first'][str(s)]:.2f}x)"
                                          for s in sizes) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = release_parser(__doc__)
    ap.add_argument("--sizes", default="32,64,128", help="generation batch sizes, comma-separated; the first is the "
                    "reference for speed and answers")
    ap.add_argument("--split", default="val")
    args = ap.parse_args()
    from lorakit.runtime import configure_threads

    configure_threads()
    sizes = [int(s) for s in args.sizes.split(",")]
    parts = release_parts(args.release)
    base = parts["data"]["models"]["base"]["folder"]
    models = {role: measure(folder, base, parts["preps"], tasks, sizes, args.split)
              for role, (folder, tasks) in scored_models(parts, args.release).items()}
    data = {"release": str(args.release), "split": args.split, "sizes": sizes, "cpu": cpu_line(), "models": models,
            "total": totals(models, sizes)}
    path = write_results("gen_batch", data)
    update_readme_section("gen_batch", readme(data))
    print(path)


if __name__ == "__main__":
    main()
