"""The registry's write lock: many writers at once, or one garbage collector alone.

Registration writes blobs first and commits the index row last. Between the two, its new blobs are referenced
by nothing, so a concurrent ``gc`` would delete them. Writers therefore hold a *shared* ``flock`` on
``<root>/write.lock`` from their first blob to their commit, and ``gc`` needs the *exclusive* lock. The kernel
drops a ``flock`` when its process dies, so a killed writer never blocks ``gc`` forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from registry.errors import RegistryBusyError

LOCK_FILE = "write.lock"


@contextlib.contextmanager
def write_lock(root: Path, *, exclusive: bool, wait_s: float | None = None) -> Iterator[None]:
    """Hold the shared (writers) or exclusive (gc) lock; ``wait_s=None`` waits as long as it takes."""
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if wait_s is None:
            fcntl.flock(fd, mode)
        else:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RegistryBusyError(
                            f"another process is writing to the registry at {root} (it holds {root / LOCK_FILE}); "
                            "run this again when it has finished"
                        ) from None
                    time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
