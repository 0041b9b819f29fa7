"""Training-defaults sweep: which steps / learning rate / batch make the bundled tasks' adapters actually learn.

For each task and each grid point, train one QLoRA adapter on the embedded SmolLM2-135M-Instruct (the release's
prep settings, the resolved compute dtype) and score it by greedy exact match on
  * the task's test split (the release's prep fractions: 10% of the task's records), and
  * 40 fresh questions the bundled file cannot contain (``lorakit.data.bundled.generate.fresh_records``: unseen
    words for reverse-words, unused numbers for number-words),
and by the adapter's perplexity on lorakit's general text (the gate's corpus, its first 8,192 tokens, as the
scorecard reads it) against the base's (``general_text.vs_base``: what a recipe costs the language, the gate's
``max_general_forgetting``), recording train wall time, seconds per step and tokens per step. Runs are merged into
``bench/results/train_sweep.json`` by key, so a sweep can be extended run by run.

Usage: python bench/train_sweep.py --tasks reverse-words --grid "lr=1e-3,steps=40,batch=2,accum=4" [--grid ...]
       [--work bench/work/train_sweep] [--cpu-profile avx2]
A grid point's keys: examples (records generated for the task by ``lorakit.data.bundled.generate``, same seed;
default: the shipped file), mix (number-words: how its numbers are drawn, ``NUMBER_MIXES``; default: the
shipped file's), lr, steps, batch, accum, r, alpha, max_length, warmup (ratio), plus (LoRA+: B's lr = plus x A's,
``lora_plus_ratio``). Missing keys take the
release defaults (flows.config.LoraConfig / DatasetConfig).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import machine, update_readme_section, write_results  # noqa: E402
from lorakit.data.bundled.generate import FRESH_QUESTIONS  # noqa: E402

RESULTS = BENCH / "results" / "train_sweep.json"
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
GRID_KEYS = {"mix": str, "examples": int, "lr": float, "steps": int, "batch": int, "accum": int, "r": int, "alpha": float, "max_length": int,
             "warmup": float, "plus": float}


def parse_point(text: str) -> dict[str, float | int]:
    point: dict[str, float | int] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in GRID_KEYS:
            raise SystemExit(f"unknown grid key {key!r}; use {', '.join(GRID_KEYS)}")
        point[key.strip()] = GRID_KEYS[key.strip()](value)
    return point


def point_key(task: str, p: dict) -> str:
    return task + ":" + ",".join(f"{k}={p[k]}" for k in sorted(p))


def fresh_prep(task: str, work: Path, max_length: int, examples: int | None = None, mix: str | None = None,
               n: int = FRESH_QUESTIONS):
    """A prep folder of fresh questions (every split of it is scored), built once per task, length, data size,
    mix and count: ``n`` questions the ``examples`` generated training records (default: the shipped file) cannot
    contain. The generator is seeded, so the first 40 of any larger set are the 40 earlier results used."""
    from lorakit.data.bundled.generate import N_EXAMPLES, NUMBER_MIX, fresh_records, render_jsonl
    from lorakit.data.prep import prepare_dataset

    examples, mix = examples or N_EXAMPLES, mix or NUMBER_MIX
    count = "" if n == FRESH_QUESTIONS else f"-n{n}"  # the 40-question folders keep their earlier names
    folder = work / f"fresh-{task}-{max_length}-{examples}{_mix_tag(task, mix)}{count}"
    if not folder.exists():
        src = work / f"fresh-{task}-{examples}{_mix_tag(task, mix)}{count}.jsonl"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(render_jsonl(fresh_records(task, n, train_examples=examples, mix=mix)))
        prepare_dataset([str(src)], folder, max_length=max_length, val_fraction=0.1, test_fraction=0.1, seed=0,
                        progress=False)
    return folder


def _mix_tag(task: str, mix: str) -> str:
    """File-name tag of a number mix (empty for the old default, so earlier work folders stay valid)."""
    return f"-{mix}" if task == "number-words" and mix != "magnitudes" else ""


def all_examples(prep: Path):
    """Every split of a fresh-question prep folder as one TaskExamples (they are all unseen by training)."""
    from lorakit.data.splits import read_records
    from lorakit.evaluate.accuracy import read_task_examples

    examples = read_task_examples(prep, "test")
    examples.records = [r for split in ("train", "val", "test") for r in read_records(prep, split)]
    return examples


@functools.cache
def _digits_of_words() -> dict[str, int]:
    """number-words' answer -> digit count of its number, built once per process (100,000 numbers)."""
    from lorakit.data.bundled.generate import number_to_words

    return {number_to_words(v): len(str(v)) for v in range(100_000)}


def by_digits(predictions) -> dict[str, list[int]]:
    """number-words: [right, asked] per digit count of the question (read back from the reference words), so
    runs on differently drawn numbers compare length by length."""
    digits = _digits_of_words()
    out: dict[str, list[int]] = {}
    for p in predictions:
        cell = out.setdefault(str(digits[p.reference.strip()]), [0, 0])
        cell[0] += int(p.exact)
        cell[1] += 1
    return dict(sorted(out.items()))


def general_perplexity(loaded) -> dict:
    """A loaded model's perplexity on the release gate's general text, read and windowed as the scorecard reads it."""
    from lorakit.evaluate.core import perplexity
    from lorakit.evaluate.text import read_eval_texts, tokenize_eval_texts
    from lorakit.gate.general import DEFAULT_GENERAL_MAX_TOKENS, resolve_general_text

    stream = tokenize_eval_texts(read_eval_texts(resolve_general_text("default")), loaded.tokenizer,
                                 max_tokens=DEFAULT_GENERAL_MAX_TOKENS)
    result = perplexity(loaded, stream, progress=False)
    return {"ppl": round(result.ppl, 4), "tokens": result.tokens}


@functools.cache
def base_general_perplexity() -> dict:
    """The embedded base model's general-text perplexity, measured once per process (the reference of every run)."""
    from lorakit.evaluate.loading import describe_model, load_eval_model, load_tokenizer
    from lorakit.models.embedded import ensure_default_model

    spec = describe_model(str(ensure_default_model()))
    return general_perplexity(load_eval_model(spec, device="cpu", tokenizer=load_tokenizer(spec)))


def general_text(loaded) -> dict:
    """The adapter's general-text perplexity and its change against the base's (> 0 = the adapter forgot)."""
    adapter, base = general_perplexity(loaded), base_general_perplexity()
    return {"ppl": adapter["ppl"], "base_ppl": base["ppl"], "tokens": adapter["tokens"],
            "vs_base": round(adapter["ppl"] / base["ppl"] - 1, 4)}


def run_point(task: str, point: dict, work: Path) -> dict:
    from flows.config import DatasetConfig, LoraConfig
    from lorakit.data.bundled import bundled_dataset_path
    from lorakit.data.prep import prepare_dataset
    from lorakit.evaluate import task_accuracy
    from lorakit.evaluate.loading import describe_model, load_eval_model, load_tokenizer
    from lorakit.train.loop import train_adapter

    from lorakit.data.bundled.generate import GENERATORS, N_EXAMPLES, NUMBER_MIX, render_jsonl

    ds, lora = DatasetConfig(name=task, bundled=task), LoraConfig()
    max_length = int(point.get("max_length", ds.max_length))
    examples = int(point.get("examples", N_EXAMPLES))
    mix = str(point.get("mix", NUMBER_MIX))
    if "mix" in point and task != "number-words":
        raise SystemExit("the mix key applies to number-words only")
    source = bundled_dataset_path(task)
    if examples != N_EXAMPLES or mix != NUMBER_MIX:
        source = work / f"{task}-{examples}{_mix_tag(task, mix)}.jsonl"
        source.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"mix": mix} if task == "number-words" else {}
        source.write_bytes(render_jsonl(GENERATORS[task](examples, **kwargs)))
    prep = work / f"prep-{task}-{max_length}-{examples}{_mix_tag(task, mix)}"
    if not prep.exists():
        prepare_dataset([str(source)], prep, max_length=max_length, pack=ds.pack,
                        val_fraction=ds.val_fraction, test_fraction=ds.test_fraction, seed=ds.seed, progress=False)
    prep_meta = json.loads((prep / "prep.json").read_text())
    key = point_key(task, point)
    out = work / "adapters" / key.replace(":", "_").replace(",", "_").replace("=", "")
    plus = float(point["plus"]) if "plus" in point else lora.lora_plus_ratio  # what trains: keyed, else the default
    started = time.perf_counter()
    result = train_adapter(prep, out, quant=lora.quant, r=int(point.get("r", lora.r)),
                           alpha=float(point.get("alpha", lora.alpha)), dropout=lora.dropout, target=lora.target,
                           lr=float(point.get("lr", lora.lr)), max_steps=int(point["steps"]) if "steps" in point else None,
                           batch_size=int(point.get("batch", lora.batch_size)),
                           grad_accum=int(point.get("accum", lora.grad_accum)), seed=lora.seed,
                           warmup_ratio=float(point.get("warmup", 0.05)), checkpoint_every=None, force=True,
                           lora_plus_ratio=plus,
                           progress=True)
    train_s = time.perf_counter() - started
    record = json.loads((out / "lorakit_train.json").read_text())
    spec = describe_model(str(out))
    loaded = load_eval_model(spec, device="cpu", tokenizer=load_tokenizer(spec))
    scores = {}
    for name, questions in (("test", str(prep)), ("fresh", all_examples(fresh_prep(task, work, max_length, examples, mix)))):
        acc = task_accuracy(loaded, questions, split="test" if name == "test" else None, progress=False)
        scores[name] = {"n": acc.n_examples, "exact_match": acc.exact_match, "f1": round(acc.f1, 4),
                        "wall_s": round(acc.wall_s, 1),
                        "wrong_examples": [(p.reference, p.prediction) for p in acc.predictions if not p.exact][:3]}
        if task == "number-words":
            scores[name]["by_digits"] = by_digits(acc.predictions)
    general = general_text(loaded)
    steps = int(record["steps"])
    rows_per_step = int(point.get("batch", lora.batch_size)) * int(point.get("accum", lora.grad_accum))
    return {"task": task, "point": point, "examples": examples, "steps": steps, "train_wall_s": round(train_s, 1),
            "s_per_step": round(train_s / max(1, steps), 2), "tokens_per_step": rows_per_step * max_length,
            "train_rows": prep_meta["counts"]["train"]["rows"], "epochs": record["epochs_done"],
            "final_loss": record["final_loss"], "compute_dtype": record["compute_dtype"],
            "exact_match_test": scores["test"]["exact_match"], "exact_match_fresh": scores["fresh"]["exact_match"],
            "general_text": general, "scores": scores, "loadavg_1m": round(os.getloadavg()[0], 2), "lora_plus_ratio": plus}


# Runs recorded before the ``examples`` key trained on the shipped files of their time: 400 records per task.
EXAMPLES_BEFORE_THE_KEY = 400
SUMMARY_FIELDS = ("exact_match_test", "exact_match_fresh", "s_per_step", "train_wall_s", "epochs", "final_loss")


# The step count the sweep's base point trained (the release's default until it moved to 80 steps): the data-size
# comparison docs/data.md cites was made there.
SWEEP_BASE_STEPS = 40


def put_cell(table: dict, key: str, cell: dict) -> None:
    """One cell of a summary table. The runs are read in recorded order and the latest run of a cell wins; when
    more than one run falls in a cell (the same point trained again, or in another compute dtype, which the cell
    does not key), every run's test exact match stays beside it (``exact_match_test_every_run``, oldest first), so
    the spread is in the summary, not only in the rows."""
    earlier = table.get(key)
    if earlier is not None:
        cell["exact_match_test_every_run"] = earlier.get("exact_match_test_every_run",
                                                         [earlier["exact_match_test"]]) + [cell["exact_match_test"]]
    table[key] = cell


def release_point(runs: dict) -> dict:
    """The runs at the release's lr, batch and accum and the sweep's base step count (:data:`SWEEP_BASE_STEPS`), by
    task and data size: what the data-size docs and config comments cite
    (``release_point.<task>.<examples>.exact_match_test``)."""
    from flows.config import LoraConfig

    lora = LoraConfig()
    defaults = {"lr": lora.lr, "steps": SWEEP_BASE_STEPS, "batch": lora.batch_size,
                "accum": lora.grad_accum}
    out: dict = {}
    for r in runs.values():
        p = r["point"]
        if r.get("cpu_profile", "native") == "native" and r.get("lora_plus_ratio") is None and \
                set(p) <= {*defaults, "examples"} and all(
                p.get(k, v) == v for k, v in defaults.items()):
            put_cell(out.setdefault(r["task"], {}), str(r.get("examples", EXAMPLES_BEFORE_THE_KEY)),
                     {k: r[k] for k in SUMMARY_FIELDS})
    return out


def number_mix(runs: dict) -> dict:
    """number-words on 2,000 records at the release's lr / batch / accum, by how its numbers were drawn and by
    steps (``number_mix.<mix>.<steps>.exact_match_test``): what docs/data.md cites for the shipped draw."""
    from flows.config import LoraConfig

    lora = LoraConfig()
    fixed = {"lr": lora.lr, "batch": lora.batch_size, "accum": lora.grad_accum, "examples": 2000}
    out: dict = {}
    for r in runs.values():
        p = r["point"]
        if r["task"] == "number-words" and r.get("cpu_profile", "native") == "native" and \
                r.get("lora_plus_ratio") is None and set(p) <= {*fixed, "steps", "mix"} and \
                all(p.get(k) == v for k, v in fixed.items()):
            put_cell(out.setdefault(p.get("mix", "magnitudes"), {}), str(r["steps"]),
                     {k: r[k] for k in ("exact_match_test", "exact_match_fresh", "compute_dtype")})
    return out


def lora_plus(runs: dict) -> dict:
    """Each task on the shipped 2,000 records at 80 steps and the release's lr / batch / accum, by LoRA+ ratio
    ("off" = one learning rate; runs recorded before the field existed trained without it):
    ``lora_plus.<task>.<ratio>.exact_match_test``, what the training defaults cite."""
    from flows.config import LoraConfig

    lora = LoraConfig()
    fixed = {"lr": lora.lr, "steps": 80, "batch": lora.batch_size, "accum": lora.grad_accum}
    out: dict = {}
    for r in runs.values():
        p = r["point"]
        if r.get("cpu_profile", "native") == "native" and set(p) <= {*fixed, "examples", "plus"} and \
                p.get("examples", 2000) == 2000 and all(p.get(k, v) == v for k, v in fixed.items()):
            ratio = r.get("lora_plus_ratio")
            put_cell(out.setdefault(r["task"], {}), "off" if ratio is None else f"{ratio:g}", {
                **{k: r[k] for k in ("exact_match_test", "exact_match_fresh", "train_wall_s", "s_per_step",
                                     "compute_dtype")}, "general_vs_base": general_vs_base(r)})
    return out


def learning_rate(runs: dict) -> dict:
    """Each task on the shipped 2,000 records at 80 steps, one learning rate (no LoRA+), the release's batch / accum
    and rank, by learning rate (``learning_rate.<task>.<lr as 1e-03>.exact_match_test``, ``.general_vs_base``): what
    the per-task training defaults cite (``lorakit.data.bundled.BUNDLED_TRAINING``)."""
    from flows.config import LoraConfig

    lora = LoraConfig()
    fixed = {"steps": 80, "batch": lora.batch_size, "accum": lora.grad_accum}
    out: dict = {}
    for r in runs.values():
        p = r["point"]
        if r.get("cpu_profile", "native") == "native" and r.get("lora_plus_ratio") is None and \
                set(p) <= {*fixed, "examples", "lr"} and p.get("examples", 2000) == 2000 and \
                all(p.get(k, v) == v for k, v in fixed.items()) and general_vs_base(r) is not None:
            put_cell(out.setdefault(r["task"], {}), f"{p.get('lr', lora.lr):.0e}", {
                **{k: r[k] for k in ("exact_match_test", "exact_match_fresh", "train_wall_s", "compute_dtype")},
                "general_vs_base": general_vs_base(r)})
    return out


def general_vs_base(run: dict) -> float | None:
    """The adapter's general-text perplexity change against the base (None: recorded before it was measured)."""
    return (run.get("general_text") or {}).get("vs_base")


def save(runs: dict, measured_by: dict | None = None) -> None:
    """Write the runs, their summary and the README section. ``measured_by``: the previous file, when this
    process only re-summarises: its date and machine records stay those of the last training run, not this one's."""
    kept = {k: measured_by[k] for k in ("date", "machine", "last_run_machine") if k in measured_by} if measured_by else {}
    for r in runs.values():  # recorded before the field: the point's plus key, else one learning rate (the default then)
        r.setdefault("lora_plus_ratio", float(r["point"]["plus"]) if "plus" in r["point"] else None)
    write_results("train_sweep", {"model": "SmolLM2-135M-Instruct (embedded), QLoRA nf4",
                                  "data": "bundled tasks, release prep settings", "runs": runs,
                                  "release_point": release_point(runs), "number_mix": number_mix(runs), "lora_plus": lora_plus(runs), "learning_rate": learning_rate(runs), "last_run_machine": machine(), **kept})
    update_readme_section("train_sweep", readme(runs))


def readme(runs: dict) -> str:
    from flows.config import LoraConfig

    lora = LoraConfig()  # a point without batch / accum trained with the release's
    lines = ["## train_sweep", "", "QLoRA adapters on SmolLM2-135M-Instruct, one per bundled task; greedy exact match "
             "on the test split and on 40 fresh questions (`python bench/train_sweep.py`).", "",
             f"Runs without a recorded `examples` count trained on the shipped files of their time ({EXAMPLES_BEFORE_THE_KEY} records per task).",
             "A `digits mix` run drew number-words' numbers by digit count (`lorakit.data.bundled.generate.NUMBER_MIXES`) "
             "instead of the shipped file's magnitudes; its test and fresh questions are drawn the same way, and "
             "`scores.*.by_digits` holds [right, asked] per digit count. General ppl vs base: the adapter's perplexity "
             "on the gate's general text (first 8,192 tokens) against the base's; > 0 = it forgot (`-`: not measured "
             "then). s/step depends on the machine and on what ran "
             "beside the run (`loadavg_1m` in the results): compare quality across rows, time only within one run.",
             "", "| task | examples | lr | steps | batch x accum | EM test | EM fresh | general ppl vs base | s/step | train s | dtype |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs.values(), key=lambda r: (r["task"], r.get("examples", EXAMPLES_BEFORE_THE_KEY), r["point"].get("lr", 0), r["steps"])):
        p = r["point"]
        data = f"{r.get('examples', EXAMPLES_BEFORE_THE_KEY)}" + (f" ({p['mix']} mix)" if "mix" in p else "") + (
            f" (LoRA+ {r['lora_plus_ratio']:g})" if r.get("lora_plus_ratio") else "") + (f" (r {p['r']})" if "r" in p else "")
        lines.append(f"| {r['task']} | {data} | {p.get('lr', 'default')} | {r['steps']} | {p.get('batch', lora.batch_size)} x "
                     f"{p.get('accum', lora.grad_accum)} | {r['exact_match_test']:.0%} | {r['exact_match_fresh']:.0%} | "
                     f"{'-' if general_vs_base(r) is None else f'{general_vs_base(r):+.1%}'} | "
                     f"{r['s_per_step']} | {r['train_wall_s']:.0f} | {r['compute_dtype']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="reverse-words,number-words")
    ap.add_argument("--grid", action="append", default=[],
                    help="one grid point, e.g. lr=1e-3,steps=40 (none: rewrite the summary and README section)")
    ap.add_argument("--work", default=str(BENCH / "work" / "train_sweep"))
    ap.add_argument("--cpu-profile", choices=("native", "avx2"), default="native")
    args = ap.parse_args()
    if args.cpu_profile == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        env = {**os.environ, **AVX2_ENV}  # importing lorakit gives its compile cache an AVX2 folder of its own
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    from lorakit.runtime import configure_threads

    configure_threads()
    work = Path(args.work)
    previous: dict = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs: dict = previous.get("runs", {})
    if not args.grid:  # only the summary and README section are rewritten: keep who measured the runs
        save(runs, measured_by=previous)
        return
    for task in args.tasks.split(","):
        for text in args.grid:
            point = parse_point(text)
            key = point_key(task, point) + ("" if args.cpu_profile == "native" else ":avx2")
            print(f"== {key}", flush=True)
            result = {**run_point(task, point, work), "cpu_profile": args.cpu_profile}
            # Re-read before writing: another sweep process may have added runs meanwhile.
            runs = (json.loads(RESULTS.read_text()) if RESULTS.exists() else {}).get("runs", {})
            runs[key] = result
            print(json.dumps({k: runs[key][k] for k in ("exact_match_test", "exact_match_fresh", "s_per_step",
                                                         "train_wall_s")}), flush=True)
            save(runs)
    save(runs)


if __name__ == "__main__":
    main()
