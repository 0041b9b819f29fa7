"""Run the same flow step for several items at once, inside one flow run.

Prefect's own answer (``task.submit``) runs tasks; a release's training is a subflow (which may be routed to the
CUDA pool). Plain threads run subflows too, provided each thread starts from a copy of the caller's context:
Prefect keeps the current flow run in context variables, so the tasks and subflows a thread calls are recorded
under this flow run, as if called in turn. The threads only orchestrate: heavy work runs in child processes
(``lorakit.train.train_in_child``) or on the pool. Keep library imports out of them: transformers' lazy module
is not thread-safe (two threads' first ``from transformers import AutoTokenizer`` failed one of them here).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_concurrently(step: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[step(item) for item in items]`` with up to ``workers`` at a time, results in the order of ``items``.

    Every item runs to its end even when another fails (a finished adapter is cached for the next run); then
    the first failure, in item order, is raised.
    """
    if workers <= 1 or len(items) <= 1:
        return [step(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorakit-chain") as pool:
        futures = [pool.submit(contextvars.copy_context().run, step, item) for item in items]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return [f.result() for f in futures]
