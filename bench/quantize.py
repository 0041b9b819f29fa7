"""Benchmark: lorakit GPTQ/AWQ vs GPTQModel's own GPTQ/AWQ on SmolLM2-135M (CPU), plus a settings sweep.

Run: ``python bench/quantize.py [--parts awq,gptq,sweep-awq,sweep-gptq]`` (the AWQ head to head alone takes
about 45 minutes on a 2-core machine, most of it GPTQModel's AWQ). Writes bench/results/quantize.json; parts
not run keep their earlier entries, each of which records when and under what load it was measured.

* Text: docstrings of Python standard-library modules (present wherever Python 3.11 is, so the bench needs no
  download): calibration from one set of modules written as a prep folder's train split (the path lorakit's
  calibration reads), held-out perplexity text from a disjoint set (the val split).
* Every run happens in its own subprocess with one torch thread, so its wall time and peak RSS are its own.
  Perplexity: one fixed method for every model (non-overlapping 512-token chunks of the joined held-out text,
  first 2048 tokens, mean token NLL), which is enough to compare settings; issue 5's evaluator is the official one.
* AWQ head to head: both on the whole model, same calibration. Part ``awq`` runs lorakit's AWQ
  ``--awq-repeats`` times on each compute path (``compute_dtype`` float32, the exact search, and bfloat16,
  fast only on CPUs with AVX512-BF16/AMX: ``awq_speed`` records the CPU flags); part ``awq-gptqmodel`` is
  GPTQModel's single AWQ run (~26 min on an idle 2-core machine, longer on a loaded one; timeout 6000 s).
* Like-for-like quality: every model is also scored by ``lorakit eval`` in a fresh process (float32, the
  dequantized path, the prep folder's val split, first ``PPL_TOKENS`` tokens, non-overlapping ``SEQ_LEN``
  windows): field ``eval_fp32``. The older ``ppl`` field came from this script's own loop, which loaded each
  checkpoint in its stored dtype (lorakit's AWQ fp16, GPTQModel's bf16), so ``ppl`` values of different
  producers are not a like-for-like comparison; ``awq_speed`` compares ``eval_fp32`` only.
* Outputs stay under ``$BENCH_WORK`` (default /tmp/lorakit-bench-quantize): ``--reeval NAME,...`` re-scores
  kept outputs with ``lorakit eval`` without quantizing again.

Re-measure the head to head in one invocation (so ``awq_speed`` can state a speed ratio). From the recorded
idle-machine times: GPTQModel's AWQ ~1550 s, lorakit's 3 x (~145 s float32 + ~80 s bfloat16), about a minute of
scoring per model (7 models): ~45 minutes idle; on a loaded machine 2-3x, so raise ``--gptqmodel-timeout``:
    LORAKIT_THREADS=1 python bench/quantize.py --parts awq,awq-gptqmodel
"""


from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import stdlib_docstrings  # noqa: E402
from bench.export import cpu_info  # noqa: E402  (CPU model, kernel-relevant flags, load)
RESULTS = REPO / "bench" / "results" / "quantize.json"
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/lorakit-bench-quantize"))
N_SAMPLES, SEQ_LEN, PPL_TOKENS = 32, 512, 2048
AWQ_REPEATS = 3
PARTS = ("gptq", "awq", "awq-gptqmodel", "sweep-awq", "sweep-gptq")
AWQ_PATHS = ("float32", "bfloat16")  # lorakit AWQ's compute_dtype, one run name each

TRAIN_MODULES = ["argparse", "collections", "email.message", "http.client", "json", "logging", "pathlib",
                 "subprocess", "threading", "unittest.case", "asyncio.tasks", "dataclasses", "functools",
                 "itertools", "csv", "zipfile", "tarfile", "shutil", "tempfile", "urllib.parse", "inspect", "typing",
                 "enum", "contextlib", "socket", "configparser", "optparse", "pprint", "doctest", "codecs", "io",
                 "xml.etree.ElementTree", "sqlite3", "email.utils", "gettext", "locale", "os"]
VAL_MODULES = ["decimal", "fractions", "statistics", "random", "heapq", "bisect", "textwrap", "string", "difflib",
               "calendar"]


def make_prep(folder: Path) -> Path:
    if (folder / "prep.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for split, mods in (("train", TRAIN_MODULES), ("val", VAL_MODULES)):
        with open(folder / f"{split}.texts.jsonl", "w") as fh:
            for doc in stdlib_docstrings(mods):
                fh.write(json.dumps({"text": doc}) + "\n")
    (folder / "prep.json").write_text(json.dumps({"source": "python stdlib docstrings", "python": platform.python_version()}))
    return folder


def perplexity(model_dir: Path, prep: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data.splits import read_texts

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tok("\n\n".join(read_texts(prep, "val")), return_tensors="pt").input_ids[0][:PPL_TOKENS]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[0] - 1, SEQ_LEN):
            chunk = ids[start:start + SEQ_LEN].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = model(chunk).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def eval_fp32(model_dir: Path, prep: Path, work: Path) -> dict:
    """Score one model with ``lorakit eval`` in a fresh process: float32, dequantized path, the gate's method.

    The same command for every model, so lorakit's and GPTQModel's checkpoints are compared like for like
    (the checkpoints' own dtypes, fp16 and bf16, never enter the computation).
    """
    from lorakit.evaluate import read_results

    out = work / f"eval-{model_dir.name}.json"
    cmd = [sys.executable, "-m", "lorakit", "eval", str(model_dir), "--data", str(prep), "--split", "val",
           "--max-tokens", str(PPL_TOKENS), "--seq-len", str(SEQ_LEN), "--compute-dtype", "float32", "--quant-path",
           "dequantized", "--device", "cpu", "--quiet", "--json", str(out), "--force"]
    env = dict(os.environ, LORAKIT_THREADS=os.environ.get("LORAKIT_THREADS", "1"), PYTHONPATH=str(REPO))
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    r = read_results(out)[0]
    return {"ppl": round(r.ppl, 4), "path_used": r.path_used, "dtype": r.method["dtype"],
            "tokens_scored": r.tokens, "token_digest": r.method.get("token_digest"),
            "process_s": round(time.perf_counter() - started, 1),
            "command": "lorakit eval MODEL --data PREP --split val --max-tokens %d --seq-len %d --compute-dtype float32 "
                       "--quant-path dequantized --device cpu" % (PPL_TOKENS, SEQ_LEN)}


def _calib_rows(model_dir: Path, prep: Path):
    from transformers import AutoTokenizer

    from lorakit.quantize.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return build_calibration(prep, tok, n_samples=N_SAMPLES, seq_len=SEQ_LEN, seed=0)


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def run_one(spec: dict) -> dict:
    """Child process: one quantization (or the fp baseline), timed, then its perplexity."""
    from lorakit.runtime import configure_threads

    configure_threads()
    model_dir, prep, out = Path(spec["model"]), Path(spec["prep"]), Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    kind = spec["kind"]
    if kind == "fp":
        out = model_dir
    elif kind == "lorakit":
        from lorakit.quantize import quantize_model

        # calibrated on the tasks only, as GPTQModel is here (the library's default mixes in general text)
        params = {"calib_general": None, **spec["params"]}
        quantize_model(model_dir, out, calib=prep, n_samples=N_SAMPLES, seq_len=SEQ_LEN, progress=False, **params)
    elif kind == "gptqmodel-gptq":
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        from gptqmodel import GPTQModel, QuantizeConfig

        calib = _calib_rows(model_dir, prep).blocks
        model = GPTQModel.load(str(model_dir), QuantizeConfig(**spec["params"]), device="cpu")
        model.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * r.shape[0]} for r in calib], batch_size=1)
        model.save(str(out))
    elif kind == "gptqmodel-awq":
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.quantization import AWQConfig

        calib = _calib_rows(model_dir, prep).blocks
        model = GPTQModel.load(str(model_dir), AWQConfig(**spec["params"]), device="cpu")
        model.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * r.shape[0]} for r in calib], batch_size=1,
                       backend=BACKEND.TORCH_AWQ)
        model.save(str(out))
    wall = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"quantize_s": round(wall, 1), "peak_rss_mb": round(rss_mb), "size_mb": round(_folder_mb(out), 1)}
    meta = out / "lorakit_quant.json"
    if kind == "lorakit" and meta.exists():  # the AWQ compute path actually taken (auto resolves per CPU)
        result["awq_compute_dtype"] = json.loads(meta.read_text()).get("quality", {}).get("compute_dtype")
    if spec.get("ppl", True):
        t = time.perf_counter()
        result["ppl"] = round(perplexity(out, prep), 3)
        result["ppl_eval_s"] = round(time.perf_counter() - t, 1)
        result["eval_fp32"] = eval_fp32(out, prep, Path(spec["out"]).parent)
    return result


def spawn(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    env = dict(os.environ, LORAKIT_THREADS=os.environ.get("LORAKIT_THREADS", "1"), PYTHONPATH=str(REPO))
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s", "process_s": round(time.perf_counter() - started, 1)}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1][len("RESULT "):])


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def finalize(results: dict) -> None:
    """Derived numbers: perplexity change vs fp32, the 5% verdict, and the AWQ head to head (``awq_speed``)."""
    runs = results["runs"]
    base_ppl = runs.get("fp32", {}).get("ppl")
    if base_ppl:
        for r in runs.values():
            if "ppl" in r:
                r["ppl_vs_fp32"] = round(r["ppl"] / base_ppl - 1, 4)
                r["within_5pct"] = r["ppl_vs_fp32"] <= 0.05
    results["awq_speed"] = awq_speed(runs)
    save(results)


def _fp32_ppl(run: dict) -> float | None:
    return (run.get("eval_fp32") or {}).get("ppl")


def awq_speed(runs: dict) -> dict:
    """lorakit AWQ per compute path vs GPTQModel's AWQ; quality only from ``lorakit eval`` in float32.

    A ratio of times is given only for runs of one invocation (same machine state); a perplexity comparison
    only when both sides have an ``eval_fp32``; otherwise the field says what is pending and how to measure it.
    """
    theirs = runs.get("gptqmodel-awq-4b-g64-asym", {})
    base = _fp32_ppl(runs.get("fp32", {}))
    out: dict = {"measured_on": "SmolLM2-135M, whole model, 4-bit g64 asym, same calibration (32 x 512 tokens), one "
                                "torch thread each; process wall time incl. model load and checkpoint save",
                 "quality_method": "lorakit eval, float32, dequantized path, val split, first %d tokens" % PPL_TOKENS,
                 "fp32_model_ppl": base, "paths": {}}
    for path in AWQ_PATHS:
        ours = runs.get(f"lorakit-awq-4b-g64-asym-{path}", {})
        if "quantize_s" not in ours:
            out["paths"][path] = {"status": f"not measured; run: python bench/quantize.py --parts awq"}
            continue
        entry = {"lorakit_s_median": ours["quantize_s"], "lorakit_s_runs": ours.get("quantize_s_runs"),
                 "awq_compute_dtype": ours.get("awq_compute_dtype"), "cpu": ours.get("cpu"),
                 "loadavg_1m_at_start": ours.get("loadavg_1m_at_start"), "invocation": ours.get("invocation"),
                 "lorakit_ppl_fp32": _fp32_ppl(ours)}
        if base and entry["lorakit_ppl_fp32"]:
            entry["lorakit_vs_fp32_model"] = round(entry["lorakit_ppl_fp32"] / base - 1, 4)
        if "quantize_s" in theirs and theirs.get("invocation") == ours.get("invocation"):
            entry["speedup_vs_gptqmodel"] = round(theirs["quantize_s"] / ours["quantize_s"], 1)
        out["paths"][path] = entry
    if "quantize_s" in theirs:
        gq = {"quantize_s": theirs["quantize_s"], "invocation": theirs.get("invocation"),
              "loadavg_1m_at_start": theirs.get("loadavg_1m_at_start"), "ppl_fp32": _fp32_ppl(theirs)}
        if gq["ppl_fp32"] is None:
            gq["status"] = ("pending re-measurement: its quality was scored only by this script's old loop in the "
                            "checkpoint's bf16 (lorakit's in fp16) and the output was not kept; run: "
                            "LORAKIT_THREADS=1 python bench/quantize.py --parts awq,awq-gptqmodel")
        elif base:
            gq["vs_fp32_model"] = round(gq["ppl_fp32"] / base - 1, 4)
        out["gptqmodel"] = gq
    else:
        out["gptqmodel"] = {"status": "not measured; run: python bench/quantize.py --parts awq-gptqmodel"}
    scored = [r["eval_fp32"].get("token_digest") for r in runs.values() if (r.get("eval_fp32") or {}).get("ppl")]
    out["same_token_stream"] = len(set(scored)) <= 1  # every eval_fp32 scored the same tokens
    return out


def _row_order(name: str) -> tuple:
    """fp32, then the head-to-head pairs (GPTQ, AWQ), then the sweep by name."""
    head = ["fp32", "lorakit-gptq-4b-g64-sym", "gptqmodel-gptq-4b-g64-sym", "lorakit-awq-4b-g64-asym",
            *[f"lorakit-awq-4b-g64-asym-{p}" for p in AWQ_PATHS], "gptqmodel-awq-4b-g64-asym"]
    return (head.index(name), "") if name in head else (len(head), name)


def table(results: dict) -> str:
    """The markdown table for bench/README.md, rendered from the results file."""
    fp = results["runs"].get("fp32", {}).get("ppl")
    fp_eval = _fp32_ppl(results["runs"].get("fp32", {}))
    rows = ["| run | quantize s | peak RSS MB | size MB | ppl | vs fp32 | ppl, `lorakit eval` fp32 | vs fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(results["runs"].items(), key=lambda kv: _row_order(kv[0])):
        if "error" in r:
            rows.append(f"| {name} | {r['error'][:60]} | | | | | | |")
            continue
        ppl = r.get("ppl")
        rel = f"{(ppl / fp - 1) * 100:+.1f}%" if ppl and fp else ""
        ev = _fp32_ppl(r)
        ev_rel = f"{(ev / fp_eval - 1) * 100:+.1f}%" if ev and fp_eval else ""
        rows.append(f"| {name} | {r['quantize_s']:.0f} | {r['peak_rss_mb']} | {r['size_mb']:.0f} | "
                    f"{ppl if ppl is not None else 'n/a'} | {rel} | {ev if ev is not None else 'pending'} | {ev_rel} |")
    return "\n".join(rows)


def reeval(names: str) -> None:
    """Score kept outputs with ``lorakit eval`` (float32) and update their ``eval_fp32``; nothing is re-quantized."""
    results = json.loads(RESULTS.read_text())
    prep = WORK / "prep"
    if not (prep / "prep.json").exists():
        raise SystemExit(f"no calibration/eval prep folder at {prep}; run the bench once (or set BENCH_WORK)")
    wanted = list(results["runs"]) if names == "all" else names.split(",")
    for name in wanted:
        run = results["runs"].get(name)
        if run is None:
            raise SystemExit(f"no run named {name!r} in {RESULTS}")
        folder = Path(run["spec"]["model"]) if run["spec"].get("kind") == "fp" else WORK / name
        if not (folder / "config.json").exists():
            print(f"[bench] {name}: output not kept at {folder}; skipped", flush=True)
            continue
        print(f"[bench] lorakit eval {name} ...", flush=True)
        run["eval_fp32"] = {**eval_fp32(folder, prep, WORK), "reevaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
        print(f"[bench] {name}: {run['eval_fp32']}", flush=True)
        finalize(results)


def awq_summary(results: dict) -> str:
    """The AWQ head to head for bench/README.md, in words, from ``awq_speed`` only."""
    a = results.get("awq_speed", {})
    lines = []
    for path, e in a.get("paths", {}).items():
        if "lorakit_s_median" not in e:
            lines.append(f"lorakit AWQ, {path} path: {e['status']}.")
            continue
        cpu = e.get("cpu") or {}
        runs = e.get("lorakit_s_runs") or [e["lorakit_s_median"]]
        ppl = e.get("lorakit_ppl_fp32")
        rel = f" ({e['lorakit_vs_fp32_model']:+.1%} over the fp32 model's {a['fp32_model_ppl']})" if "lorakit_vs_fp32_model" in e else ""
        speed = f", {e['speedup_vs_gptqmodel']}x GPTQModel's AWQ of the same invocation" if "speedup_vs_gptqmodel" in e else ""
        lines.append(f"lorakit AWQ, {path} path (`--compute-dtype {path}`, ran as {e.get('awq_compute_dtype')}): "
                     f"{e['lorakit_s_median']} s (median of {len(runs)}; load {e.get('loadavg_1m_at_start')}) on "
                     f"{cpu.get('model', '?')} [{' '.join(cpu.get('flags', []))}], ppl {ppl}{rel}{speed}.")
    g = a.get("gptqmodel", {})
    if "quantize_s" in g:
        quality = f"ppl {g['ppl_fp32']}" if g.get("ppl_fp32") is not None else g["status"]
        lines.append(f"GPTQModel AWQ: {g['quantize_s']} s ({g.get('invocation')}); {quality}.")
    else:
        lines.append(f"GPTQModel AWQ: {g.get('status')}.")
    return "\n".join(f"- {line}" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    parser.add_argument("--table", action="store_true", help="print the markdown table of the last results")
    parser.add_argument("--rerun", help="NAME or NAME={spec overrides as JSON}: run one entry again, update results")
    parser.add_argument("--reeval", metavar="NAME,...", help="re-score kept outputs ($BENCH_WORK/NAME; 'fp32' = the "
                        "fp32 model) with lorakit eval in float32, without quantizing again; 'all' = every kept one")
    parser.add_argument("--awq-repeats", type=int, default=AWQ_REPEATS, help="lorakit AWQ runs per compute path")
    parser.add_argument("--gptqmodel-timeout", type=int, default=6000, help="seconds for GPTQModel's AWQ run (about "
                        "1550 s on an idle 2-core machine; give a loaded one 2-3x)")
    args = parser.parse_args()
    if args.table:
        results = json.loads(RESULTS.read_text())
        print(table(results) + "\n\n" + awq_summary(results))
        return
    if args.rerun:
        results = json.loads(RESULTS.read_text())
        name, _, spec_json = args.rerun.partition("=")
        old = results["runs"].get(name, {}).get("spec", {})
        spec = {**old, **(json.loads(spec_json) if spec_json else {})}
        spec.update(prep=str(WORK / "prep"), out=str(WORK / name))
        print(f"[bench] rerun {name} ...", flush=True)
        r = spawn(spec, 2400)
        results["runs"][name] = {"spec": {k: v for k, v in spec.items() if k in ("kind", "params", "model", "ppl")}, **r,
                                 "note": "re-run after the main bench run (same calibration, same machine)"}
        finalize(results)
        print(f"[bench] {name}: {r}", flush=True)
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    if args.reeval:
        reeval(args.reeval)
        return

    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    from lorakit.models import ensure_default_model
    from lorakit.quantize.gptqmodel_backend import backend_versions

    base = ensure_default_model()
    WORK.mkdir(parents=True, exist_ok=True)
    prep = make_prep(WORK / "prep")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    cpu = cpu_info()
    results.update({
        "machine": {"cpus": os.cpu_count(), "shared": True, "cpu": cpu, "torch_threads": int(os.environ.get("LORAKIT_THREADS", "1")),
                    "note": "2-core machine, possibly shared with other work: each run records the load average "
                            "when it started"},
        "versions": backend_versions(),
        "model": "SmolLM2-135M-Instruct (embedded default, fp32)",
        "calibration": {"source": "python stdlib docstrings (train modules)", "n_samples": N_SAMPLES, "seq_len": SEQ_LEN,
                        "seed": 0},
        "perplexity_method": f"held-out stdlib docstrings (val modules), first {PPL_TOKENS} tokens, non-overlapping "
                             f"{SEQ_LEN}-token chunks, exp(mean NLL)",
    })
    invocation = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def record(name: str, spec: dict, timeout: int = 1800, repeats: int = 1) -> dict:
        spec = {"prep": str(prep), "out": str(WORK / name), "model": str(base), **spec}
        runs = []
        for i in range(repeats):
            print(f"[bench] {name} ({i + 1}/{repeats}) ...", flush=True)
            load = round(os.getloadavg()[0], 2)
            runs.append({**spawn(spec, timeout), "loadavg_1m_at_start": load})
            print(f"[bench] {name}: {runs[-1]}", flush=True)
        ok = [r for r in runs if "error" not in r]
        r = dict(sorted(ok, key=lambda r: r["quantize_s"])[len(ok) // 2]) if ok else runs[-1]
        if repeats > 1:
            r["quantize_s_runs"] = [x.get("quantize_s") for x in runs]
            r["loadavg_1m_at_start"] = [x["loadavg_1m_at_start"] for x in runs]
        results["runs"][name] = {"spec": {k: v for k, v in spec.items() if k in ("kind", "params", "model", "ppl")},
                                 **r, "invocation": invocation, "cpu": {k: cpu[k] for k in ("model", "flags")}}
        save(results)
        return r

    record("fp32", {"kind": "fp"})
    if "gptq" in parts:
        # Group size 64: 128 does not divide SmolLM2's 576, and GPTQModel's default CPU kernel then refuses to load
        # a g128 checkpoint.
        record("lorakit-gptq-4b-g64-sym", {"kind": "lorakit", "params": {"method": "gptq", "bits": 4, "group_size": 64}})
        record("gptqmodel-gptq-4b-g64-sym", {"kind": "gptqmodel-gptq", "params": {"bits": 4, "group_size": 64}})
    if "awq" in parts:
        for stale in [k for k in results["runs"] if k.endswith("layers")]:  # the earlier cut-model timing
            del results["runs"][stale]
        for path in AWQ_PATHS:  # the exact float32 search, and bfloat16 (fast only with AVX512-BF16/AMX)
            awq = {"kind": "lorakit", "params": {"method": "awq", "bits": 4, "group_size": 64, "compute_dtype": path}}
            record(f"lorakit-awq-4b-g64-asym-{path}", awq, repeats=args.awq_repeats)
    if "awq-gptqmodel" in parts:
        record("gptqmodel-awq-4b-g64-asym", {"kind": "gptqmodel-awq", "params": {"bits": 4, "group_size": 64, "sym": False}},
               timeout=args.gptqmodel_timeout)
    finalize(results)

    # In priority order. Group size 128 is not swept: it does not divide SmolLM2's 576 (lorakit refuses it with
    # --strict-group-size and otherwise uses 64).
    sweep = [
        ("awq", 4, 32, False, False), ("awq", 4, 64, True, False), ("awq", 8, 64, False, False),
        ("awq", 4, 32, False, "activation"), ("awq", 4, 64, False, "activation"),
        ("gptq", 4, 32, False, False), ("gptq", 8, 64, True, False), ("gptq", 4, 64, False, False),
        ("gptq", 4, 64, True, True),
    ]
    for method, bits, g, sym, option in sweep:  # option: GPTQ act-order, or an AWQ scale form other than duo
        if f"sweep-{method}" not in parts:
            continue
        params = {"method": method, "bits": bits, "group_size": g, "sym": sym, "strict_group_size": True}
        suffix = ""
        if method == "gptq":
            params["desc_act"] = bool(option)
            suffix = "-actorder" if option else ""
        elif option:
            params["awq_scale_form"] = option
            suffix = f"-{option}"
        name = f"sweep-{method}-{bits}b-g{g}-{'sym' if sym else 'asym'}{suffix}"
        record(name, {"kind": "lorakit", "params": params})
    finalize(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
