"""The compute dtype of every stage: one resolver, one policy table, one probe of whether bfloat16 is fast here.

Why a probe and not a feature list: bfloat16 is a speed-up only where the hardware and the kernels torch picks
both have it. On a CPU with AVX512-BF16, bfloat16 made lorakit's AWQ of SmolLM2 1.8x faster (145 s -> 80 s,
bench/results/quantize.json ``awq_development_runs``); with torch held to AVX2 kernels, GPTQModel's GPTQ of SmolLM2
took 1018 s in bfloat16 against 254 s in float32 (bench/results/gptq_dtype.json). The cpuinfo flags are
not enough: ``ATEN_CPU_CAPABILITY=avx2`` / ``ONEDNN_MAX_CPU_ISA=AVX2`` switch the fast kernels off on a CPU that
has the units. So a CPU counts as fast only when the flags are there *and* a short timing of a bfloat16 against a
float32 matmul says so. The answer is cached per machine under ``$LORAKIT_HOME/compute/`` (keyed by CPU model,
flags, torch version, thread count and those two variables), so each process pays for the probe at most once per
machine and setting.

``--compute-dtype auto`` then means what :data:`POLICY` says for the stage:

=========  ============  ==================================================================================
stage      auto          why
=========  ============  ==================================================================================
train      fastest       bfloat16 where it is fast, else float32. QLoRA computes in 16 bits by design; the
                         LoRA weights and optimizer state stay float32 either way.
quantize   fastest       AWQ's calibration forwards and search matmuls, GPTQModel's whole model. Statistics,
                         scales and rounding stay float32 in lorakit's AWQ.
eval       float32       a perplexity must be comparable across machines and runs; bfloat16 moves it by more
                         than the differences a gate decides on. Asked-for dtypes are honoured and recorded.
gate       float32       as eval: a verdict must not depend on the CPU it ran on.
merge      float32       the merge contract is exact (W + Σ wᵢ·ΔWᵢ in float32, then cast to the base's dtype):
                         a reduced-precision request is refused, not silently rounded.
=========  ============  ==================================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used: `lorakit --help` must stay fast
    import torch

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

# stage -> what ``auto`` means ("fastest" or a fixed dtype name); reasons in the module docstring.
POLICY = {"train": "fastest", "quantize": "fastest", "eval": "float32", "gate": "float32", "merge": "float32"}
# Stages whose math is exact by contract: any other dtype is an input error.
EXACT_STAGES = frozenset({"merge"})

# CPU flags without which bfloat16 matmuls have no hardware path (the probe is skipped and the answer is slow).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Flags reported with every probe (and printed by CI) because they decide which kernels torch can use.
REPORTED_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")
# bfloat16 counts as fast when its matmul takes at most this fraction of float32's. Below 1 on purpose: a tie
# buys nothing and costs precision. The gap between CPUs with and without bf16 units is wide (see the docstring).
FAST_RATIO = 0.8
PROBE_VERSION = 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cpu_info() -> dict[str, object]:
    """CPU model and the bf16-related flags of this machine (Linux /proc/cpuinfo; elsewhere what platform says)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if key == "" and flags:
                    break  # the first processor's block is enough
    except OSError:  # pragma: no cover - not Linux
        pass
    return {"model": model, "flags": sorted(f for f in REPORTED_CPU_FLAGS if f in flags)}


def _probe_key(info: dict[str, object]) -> dict[str, object]:
    import torch

    return {"probe_version": PROBE_VERSION, "cpu_model": info["model"], "cpu_flags": info["flags"],
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", ""),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


def probe_cache_path(key: dict[str, object]) -> Path:
    from lorakit.home import lorakit_home

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return lorakit_home() / "compute" / f"cpu-bf16-{digest}.json"


def matmul_seconds(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 5) -> list[float]:
    """Seconds of each of ``repeats`` ``(m x k) @ (k x n)`` matmuls in ``dtype``, after one warm-up (kernel
    selection, oneDNN primitive creation): the one timing loop of the bf16 probe and of the benchmarks that compare
    against this CPU's matmul speed."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return times


def _time_matmul(dtype: torch.dtype, repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds of one 256x576 @ 576x1536 matmul (a SmolLM2 MLP projection of 256 tokens)."""
    return min(matmul_seconds(dtype, 256, 576, 1536, repeats))


def measure_cpu_bf16() -> dict[str, object]:
    """Run the probe (no cache): the timings, the ratio and the verdict, with what they were measured on."""
    import torch

    info = cpu_info()
    record: dict[str, object] = {**_probe_key(info), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not any(f in info["flags"] for f in BF16_CPU_FLAGS):
        return {**record, "fast": False, "reason": f"no {' / '.join(BF16_CPU_FLAGS)} in the CPU flags"}
    fp32, bf16 = _time_matmul(torch.float32), _time_matmul(torch.bfloat16)
    ratio = bf16 / fp32 if fp32 > 0 else float("inf")
    return {**record, "fast": ratio <= FAST_RATIO, "fp32_s": fp32, "bf16_s": bf16, "bf16_over_fp32": ratio,
            "reason": f"bfloat16 matmul took {ratio:.2f}x the float32 time (fast means <= {FAST_RATIO})"}


def cpu_bf16_probe(*, refresh: bool = False) -> dict[str, object]:
    """The cached probe for this machine and setting (measured and stored atomically on first use)."""
    from lorakit.io.atomic import write_json

    info = cpu_info()
    key = _probe_key(info)
    path = probe_cache_path(key)
    if not refresh and path.exists():
        try:
            cached = json.loads(path.read_text())
            if all(cached.get(k) == v for k, v in key.items()):
                return {**cached, "cached": True}
        except (OSError, ValueError):
            pass  # a corrupt cache entry is measured again and replaced
    record = measure_cpu_bf16()
    try:
        write_json(path, record)
    except OSError:  # a read-only home still gets the right answer, just without the cache
        pass
    return {**record, "cached": False}


def bf16_is_fast(device: str | torch.device) -> bool:
    """Whether bfloat16 compute is faster than float32 on ``device`` (CUDA: the GPU supports it; CPU: the probe)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(cpu_bf16_probe()["fast"])


def resolve_compute_dtype(requested: str | None, stage: str, device: str | torch.device = "cpu") -> torch.dtype:
    """``--compute-dtype`` for ``stage`` on ``device``: ``auto`` follows :data:`POLICY`; a named dtype is used as
    asked, except where the stage is exact (merge: float32 only) or the device cannot run it (CUDA without CUDA)."""
    import torch

    if stage not in POLICY:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(POLICY)}")
    requested = (requested or "auto").lower()
    if requested not in DTYPE_CHOICES:
        raise InputError(f"--compute-dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"compute on {device} was requested but no CUDA device is available; use --device cpu or auto")
    if stage in EXACT_STAGES and requested not in ("auto", "float32"):
        raise InputError(f"--compute-dtype {requested} for {stage}: the {stage} is exact and computes in float32 "
                         "(the result is cast to the base model's dtype when written); use auto or float32")
    if requested != "auto":
        return torch_dtype(requested)
    policy = POLICY[stage]
    if policy == "fastest":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return torch_dtype(policy)
