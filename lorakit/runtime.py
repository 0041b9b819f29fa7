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
