"""Subprocess worker for the registry reliability tests: imports only ``registry`` and the standard library.

Kept out of torch on purpose so that 16 concurrent processes and 20 kill -9 trials stay fast on 2 cores.
Usage: python tests/registry_worker.py MODE ROOT ARGS...
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry import Registry  # noqa: E402
from registry.locks import write_lock  # noqa: E402


def register_loop(root: str, name: str, *folders: str) -> None:
    """Register each folder in turn (the parent kills this process at a random moment).

    A line after each registration lets the parent aim its kill at the first, second or third registration
    by progress, not by a clock calibrated once (another test's load can slow this process several times over).
    """
    reg = Registry(root)
    reg.conn  # open (and migrate) the index before announcing readiness
    print("ready", flush=True)
    for i, folder in enumerate(folders, start=1):
        reg.register(folder, name=name, kind="base")
        print(f"registered {i}", flush=True)
    print("done", flush=True)


def concurrent(root: str, start_flag: str, idx: str, common: str, *folders: str) -> None:
    """Wait for the start flag, then register + alias as fast as possible alongside 15 siblings."""
    reg = Registry(root)
    while not os.path.exists(start_flag):
        time.sleep(0.005)
    out = []
    for folder in folders:
        v = reg.register(folder, name="shared", kind="base", tags=[f"proc{idx}"])
        reg.set_alias(v.ref, "candidate")
        mine = reg.register(folder, name=f"proc{idx}", kind="base")
        out.append({"shared": v.ref, "digest": v.digest, "own": mine.ref})
    c = reg.register(common, name="common", kind="base")
    print(json.dumps({"results": out, "common": c.ref}), flush=True)


def hold_lock(root: str) -> None:
    """Hold the shared write lock (what a registering process holds) until stdin closes."""
    with write_lock(Path(root), exclusive=False):
        print("locked", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"register": register_loop, "concurrent": concurrent, "hold-lock": hold_lock}[mode](*args)
