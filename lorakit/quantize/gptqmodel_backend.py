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
  results (``lorakit quantize --quiet`` prints only the output path), and without ``-v`` keeps its INFO logs and
  live bars off (lorakit.runtime.quiet_third_party_logs) and prints per-layer progress lines of its own.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.quantize.options import GPTQ_CLIP_NORM


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
    from lorakit.runtime import is_verbose

    if not is_verbose():
        # Its live bars redraw on stdout through LogBar; in a log file they pile up as hundreds of lines per layer.
        # 7.6.0 checks this private hook at every bar it opens (it turns them off under pytest); lorakit reports
        # per-layer progress itself (_layer_progress).
        try:
            from gptqmodel.utils import logger as gptq_logger

            if callable(getattr(gptq_logger, "_suppress_live_renderables", None)):
                gptq_logger._suppress_live_renderables = lambda: True
        except ImportError:  # pragma: no cover - layout of another gptqmodel version
            pass
    return gptqmodel


@contextlib.contextmanager
def _layer_progress(model, enabled: bool):
    """Per-layer progress from lorakit's side: GPTQModel quantizes decoder layers in order and runs each one's
    forward first when it reaches it, so the first forward of layer i means layers 0..i-1 are done."""
    from lorakit.progress import bar

    layers = None
    for path in ("model.model.layers", "model.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        layers = obj
        break
    if layers is None or not enabled:
        yield
        return
    counter = bar(total=len(layers), desc="GPTQ: quantizing layers", unit="layer")
    seen: set[int] = set()

    def hook_for(i: int):
        def pre_hook(module, args):
            if i not in seen:
                seen.add(i)
                if i > 0 and counter.n < i:
                    counter.update(i - counter.n)
        return pre_hook

    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
        if counter.n < len(layers):
            counter.update(len(layers) - counter.n)
    finally:
        for h in handles:
            h.remove()
        counter.close()


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
                  desc_act: bool, device: str, progress: bool, dynamic: dict | None = None,
                  dtype: torch.dtype = torch.float32, gptaq_alpha: float = 0.0,
                  clip_search: bool = False) -> dict[str, Any]:
    """Quantize ``model_dir`` with GPTQ into ``out_dir``; returns the backend's settings and per-module losses.

    ``dtype`` is the dtype GPTQModel loads and runs the model in (lorakit.compute's resolved dtype). Without it,
    GPTQModel 7.6 picks bfloat16 on every CPU (``gptqmodel.utils.model.auto_dtype``: "CPU + Torch Fused"), which
    is many times slower than float32 on CPUs without bfloat16 units. Hessians are accumulated in float32 either
    way. ``gptaq_alpha`` > 0 turns on GPTQModel's GPTAQ (asymmetric calibration: each module's rounding also
    corrects the error the quantized modules before it left in its inputs, against the float model's inputs); it
    changes the rounding only, not the checkpoint layout. ``clip_search`` turns on GPTQModel's per-group clipping
    search (``mse``, scored by the norm :data:`~lorakit.quantize.options.GPTQ_CLIP_NORM`).
    """
    from lorakit.progress import activity, emit

    if not (ops_cache_dir() / "pack_block_cpu").exists() and progress:
        emit(f"note: GPTQModel builds a C++ packing op on its first run (~2 min), cached in {ops_cache_dir()}")
    with _stdout_to_stderr(), activity("GPTQ (GPTQModel)"):
        _import_gptqmodel()
        from gptqmodel import GPTQModel, QuantizeConfig

        gptaq = {"alpha": float(gptaq_alpha), "device": device} if gptaq_alpha else None
        qcfg = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, dynamic=dynamic,
                              gptaq=gptaq, mse=GPTQ_CLIP_NORM if clip_search else 0.0)
        started = time.perf_counter()
        model = GPTQModel.load(str(model_dir), qcfg, device=device, dtype=dtype)
        calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.shape[0]} for row in blocks]
        with _layer_progress(model, progress):
            logs = model.quantize(calib, batch_size=CALIB_BATCH_SIZE)
        quantize_s = time.perf_counter() - started
        from lorakit.runtime import is_verbose

        ran_in = str(getattr(model.model, "dtype", "unknown")).replace("torch.", "")
        _store_unquantized_in(model.model, STORAGE_DTYPE)
        # save() prints the folder listing and whole config files with print(); lorakit_quant.json says it all
        with contextlib.nullcontext() if is_verbose() else contextlib.redirect_stdout(io.StringIO()):
            model.save(str(out_dir))
    losses = module_losses(logs)
    (out_dir / "quant_log.csv").unlink(missing_ok=True)  # the same losses; lorakit_quant.json keeps them
    return {
        "quantize_s": round(quantize_s, 3),
        "compute_dtype": ran_in,
        "unquantized_storage_dtype": str(STORAGE_DTYPE).replace("torch.", ""),
        "damp_percent": getattr(qcfg, "damp_percent", None),
        "true_sequential": getattr(qcfg, "true_sequential", None),
        "gptaq_alpha": float(gptaq_alpha),
        "clip_norm": float(qcfg.mse),
        "calib_batch_size": CALIB_BATCH_SIZE,
        "module_loss": losses,
    }


# Calibration blocks per forward call while GPTQModel replays each layer over the calibration set. The Hessians sum
# the same tokens whatever the batch (all blocks have one length: no padding). On the default release's merged
# model 4 per call took 414 s (bench/results/gptq_batch.json: by_batch.4.quantize_s) against 479 s at 1
# (bench/results/gptq_batch.json: by_batch.1.quantize_s) with the gate's checks in the same bounds (docs/quantize.md).
CALIB_BATCH_SIZE = 4


# The dtype of the tensors GPTQ leaves unquantized (embeddings, norms, an untied head) in the checkpoint. GPTQModel
# saves them in the dtype it ran in; before the compute dtype was chosen per machine that was always bfloat16, and
# it stays so: a float32 run (CPUs without fast bf16) must not double the embedding's size on disk.
STORAGE_DTYPE = torch.bfloat16


def _store_unquantized_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters of every module GPTQ did not quantize to ``dtype`` (scales and packed
    weights of quantized layers are buffers in the GPTQ layout's own dtypes and stay as they are)."""
    # After quantize() GPTQModel holds unquantized weights on the meta device and streams them from the source
    # files at save time, cast to each parameter's dtype; so the Parameter objects are replaced (set_data cannot
    # change a meta tensor's dtype), one replacement per shared Parameter so that tied weights stay tied.
    replaced: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if hasattr(module, "qweight"):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                if id(param) not in replaced:
                    replaced[id(param)] = torch.nn.Parameter(param.data.to(dtype), requires_grad=param.requires_grad)
                module._parameters[name] = replaced[id(param)]
    for cfg in (getattr(model, "config", None),):
        if cfg is not None:
            cfg.dtype = dtype  # transformers 5 reads `dtype` (and writes it to config.json)


def module_losses(logs: Any) -> dict[str, float]:
    """GPTQModel's per-module reconstruction losses, {"model.layers.3.mlp.down_proj": loss}, from what
    ``quantize()`` returns: {processor name: [one row per module]}.

    Why not its ``quant_log.csv``: GPTQModel 7.6 writes that file only for processors named "gptq", "gptq v2" or
    "awq", and names its processor "gptaq" when GPTAQ is on, which the release's default is; the file was never
    written and the record's losses were empty. The returned rows are there whatever the processor is called.
    Rows without a numeric loss (another processor's) are skipped."""
    losses: dict[str, float] = {}
    for rows in (logs.values() if isinstance(logs, dict) else ()):
        for row in rows or ():
            try:
                losses[f"model.layers.{int(row['layer'])}.{row['module']}"] = float(row["loss"])
            except (KeyError, TypeError, ValueError):
                continue
    return losses
