"""Process-wide runtime settings, read from the environment: they describe the machine, not the run (threads that
make CPU runs predictable on small shared machines, which quantized kernels the evaluator loads)."""

from __future__ import annotations

import os
import sys


# $LORAKIT_KERNEL_BACKEND: which of GPTQModel's kernels the kernel path loads, per checkpoint kind. "auto" is
# GPTQModel's own pick: on CUDA, Marlin, which it compiles on first use; on a fresh H200 the check loading it was
# still compiling when stopped after 240 s (bench/results/gpu_check.json: checks.kernel_vs_dequant.check_s).
# "torch" and "triton" need no C++ build; on that H200 the torch kernels matched the exact dequantized path.
KERNEL_BACKENDS: dict[str, dict[str, str] | None] = {
    "auto": None,
    "torch": {"gptq": "torch", "awq": "torch_awq"},
    "triton": {"gptq": "triton", "awq": "gemm_triton"},
}


def kernel_backend(kind: str) -> str | None:
    """The GPTQModel backend ``$LORAKIT_KERNEL_BACKEND`` asks for a ``kind`` (gptq/awq) checkpoint; None = its own
    pick. A machine setting, not a run option: whether a C++ toolchain and minutes for a first-use build are there
    is a property of the machine, and the numbers do not depend on it (every kernel computes the same weights)."""
    from lorakit.errors import InputError

    name = os.environ.get("LORAKIT_KERNEL_BACKEND", "auto").strip().lower() or "auto"
    if name not in KERNEL_BACKENDS:
        raise InputError(f"LORAKIT_KERNEL_BACKEND must be one of {', '.join(KERNEL_BACKENDS)}, got {name!r}")
    choice = KERNEL_BACKENDS[name]
    return None if choice is None else choice[kind]


def compile_cache_per_capability() -> str | None:
    """Give torch.compile's on-disk cache a folder of its own per ``$ATEN_CPU_CAPABILITY``; returns the folder set.

    Why: the inductor cache does not key its kernels on the vector width that variable selects. On an AVX512 CPU,
    a process held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, how lorakit measures the path of a CPU without AVX512 or
    bf16 units) reused kernels generated for 16 int32 lanes and built them against 8-lane vectors: GPTQModel's
    compiled dequantization, which ``transformers`` runs when it loads a GPTQ/AWQ checkpoint, failed its own
    bounds check ("index out of bounds") or aborted the process. In a cache folder of its own the same load
    generated 8-lane code and ran. A CPU that has only AVX2 never meets this; a machine where the variable changes
    between runs does. Nothing is set when the variable is unset or ``$TORCHINDUCTOR_CACHE_DIR`` is already given.
    """
    import re
    import tempfile

    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if not capability or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    try:
        import getpass

        user = getpass.getuser()
    except (KeyError, ImportError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "user"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"torchinductor_{user}_{capability}")
    folder = os.path.join(tempfile.gettempdir(), name)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def configure_threads() -> int:
    """Pick the torch thread count once: ``$LORAKIT_THREADS`` if set, else the cores this process may use.

    On 2-core machines shared with other work, oversubscribing torch threads was measured to be several times
    slower than one thread; honouring the affinity mask (not the machine's core count) avoids that.
    """
    import torch

    env = os.environ.get("LORAKIT_THREADS")
    if env:
        n = max(1, int(env))
    else:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


# Peak resident memory of one QLoRA training at the release's defaults, per byte of the base's weight files, with
# a margin: trainings of SmolLM2-135M-Instruct (a 538,090,408-byte float32 safetensors file), each in its own
# process, peaked at 5,836 MiB over 6 steps (bench/results/train_concurrency.json:
# at_once.children.number-words.peak_rss_mib) and at 6,244 MiB over the release's 40 steps
# (bench/results/release_scorecard.json: release.adapter_training.reverse-words.peak_rss_mib). Budget: the higher
# peak plus 10%, since a peak moves with the run (7% between those two), about 12.7x the weights.
TRAIN_PEAK_MARGIN = 1.10
TRAIN_PEAK_PER_WEIGHT_BYTE = TRAIN_PEAK_MARGIN * 6243.8 * 2**20 / 538_090_408


def memory_size(n: int) -> str:
    """A memory amount for a message: GB (decimal) from 0.1 GB up, else MB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def available_memory_bytes() -> int:
    """The memory the OS reports available now (psutil): what new allocations can take without swapping. One
    function, so every fit-to-memory decision (training slots, RegMean's Gram matrices) reads the same number."""
    import psutil

    return int(psutil.virtual_memory().available)


def memory_shortfall(need: dict[str, int], available: int | None = None) -> tuple[int, int] | None:
    """(total needed, available) when the parts of ``need`` together exceed the memory available (``available``
    defaults to what the OS reports now), else None: the one comparison each refuse-before-the-work memory check
    (RegMean's Gram matrices, rounding, scale tuning) makes before it words its own error."""
    available = available_memory_bytes() if available is None else available
    total = sum(need.values())
    return (total, available) if total > available else None


def training_slots(requested: int | str, adapters: int, device: str = "auto", *,
                   base_weight_bytes: int | None = None, available_bytes: int | None = None
                   ) -> tuple[int, int | None]:
    """How many adapters train at once, and the torch threads each child process gets (None: one at a time, here).

    ``auto``: one at a time on CUDA (one device); on CPU as many as there are adapters and cores, the cores split
    evenly, and as many as the available memory holds: each training needs about
    :data:`TRAIN_PEAK_PER_WEIGHT_BYTE` x ``base_weight_bytes`` (``available_bytes`` defaults to what the OS reports
    available now). Two at one thread each on 2 cores trained 1.26x faster than one after another at two threads
    (bench/results/train_concurrency.json: speedup). An explicit number is used as given (at most one per adapter),
    with the cores split between them: the user has said what the machine holds.
    """
    import torch

    cores = max(1, torch.get_num_threads())  # what configure_threads allowed this process
    if requested == "auto":
        on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        slots = 1 if on_cuda else min(adapters, cores)
        if slots > 1 and base_weight_bytes:
            if available_bytes is None:
                available_bytes = available_memory_bytes()
            slots = min(slots, int(available_bytes // (TRAIN_PEAK_PER_WEIGHT_BYTE * base_weight_bytes)))
    else:
        slots = min(adapters, int(requested))
    slots = max(1, slots)
    return (slots, max(1, cores // slots)) if slots > 1 else (1, None)


# Third-party loggers that warn about optional extras this project never uses (torchao's CUDA-only kernels built
# for another torch, a deprecated pytree registration, bitsandbytes' optional "kernels" package). Their noise
# drowned lorakit's own messages; real errors from them still surface.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes")

_verbose = False
_quieted: dict[str, object] = {}  # what quiet_third_party_logs changed, so that -v can put it back


def set_verbose(verbose: bool) -> None:
    """``lorakit -v``: keep every third-party log line, banner and progress bar (for debugging a library).

    ``import lorakit`` already quieted them (for library users), so turning verbose on undoes that.
    """
    global _verbose
    _verbose = bool(verbose)
    if _verbose:
        _restore_third_party_logs()


def _restore_third_party_logs() -> None:
    import logging
    import warnings

    for name in _quieted.pop("loggers", ()):
        logging.getLogger(name).setLevel(logging.NOTSET)
    for key in _quieted.pop("env", ()):
        os.environ.pop(key, None)
    for entry in _quieted.pop("warnings", ()):
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    logbar = _quieted.pop("logbar", None)
    if logbar is not None:
        logbar.setLevel(logging.INFO)  # the level LogBar.shared() gives it
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()


def is_verbose() -> bool:
    return _verbose


def quiet_third_party_logs() -> None:
    """Keep third-party banners, INFO logs and foreign progress bars out of lorakit's output (unless ``-v``).

    GPTQModel 7.6 (imported by lorakit's GPTQ backend, and by PEFT whenever it wraps layers for training) logs its
    ASCII banner at INFO on its ``logbar`` logger at import time (``gptqmodel/__init__.py``:
    ``setup_logger().info(banner)``), then INFO lines for every load/quantize step, and a ``WARN Python GIL is
    enabled`` line from ``gptqmodel/utils/__init__.py`` unless ``GPTQMODEL_DISABLE_GIL_WARNING=1``. It has no
    log-level variable: ``LogBar.shared()`` creates the ``logbar`` logger at level INFO on first use and keeps an
    existing one as it is, so creating it here first at WARNING silences the INFO lines at their source. Its live
    progress bars (LogBar's, on stdout) are turned off like the other libraries' bars; lorakit reports per-layer
    progress itself. Hub/transformers bars ("Loading weights") go via ``HF_HUB_DISABLE_PROGRESS_BARS``.
    """
    import importlib.util
    import logging
    import warnings

    if _verbose:
        return
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _quieted["loggers"] = _NOISY_LOGGERS
    env = {"GPTQMODEL_DISABLE_GIL_WARNING": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for key in [k for k in env if k not in os.environ]:
        os.environ[key] = env[key]
        _quieted.setdefault("env", []).append(key)
    if not _quieted.get("warnings"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
        # PEFT saving an adapter of a base named by hub id, offline: it cannot fetch the base's config (harmless)
        warnings.filterwarnings("ignore", message=r"(Unable to fetch remote file|Could not find a config file)",
                                category=UserWarning, module=r"peft(\.|$)")
        _quieted["warnings"] = warnings.filters[:2]
    if importlib.util.find_spec("gptqmodel") is not None and importlib.util.find_spec("logbar") is not None:
        _quieted["logbar"] = _quiet_logbar()
    if "transformers" in sys.modules:  # the environment variable is read at import; tell it directly too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _quiet_logbar():
    import contextlib
    import io
    import logging

    with contextlib.redirect_stdout(io.StringIO()):  # creating the shared logger prints an empty line
        from logbar import LogBar

        shared = LogBar.shared()
    shared.setLevel(logging.WARNING)
    return shared


DEFAULT_DEVICE = "auto"  # every stage's --device / device: key (lorakit.cli.options.device_option)


def resolve_device(device: str = DEFAULT_DEVICE, *, cuda: str = "cuda") -> str:
    """``--device`` for every stage: auto picks CUDA when present (as ``cuda``), else CPU; a CUDA request on a
    machine without one is an input error rather than a crash deep inside a library."""
    import torch

    from lorakit.errors import InputError

    if device == "auto":
        return cuda if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} was requested but no CUDA device is available; use --device cpu or auto")
    return device
