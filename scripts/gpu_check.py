#!/usr/bin/env python3
"""The prepared GPU check (issue #14 item 6): lorakit's device-dependent paths, one run, one JSON summary.

Checks, each in its own subprocess so that a crash, a CUDA error or a hang in one cannot hide the others:

``environment``        torch, CUDA, the device, which optional packages import (bitsandbytes, gptqmodel, prefect...)
``setup``              a tiny random Llama made in code and a prepared-data folder (bundled reverse-words)
``nf4_train``          QLoRA training (bitsandbytes NF4 + double quant) on the device
``gptq``, ``awq``      4-bit quantization on the device; dtypes read from lorakit_quant.json
``kernel_vs_dequant``  the gate's perplexity through the installed GPTQ/AWQ kernels vs the exact dequantized path
                       (relative difference <= 1e-3)
``release_route_gpu``  the release flow with ``route_gpu: true`` on a real Prefect server: train and quantize must
                       run as flow runs of the ``cuda`` pool's worker

This file is the orchestrator (standard library only, so the summary is printed even where torch or lorakit fail to
import) and, with ``--child NAME``, the runner of one check. ``scripts/gpu_check.sh`` is the entry point;
docs/gpu_check.md says how to run it on a GPU machine and how to read the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "lorakit-gpu-check/1"
KERNEL_TOLERANCE = 1e-3  # the gate's agreement bound (lorakit.evaluate.core.KERNEL_CHECK_TOLERANCE)
RESULTS_FILE = REPO / "bench" / "results" / "gpu_check.json"

# name -> (seconds at most, checks whose success it needs: one of each inner tuple)
CHECKS: dict[str, tuple[int, tuple[tuple[str, ...], ...]]] = {
    "environment": (90, ()),
    "setup": (120, ()),
    "nf4_train": (180, (("setup",),)),
    "gptq": (300, (("setup",),)),  # GPTQModel JIT-builds a C++ packing op on its first run (~2 min on 2 cores)
    "awq": (180, (("setup",),)),
    "kernel_vs_dequant": (240, (("gptq", "awq"),)),
    "release_route_gpu": (420, (("setup",),)),
}
CLEANUP_S = 30  # what a stopped check gets to shut down its own subprocesses (the Prefect server and workers)

# Tiny sizes: the check proves device paths, not quality; they keep the whole run within minutes on 2 CPU cores.
TRAIN = dict(quant="nf4", r=4, alpha=8, max_steps=6, batch_size=2, grad_accum=1, lr=1e-3, seed=0)
QUANT = dict(bits=4, group_size=32, sym=False, n_samples=8, seq_len=128, seed=0, calib_general=None)
EVAL = dict(seq_len=128, max_tokens=2048, batch_size=4)


def dtype_plan(device: str) -> dict[str, Any]:
    """The dtypes every check asks for: the one place that decides them.

    Training and quantization ask for ``auto``: lorakit.compute resolves it per machine (bfloat16 on CUDA with
    bf16 support and on CPUs where a probe shows bf16 is fast, else float32). Evaluation asks for float32 (the
    gate's method). What each check actually used is read back from the stage's metadata (``dtype_used``).
    """
    cuda = device.startswith("cuda")
    return {
        "train": "auto",
        "quantize": "auto",
        # the kernel-vs-dequantized comparison: float32 first (the gate's dtype); on CUDA, kernels that refuse
        # float32 are retried in float16 (the dtype GPTQ/AWQ kernels are written for), both paths alike
        "eval": ["float32", "float16"] if cuda else ["float32"],
    }


class Skip(Exception):
    """A check that cannot run here (a package is missing): reported as skipped with the reason."""


class CheckFailed(Exception):
    """A check that ran and found a fault; ``data`` (its numbers so far) is reported with the reason."""

    def __init__(self, reason: str, data: dict[str, Any]) -> None:
        super().__init__(reason)
        self.data = data


# ----------------------------------------------------------------------------------------------------------------
# Child side: one check per process. Each returns a dict of numbers; raising Skip or any exception is reported.
# ----------------------------------------------------------------------------------------------------------------

def _need(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"not installed here: {', '.join(missing)} (carry wheels in .whl/, see docs/gpu_check.md)")


def _paths(workdir: Path) -> dict[str, Path]:
    return {k: workdir / k for k in ("tiny", "prep", "adapter", "gptq", "awq", "release")}


def _cuda_numbers() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"cuda_peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_environment(workdir: Path, device: str, plan: dict) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    packages = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "gptqmodel", "optimum", "prefect",
                 "safetensors", "tokenizers", "pyarrow", "datasets", "pydantic", "numpy"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    out["packages"] = packages
    import torch

    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device_name=props.name, device_count=torch.cuda.device_count(),
                   capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported())
    else:
        out.update(device_name=f"cpu ({_cpu_model()})")
    imports = {}
    for name in ("lorakit", "bitsandbytes", "gptqmodel", "prefect"):
        started = time.perf_counter()
        try:
            __import__(name)
            imports[name] = {"ok": True, "s": round(time.perf_counter() - started, 2)}
        except Exception as exc:  # any failure to import is the finding
            imports[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    out["imports"] = imports
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckFailed(f"--device {device} was requested but torch {torch.__version__} sees no CUDA device", out)
    if not imports["lorakit"]["ok"]:
        raise CheckFailed(f"lorakit does not import: {imports['lorakit']['error']}", out)
    return out


def check_setup(workdir: Path, device: str, plan: dict) -> dict[str, Any]:
    from lorakit.data.bundled import bundled_dataset_path
    from lorakit.data.prep import prepare_dataset
    from lorakit.models.tiny import make_tiny_llama

    p = _paths(workdir)
    make_tiny_llama(p["tiny"], seed=0)
    prepare_dataset([bundled_dataset_path("reverse-words")], p["prep"], base=p["tiny"], max_length=128,
                    force=True, progress=False)
    meta = json.loads((p["prep"] / "prep.json").read_text())
    return {"model": str(p["tiny"]), "prep": str(p["prep"]), "counts": meta.get("counts"),
            "format": meta.get("format")}


def check_nf4_train(workdir: Path, device: str, plan: dict) -> dict[str, Any]:
    """Its own process, training first: no eval pass on a 4-bit model precedes it, which on CPUs with AVX512-BF16
    would repack the weights for inference and make LoRA gradients wrong (shared NOTES; lorakit refuses that)."""
    _need("bitsandbytes", "peft")
    from lorakit.train import read_train_record, train_adapter

    p = _paths(workdir)
    result = train_adapter(p["prep"], p["adapter"], base=p["tiny"], device=device, checkpoint_every=None,
                           compute_dtype=plan["train"], force=True, progress=False, **TRAIN)
    rec = read_train_record(result.output)
    speeds = sorted(e["tokens_per_s"] for e in result.log if e.get("tokens_per_s"))
    out = {"device_used": rec.device, "dtype_used": rec.compute_dtype, "dtype_requested": plan["train"],
           "quant": rec.config["quant"], "steps": rec.steps, "first_loss": rec.first_loss,
           "final_loss": rec.final_loss, "loss_drop": rec.loss_drop, "trainable_params": rec.trainable_params,
           "gradient_checkpointing": rec.gradient_checkpointing, "train_wall_s": rec.wall_time_s,
           "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
           "versions": rec.versions, **_cuda_numbers()}
    _expect_device(rec.device, device, "training", out)
    if rec.config["quant"] != "nf4":
        raise CheckFailed(f"lorakit_train.json records quant {rec.config['quant']!r}, expected nf4", out)
    return out


def _expect_device(used: str, requested: str, what: str, out: dict[str, Any]) -> None:
    if used.split(":")[0] != requested.split(":")[0]:
        raise CheckFailed(f"{what} ran on {used}, but --device {requested} was requested", out)


def _quantize(workdir: Path, device: str, plan: dict, method: str) -> dict[str, Any]:
    from lorakit.quantize import quantize_model, read_quant_meta

    p = _paths(workdir)
    result = quantize_model(p["tiny"], p[method], method=method, calib=p["prep"], device=device, force=True,
                            compute_dtype=plan["quantize"], progress=False, **QUANT)
    meta = read_quant_meta(result.output)
    quality = meta.quality
    out = {"device_used": meta.params.device, "dtype_used": _quant_dtype_used(meta.to_dict()),
           "dtype_requested": plan["quantize"], "layout": meta.params.layout,
           "bits": meta.params.bits, "group_size": meta.params.group_size, "sym": meta.params.sym,
           "quantize_wall_s": meta.wall_time_s, "size_before_bytes": meta.size_before_bytes,
           "size_after_bytes": meta.size_after_bytes, "backend": meta.backend, **_cuda_numbers()}
    if method == "awq":
        out["mean_mse_ratio_vs_rtn"] = quality.get("mean_mse_ratio_vs_rtn")
    else:
        losses = list((quality.get("module_loss") or {}).values())
        out["mean_module_loss"] = sum(losses) / len(losses) if losses else None
    _expect_device(meta.params.device, device, f"{method} quantization", out)
    return out


def _quant_dtype_used(meta: dict[str, Any]) -> str | None:
    """From lorakit_quant.json: for GPTQ the dtype GPTQModel ran the model in, for AWQ what its request resolved to."""
    params = meta.get("params") or {}
    if params.get("method") == "awq":
        return (meta.get("quality") or {}).get("compute_dtype")
    return (params.get("method_params") or {}).get("compute_dtype")


def check_gptq(workdir: Path, device: str, plan: dict) -> dict[str, Any]:
    _need("gptqmodel")
    return _quantize(workdir, device, plan, "gptq")


def check_awq(workdir: Path, device: str, plan: dict) -> dict[str, Any]:
    return _quantize(workdir, device, plan, "awq")


def _kernel_pair(folder: Path, prep: Path, device: str, dtypes: list[str]) -> dict[str, Any]:
    """Perplexity of one quantized folder through the kernels and through the dequantized path, same dtype."""
    from lorakit.evaluate import describe_model, load_eval_model, load_tokenizer, perplexity

    spec = describe_model(folder)
    tok = load_tokenizer(spec)
    attempts = []
    for dtype in dtypes:
        try:  # kernels refuse a dtype or device at load or only at their first forward: both try the next dtype
            kernel = load_eval_model(spec, quant_path="kernel", device=device, dtype=dtype, tokenizer=tok)
            layers = sorted({type(m).__name__ for m in kernel.model.modules() if hasattr(m, "qweight")})
            qdev = sorted({str(m.qweight.device) for m in kernel.model.modules() if hasattr(m, "qweight")})
            k = perplexity(kernel, prep, progress=False, **EVAL)
        except Exception as exc:
            attempts.append({"dtype": dtype, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        finally:
            kernel = None
            _free_cuda()
        dense = load_eval_model(spec, quant_path="dequantized", device=device, dtype=dtype, tokenizer=tok)
        d = perplexity(dense, prep, progress=False, **EVAL)
        if k.method != d.method:
            raise RuntimeError("the two paths were scored with different methods; their perplexities do not compare")
        rel = abs(d.ppl / k.ppl - 1)
        return {"status": "ok" if rel <= KERNEL_TOLERANCE else "failed", "dtype_used": dtype,
                "device_used": {"kernel": k.model["device"], "dequantized": d.model["device"]},
                "kernel_path": k.path_used, "kernel_layers": layers, "kernel_weights_on": qdev,
                "dequantized_path": d.path_used, "ppl_kernel": k.ppl, "ppl_dequantized": d.ppl,
                "relative_difference": rel, "tolerance": KERNEL_TOLERANCE, "tokens": k.tokens,
                "kernel_tokens_per_s": round(k.tokens_per_s, 1), "dequantized_tokens_per_s": round(d.tokens_per_s, 1),
                "failed_attempts": attempts}
    return {"status": "failed", "reason": f"no dtype in {dtypes} loads through the kernels",
            "failed_attempts": attempts}


def check_kernel_vs_dequant(workdir: Path, device: str, plan: dict) -> dict[str, Any]:
    import importlib.util

    _need("gptqmodel")
    p = _paths(workdir)
    pairs: dict[str, Any] = {}
    for method in ("gptq", "awq"):
        if not (p[method] / "lorakit_quant.json").exists():
            pairs[method] = {"status": "skipped", "reason": f"no {method} checkpoint (its check did not pass)"}
            continue
        if method == "gptq" and importlib.util.find_spec("optimum") is None:
            pairs[method] = {"status": "skipped", "reason": "optimum is not installed (transformers needs it for GPTQ)"}
            continue
        try:
            pairs[method] = _kernel_pair(p[method], p["prep"], device, plan["eval"])
        except Exception as exc:
            pairs[method] = {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:500]}"}
    out = {"pairs": pairs, "dtype_requested": plan["eval"], **_cuda_numbers()}
    bad = {m: r.get("reason") or f"relative difference {r.get('relative_difference')}" for m, r in pairs.items()
           if r["status"] == "failed"}
    if bad:
        raise CheckFailed(f"kernel vs dequantized: {bad}", out)
    if all(r["status"] == "skipped" for r in pairs.values()):
        raise Skip("; ".join(f"{m}: {r['reason']}" for m, r in pairs.items()))
    return out


def _release_config(workdir: Path, device: str, quant: str, method: str) -> dict[str, Any]:
    """configs/tiny.yaml on the tiny model, one dataset (every routed flow kind once), GPU stages on ``device``."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    p = _paths(workdir)
    stage_device = "auto" if device.startswith("cuda") else device  # auto = the cuda worker's GPU
    data.update(base=str(p["tiny"]), output_dir=str(p["release"] / "out"), route_gpu=True,
                datasets=data["datasets"][:1], merge={**data["merge"], "weights": [1.0]})
    data["registry"] = {**data.get("registry", {}), "root": str(p["release"] / "registry")}
    data["lora"] = {**data["lora"], "quant": quant, "device": stage_device}
    data["quantize"] = {**data["quantize"], "method": method, "device": stage_device}
    return data


def check_release_route_gpu(workdir: Path, device: str, plan: dict) -> dict[str, Any]:
    _need("prefect")
    import importlib.util

    sys.path.insert(0, str(REPO))
    from tests.prefect_server import RELEASE_CLIENT, prefect_cli, prefect_stack

    # What the machine has decides the variant (recorded): routing is what this check is about. Without gptqmodel
    # the release quantizes with lorakit's own AWQ, and the gate (on the cpu pool) takes the dequantized path.
    quant = "nf4" if importlib.util.find_spec("bitsandbytes") else "none"
    method = "gptq" if importlib.util.find_spec("gptqmodel") else "awq"
    data = _release_config(workdir, device, quant, method)
    home = _paths(workdir)["release"] / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    with prefect_stack(home) as stack:
        stack.env.update(LORAKIT_RESULTS=str(workdir / "release" / "results"), PYTHON=sys.executable,
                         PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2")
        t = time.perf_counter()
        stack.start_server()
        times["server_start_s"] = round(time.perf_counter() - t, 1)
        print(f"server up in {times['server_start_s']} s", flush=True)  # phases in the log: a timeout says where
        t = time.perf_counter()
        stack.run("bash", "scripts/pools_up.sh")
        stack.run(*prefect_cli(), "--no-prompt", "deploy", "--all")
        stack.start_worker("cpu")
        stack.start_worker("cuda")
        times["deploy_s"] = round(time.perf_counter() - t, 1)
        print(f"deployed, workers up in {times['deploy_s']} s; release running", flush=True)
        t = time.perf_counter()
        try:
            proc = stack.run(sys.executable, "-c", RELEASE_CLIENT, json.dumps(data), "360", timeout=400)
        finally:
            logs = {n: stack.log(n)[-1500:] for n in ("worker-cpu", "worker-cuda")}
            for name, text in logs.items():  # stopped or not, what each worker last said
                print(f"--- {name} after {time.perf_counter() - t:.0f} s of release ---\n{text}", flush=True)
        times["release_s"] = round(time.perf_counter() - t, 1)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    out_dir = Path(data["output_dir"])
    train = _first_json(out_dir / "adapters", "lorakit_train.json")
    quant_meta = _first_json(out_dir / "quantized", "lorakit_quant.json")
    gate = _first_json(out_dir / "gate", "gate.json")
    children = sorted((c["flow"], c["pool"], c["state"]) for c in info.get("children", []))
    out = {"state": info.get("state"), "message": info.get("message"), "parent_pool": info.get("pool"),
           "child_runs": [{"flow": f, "pool": pl, "state": s} for f, pl, s in children], "lora_quant": quant,
           "quantize_method": method,
           "train": {"device_used": train.get("device"), "dtype_used": train.get("compute_dtype")},
           "quantize": {"device_used": (quant_meta.get("params") or {}).get("device"),
                        "dtype_used": _quant_dtype_used(quant_meta)},
           "gate": {"passed": gate.get("passed"), "degradation": gate.get("degradation")}, **times}
    if info.get("state") != "COMPLETED" or info.get("pool") != "cpu":
        raise CheckFailed(f"release run ended {info.get('state')} on pool {info.get('pool')}: {info.get('message')}",
                          {**out, "worker_logs": logs})
    if children != [("quantize", "cuda", "COMPLETED"), ("train", "cuda", "COMPLETED")]:
        raise CheckFailed(f"GPU flows did not all complete on the cuda pool: {children}", {**out, "worker_logs": logs})
    for stage in ("train", "quantize"):
        _expect_device(out[stage]["device_used"] or "unknown", device, f"the routed {stage} flow", out)
    return out


def _first_json(root: Path, name: str) -> dict[str, Any]:
    found = sorted(root.glob(f"*/{name}")) if root.exists() else []
    return json.loads(found[0].read_text()) if found else {}


CHILDREN = {"environment": check_environment, "setup": check_setup, "nf4_train": check_nf4_train,
            "gptq": check_gptq, "awq": check_awq, "kernel_vs_dequant": check_kernel_vs_dequant,
            "release_route_gpu": check_release_route_gpu}


def run_child(name: str, workdir: Path, device: str, plan: dict, result_path: Path) -> int:
    """Run one check in this process and write its result; the process exits 0 whatever the check's outcome."""
    def on_term(signum, frame):  # the orchestrator's time limit: unwind so `finally` blocks stop subprocesses
        raise SystemExit(f"stopped by signal {signum} (time limit)")

    signal.signal(signal.SIGTERM, on_term)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.perf_counter()
    try:
        if name != "environment":
            from lorakit.runtime import configure_threads

            configure_threads()
        result = {"status": "ok", **CHILDREN[name](workdir, device, plan)}
    except Skip as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except CheckFailed as exc:
        result = {**exc.data, "status": "failed", "reason": str(exc)[:2000]}
    except BaseException as exc:  # noqa: BLE001 - every failure, SystemExit from the time limit included, is reported
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:2000]}",
                  "traceback": traceback.format_exc()[-3000:]}
    result["check_s"] = round(time.perf_counter() - started, 2)
    _write_json(result_path, result)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Orchestrator: standard library only.
# ----------------------------------------------------------------------------------------------------------------

def _write_json(path: Path, data: dict) -> None:
    """Temp file + rename: a reader never sees half a summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _host() -> dict[str, Any]:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": _cpu_model(), "cores": cores,
            "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
            "load_avg_start": list(os.getloadavg()), "lorakit_threads": os.environ.get("LORAKIT_THREADS")}


def _install_wheels(workdir: Path, log) -> dict[str, Any]:
    """Install the wheels carried in ``.whl/`` (no index, no dependencies) into a folder the checks import from."""
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not wheels:
        return {"wheels": 0}
    target = workdir / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(target), *map(str, wheels)]
    log(f"installing {len(wheels)} wheel(s) from .whl/ into {target}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = {"wheels": len(wheels), "target": str(target), "rc": proc.returncode}
    if proc.returncode != 0:
        out["error"] = (proc.stdout + proc.stderr)[-2000:]
    return out


def _child_env(workdir: Path, device: str, name: str, site: str | None, kernel_backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env["LORAKIT_KERNEL_BACKEND"] = kernel_backend  # read by lorakit's kernel path, in the checks and the workers
    paths = [str(REPO)] + ([site] if site else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if device == "cpu" and name != "environment":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu means CPU, also for libraries that look for a GPU themselves
    return env


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the check's process group (it then stops its own servers), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, CLEANUP_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


_RUNNING: list[subprocess.Popen] = []  # the check in flight, stopped if the orchestrator itself is interrupted


def _tail(path: Path, n: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_check(name: str, workdir: Path, device: str, plan: dict, timeout: float, env: dict, log) -> dict[str, Any]:
    result_path = workdir / "results" / f"{name}.json"
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--workdir", str(workdir), "--device",
           device, "--plan", json.dumps(plan), "--result", str(result_path)]
    started = time.monotonic()
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        _RUNNING.append(proc)
        timed_out = False
        while True:
            try:
                proc.wait(timeout=max(0.1, min(20.0, timeout - (time.monotonic() - started))))
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                if elapsed >= timeout:
                    log(f"  {name}: time limit of {timeout:.0f} s reached; stopping it")
                    timed_out = True
                    _stop_group(proc)
                    break
                log(f"  {name}: still running ({elapsed:.0f} s of at most {timeout:.0f} s)")
    _RUNNING.remove(proc)
    wall = round(time.monotonic() - started, 2)
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {"status": "failed", "reason": f"the check process exited with code {proc.returncode} and wrote no "
                  "result (crashed or killed)"}
    if timed_out:
        result = {**result, "status": "failed", "reason": f"time limit: stopped after {timeout:.0f} s"
                  + (f" ({result.get('reason')})" if result.get("reason") else "")}
    if result["status"] != "ok":
        result["log_tail"] = _tail(log_path)
    result["wall_s"] = wall
    result["log"] = str(log_path)
    return result


def summarize(checks: dict[str, dict]) -> str:
    states = {c["status"] for c in checks.values()}
    return "failed" if "failed" in states else ("incomplete" if "skipped" in states else "ok")


def orchestrate(args: argparse.Namespace) -> int:
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    deadline = t0 + args.time_limit

    def log(msg: str) -> None:
        print(f"gpu_check: {msg}", file=sys.stderr, flush=True)

    selected = [c for c in CHECKS if args.checks is None or c in args.checks]
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="lorakit-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = dtype_plan(args.device)
    summary: dict[str, Any] = {
        "schema": SCHEMA, "status": "failed", "device_requested": args.device, "started_utc": started.isoformat(),
        "time_limit_s": args.time_limit, "host": _host(), "dtype_plan": plan, "workdir": str(workdir),
        "kernel_backend": args.kernel_backend,
        "checks": {c: {"status": "skipped", "reason": "not run"} for c in selected},
    }
    out_paths = _out_paths(args)
    try:
        summary["wheels"] = _install_wheels(workdir, log)
        site = summary["wheels"].get("target") if summary["wheels"].get("rc") == 0 else None
        for i, name in enumerate(selected, 1):
            cap, needs = CHECKS[name]
            missing = [alts for alts in needs if not any(summary["checks"].get(a, {}).get("status") == "ok" or
                                                         (a not in selected and args.checks is not None) for a in alts)]
            if missing:
                reason = f"needs {' or '.join(missing[0])}, which did not pass"
                summary["checks"][name] = {"status": "skipped", "reason": reason}
                log(f"[{i}/{len(selected)}] {name}: skipped ({reason})")
                continue
            left = deadline - time.monotonic() - CLEANUP_S
            if left < 15:
                summary["checks"][name] = {"status": "skipped", "reason": f"time limit of {args.time_limit} s reached"}
                log(f"[{i}/{len(selected)}] {name}: skipped (time limit)")
                continue
            timeout = min(cap, left)
            log(f"[{i}/{len(selected)}] {name} (at most {timeout:.0f} s) ...")
            env = _child_env(workdir, args.device, name, site, args.kernel_backend)
            result = run_check(name, workdir, args.device, plan, timeout, env, log)
            summary["checks"][name] = result
            log(f"[{i}/{len(selected)}] {name}: {result['status']} in {result['wall_s']:.1f} s"
                + (f" - {result.get('reason', '')[:300]}" if result["status"] != "ok" else ""))
        summary["status"] = summarize(summary["checks"])
    except BaseException as exc:  # noqa: BLE001 - the summary is printed whatever happens
        for proc in list(_RUNNING):
            _stop_group(proc)
        summary["status"] = "failed"
        summary["error"] = f"interrupted: {type(exc).__name__}: {exc}"
    finally:
        environment = summary["checks"].get("environment", {})
        summary["device"] = {k: environment.get(k) for k in ("device_name", "torch", "torch_cuda", "cuda_available",
                                                     "capability", "memory_gib", "bf16_supported")}
        summary["host"]["load_avg_end"] = list(os.getloadavg())
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        summary["counts"] = {s: sum(c["status"] == s for c in summary["checks"].values())
                             for s in ("ok", "failed", "skipped")}
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        text = json.dumps(summary, indent=2, default=str)
        for path in out_paths:
            _write_json(path, summary)
            log(f"summary written to {path}")
        log(f"{summary['status']}: {summary['counts']} in {summary['wall_s']} s")
        print(text, flush=True)
    return 0 if summary["status"] == "ok" else 1


def _out_paths(args: argparse.Namespace) -> list[Path]:
    """Every place the summary goes besides stdout: --out, the results file when asked, and $OUT when set (the
    folder a device machine of this workplace sends back)."""
    paths = [Path(args.out)] if args.out else []
    if args.write_results:
        paths.append(RESULTS_FILE)
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / "gpu_check.json")
    return list(dict.fromkeys(p.resolve() for p in paths))


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description="Run lorakit's device checks (NF4 training, GPTQ, AWQ, kernel vs dequantized perplexity, the "
                    "release flow routed to a cuda pool worker) on tiny models and print one JSON summary on stdout "
                    "(progress on stderr). Exit 0 when every check passed, 1 otherwise, 2 on bad arguments.",
        epilog="See docs/gpu_check.md.")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (what CI runs)")
    ap.add_argument("--out", help="also write the summary here ($OUT/gpu_check.json too, when $OUT is set)")
    ap.add_argument("--write-results", action="store_true",
                    help=f"write the summary to {RESULTS_FILE.relative_to(REPO)} (a GPU run only)")
    ap.add_argument("--time-limit", type=float, default=540, help="seconds for the whole run (default 540 = 9 min)")
    from lorakit.runtime import KERNEL_BACKENDS

    ap.add_argument("--kernel-backend", default="torch", choices=list(KERNEL_BACKENDS),
                    help="GPTQModel kernels the kernel path loads ($LORAKIT_KERNEL_BACKEND; default torch: no C++ "
                    "build; auto: GPTQModel's pick, on CUDA Marlin, built on first use for minutes)")
    ap.add_argument("--checks", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                    help=f"comma-separated subset of: {', '.join(CHECKS)} (a check whose input check is left out "
                    "assumes it ran earlier in the same --workdir)")
    ap.add_argument("--workdir", help="keep models and logs here (default: a temporary folder, removed afterwards)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temporary folder (its path is in the JSON)")
    ap.add_argument("--child", choices=list(CHECKS), help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if args.write_results and args.device == "cpu":
        ap.error(f"{RESULTS_FILE.relative_to(REPO)} records a GPU run; a --device cpu run may use --out instead")
    if args.checks is not None:
        unknown = [c for c in args.checks if c not in CHECKS]
        if unknown:
            ap.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.time_limit <= 0:
        ap.error("--time-limit must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return run_child(args.child, Path(args.workdir), args.device, json.loads(args.plan), Path(args.result))
    signal.signal(signal.SIGTERM, _interrupt)
    return orchestrate(args)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
