"""Shared benchmark plumbing: run a command in a fresh process and measure wall time and peak RSS, take
medians, write ``bench/results/<name>.json`` and this benchmark's section of ``bench/README.md``."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
README = BENCH / "README.md"


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> dict[str, float]:
    """Wall seconds and peak RSS (MiB) of one command, as GNU time reports them.

    GNU time forks the command from its own small process; measuring with wait4 from this (large) benchmark
    process would count the pages the child shares with us between fork and exec.
    """
    import tempfile

    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd], env=full_env, cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
        peak_kib = int(report.read().strip().splitlines()[-1])
    return {"wall_s": wall, "peak_rss_mib": peak_kib / 1024}


def stdlib_docstrings(modules: list[str]) -> list[str]:
    """Docstrings (> 200 characters) of the public functions and classes of standard-library ``modules``, in a
    fixed order: held-out English text present wherever Python is, for perplexity benchmarks."""
    out = []
    for name in modules:
        mod = importlib.import_module(name)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", "") != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                out.append(doc)
    return out


def find_one(root: Path, pattern: str, *, dirs: bool = False) -> Path:
    """The one path under a release run's output folder that matches ``pattern`` (a folder when ``dirs``); a bench
    that reads a finished run refuses an ambiguous or missing part rather than guess."""
    found = sorted(p for p in Path(root).glob(pattern) if p.is_dir() or not dirs)
    if len(found) != 1:
        raise SystemExit(f"{root}: expected one {pattern}, found {[str(f) for f in found]}")
    return found[0]


def release_parser(doc: str | None) -> argparse.ArgumentParser:
    """The opening of every bench that reads a finished ``lorakit run`` output folder: the module docstring's first
    line as its description, and ``--release``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--release", type=Path, required=True,
                    help="output folder of a default-release run (`lorakit run configs/default.yaml -o DIR`)")
    return ap


def release_quant_inputs(root: Path) -> tuple[Path, Path, list[Path]]:
    """What a quantization bench re-quantizes from a finished run: its merged model, its calibration data and each
    dataset's prep folder (in the default run config's order, which the accuracy tables follow)."""
    from flows.config import ReleaseConfig

    merged = find_one(root, "merged/model-*", dirs=True)
    calib = find_one(root, "prep/calibration-*", dirs=True)
    return merged, calib, [find_one(root, f"prep/{ds.name}-*", dirs=True) for ds in ReleaseConfig().datasets]


def bf16_bytes(model: Path) -> int:
    """What the model's tensors take in bf16 (the size the release's <= 50% goal is measured against)."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += 2 * n
    return total


def ensure_release_prep(plan, ds) -> str:
    """The prepared-data folder the release flow's plan gives dataset ``ds`` (a ``flows.plan.ReleasePlan`` and
    one of its config's datasets), made with the stage's own arguments when it is missing."""
    from lorakit.data.prep import prepare_dataset

    p = plan.prep(ds)
    if not Path(p["output"], "prep.json").exists():
        prepare_dataset(p["sources"], p["output"], force=True, progress=False, **p["params"])
    return p["output"]


def median(values: list[float]) -> float:
    return statistics.median(values)


# The CPU features that decide whether bfloat16 compute is fast (lorakit.compute) and which kernels torch runs.
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
# Environment that holds torch/oneDNN to narrower kernels (how a CPU without AVX512-BF16 is reproduced here).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "LORAKIT_THREADS")


def cpu() -> dict[str, object]:
    """CPU model, the flags that matter for lorakit's speed, and any kernel-limiting environment."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: the model from platform is all there is
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
            "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


def cpu_line(recorded: dict | None = None) -> str:
    """A CPU in one phrase for a README section: its model, the flags that matter for lorakit's speed and any
    kernel-limiting environment (``ATEN_CPU_CAPABILITY=avx2`` makes an AVX512 machine run as an AVX2 one).
    ``recorded``: a results file's ``machine.cpu``, so a section regenerated later describes the machine measured;
    default: this one."""
    c = recorded or cpu()
    line = f"{c['model']} ({', '.join(c['flags']) or 'no AVX flags read'})"
    held = {k: v for k, v in (c.get("kernel_env") or {}).items() if k != "LORAKIT_THREADS"}
    return line + (f" with {' '.join(f'{k}={v}' for k, v in held.items())}" if held else "")


def machine() -> dict[str, object]:
    load = os.getloadavg()
    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "cpu": cpu(), "loadavg_1m_at_end": round(load[0], 2),
            "note": "2-core shared machine; other work may have been running (see loadavg)"}


def write_results(name: str, data: dict) -> Path:
    path = BENCH / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **data}
    from lorakit.io.atomic import atomic_write_bytes

    # atomic: a bench killed mid-write (they run for hours) leaves the previous results, never half a file
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
    return path


def update_readme_section(name: str, markdown: str) -> None:
    """Replace (or append) the ``## name`` section between markers, leaving other benchmarks' sections alone."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = README.read_text() if README.exists() else "# Benchmarks\n\nEach section is written by its script in this folder; raw numbers are in `results/`.\n"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    from lorakit.io.atomic import atomic_write_bytes

    atomic_write_bytes(README, text.encode())


def python() -> str:
    return sys.executable
