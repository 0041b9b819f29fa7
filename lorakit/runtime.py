"""Process-wide runtime settings that make CPU runs predictable on small shared machines."""

from __future__ import annotations

import os


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


# Third-party loggers that warn about optional extras this project never uses (torchao's CUDA-only kernels built
# for another torch, a deprecated pytree registration, bitsandbytes' optional "kernels" package). Their noise
# drowned lorakit's own messages; real errors from them still surface.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes")


def quiet_third_party_logs() -> None:
    import logging

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def resolve_device(device: str = "auto", *, cuda: str = "cuda") -> str:
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
