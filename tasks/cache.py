"""The cache policy every stage task shares: skip a step whose code, arguments and input files are unchanged.

Prefect's ``TASK_SOURCE + INPUTS`` keys a step on its code and its argument values. The arguments here are
mostly paths, and a path says nothing about what is in it: a data file edited in place or an upstream folder that
was rebuilt keeps its name. :class:`InputFileStamps` adds the stat of every file under every existing path
argument (name, size, mtime, inode), like ``make`` does, so such a change re-runs the step and, because the step
rewrites its own output folder, every step after it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects


def _paths(value: Any) -> list[str]:
    """Strings among the (nested) arguments that name an existing file or folder."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        return [text] if (os.sep in text and os.path.exists(text)) else []
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return []


def stamp(path: str) -> list[tuple[str, int, int, int]]:
    """(relative name, size, mtime_ns, inode) of the path and, for a folder, of everything under it."""
    out = []
    for root, dirs, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]:
        dirs.sort()
        for name in [".", *sorted(files)] if os.path.isdir(path) else files:
            full = os.path.join(root, name)
            st = os.stat(full)
            out.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns, st.st_ino))
    return out


@dataclass
class InputFileStamps(CachePolicy):
    """Cache key component: the stat of every file reachable from the task's path arguments.

    The task's own ``output`` is not an input: stamping it would change the key as soon as the first run wrote it.
    The registry ``root`` changes with every registration; only its identity counts (the folder's inode): a
    registry that was deleted and re-created is a different registry, so registrations run again.
    """

    exclude: tuple[str, ...] = ("output",)
    identity_only: tuple[str, ...] = ("root",)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        inputs = inputs or {}
        skip = (*self.exclude, *self.identity_only)
        stamps: dict[str, Any] = {p: stamp(p) for p in sorted(set(_paths({k: v for k, v in inputs.items() if k not in skip})))}
        for key in self.identity_only:
            for p in _paths(inputs.get(key)):
                st = os.stat(p)
                stamps[f"identity:{p}"] = (st.st_dev, st.st_ino)
        return hash_objects(stamps) if stamps else None


STAGE_CACHE = TASK_SOURCE + INPUTS + InputFileStamps()


def placement_blind_cache(*placement_args: str) -> CachePolicy:
    """:data:`STAGE_CACHE` blind to arguments that say *where* a step runs (its own process, how many threads),
    not what it computes: the same adapter trained in a child process is a hit for one trained in-process."""
    inputs = INPUTS
    for name in placement_args:
        inputs = inputs - name
    return TASK_SOURCE + inputs + InputFileStamps(exclude=("output", *placement_args))
