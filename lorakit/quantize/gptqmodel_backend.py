"""GPTQ through GPTQModel: the only module of lorakit that imports ``gptqmodel``.

GPTQModel is the maintained successor of AutoGPTQ and runs GPTQ on CPU. Its CPU quirks are handled here, not in
the user's shell:

* its default worker count crashes on small machines ("Virtual pool 'model_loader:cpu' requests 2 workers but
  parent 'cpu' only has 1"); ``GPTQMODEL_CPU_WORKERS`` is set (if unset) before the first import;
* its first ``quantize()`` JIT-builds a C++ packing op (minutes, needs g++/ninja) cached under
  ``~/.cache/gptqmodel/torch_extensions`` (``$GPTQMODEL_TORCH_EXTENSIONS_DIR``); lorakit says so when the cache
  is empty, so a silent pause of minutes is not mistaken for a hang;
* it rewrites ``generation_config.json`` (turning ``do_sample`` on); lorakit restores the source's file;
* it writes per-run log files into ``./logs`` of whatever the current directory is; lorakit points them to
  ``$LORAKIT_HOME/logs/gptqmodel`` instead, so a run never litters the user's working tree;
* it prints banners, tables and progress bars on stdout; lorakit routes them to stderr, so stdout stays for
  results (``lorakit quantize --quiet`` prints only the output path).
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _configure_environment() -> None:
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, cores))


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to file descriptor 1 (Python or C level) to descriptor 2 for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def ops_cache_dir() -> Path:
    root = os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "gptqmodel" / "torch_extensions"


def log_dir() -> Path:
    from lorakit.home import lorakit_home

    return lorakit_home() / "logs" / "gptqmodel"


def _import_gptqmodel():
    _configure_environment()
    import gptqmodel  # noqa: F401  (heavy: seconds, prints a banner)

    try:  # a private, relative Path("logs") in 7.6.0; nothing to redirect if a later version moved it
        from gptqmodel.looper import loop_processor

        if isinstance(getattr(loop_processor, "_PROJECT_LOG_DIR", None), Path):
            loop_processor._PROJECT_LOG_DIR = log_dir()
    except ImportError:  # pragma: no cover - layout of another gptqmodel version
        pass
    return gptqmodel


def backend_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("gptqmodel", "torch", "transformers", "optimum"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def gptq_quantize(model_dir: Path, out_dir: Path, blocks: torch.Tensor, *, bits: int, group_size: int, sym: bool,
                  desc_act: bool, device: str, progress: bool, dynamic: dict | None = None) -> dict[str, Any]:
    """Quantize ``model_dir`` with GPTQ into ``out_dir``; returns the backend's settings and per-module losses."""
    if not (ops_cache_dir() / "pack_block_cpu").exists() and progress:
        print(f"note: GPTQModel builds a C++ packing op on its first run (~2 min), cached in {ops_cache_dir()}",
              file=sys.stderr)
    with _stdout_to_stderr():
        _import_gptqmodel()
        from gptqmodel import GPTQModel, QuantizeConfig

        qcfg = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, dynamic=dynamic)
        started = time.perf_counter()
        model = GPTQModel.load(str(model_dir), qcfg, device=device)
        calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.shape[0]} for row in blocks]
        model.quantize(calib, batch_size=1)
        quantize_s = time.perf_counter() - started
        model.save(str(out_dir))
    dtype = str(getattr(model.model, "dtype", "unknown")).replace("torch.", "")
    losses = _read_quant_log(out_dir / "quant_log.csv")
    return {
        "quantize_s": round(quantize_s, 3),
        "compute_dtype": dtype,
        "damp_percent": getattr(qcfg, "damp_percent", None),
        "true_sequential": getattr(qcfg, "true_sequential", None),
        "module_loss": losses,
    }


def _read_quant_log(path: Path) -> dict[str, float]:
    """GPTQModel's per-module reconstruction losses (quant_log.csv), moved into lorakit_quant.json."""
    if not path.exists():
        return {}
    losses = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                losses[f"model.layers.{row['layer']}.{row['module']}"] = float(row["loss"])
            except (KeyError, ValueError):
                continue
    path.unlink()
    return losses
