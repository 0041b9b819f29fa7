"""Progress lines of the release stages: on the console (lorakit.progress) and in the Prefect run's logs.

The lorakit library reports through plain callbacks (:func:`lorakit.progress.reporting`); this module supplies
the callback that writes into Prefect: a logger whose records go only to the Prefect API (the console already got
lorakit's own ``[mm:ss]`` line, and Prefect's console handler would print it twice). The run ids are captured when
the sink is made, so lines from lorakit's heartbeat thread land in the right run too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from lorakit import progress

LOGGER_NAME = "lorakit.progress"


def _api_logger() -> logging.Logger:
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.propagate = False  # not to Prefect's console handler: lorakit prints its own line
        logger.setLevel(logging.INFO)
    return logger


def prefect_sink() -> progress.Sink | None:
    """A lorakit progress sink that logs each line to the current task run (else flow run); None outside a run."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_ctx, flow_ctx = TaskRunContext.get(), FlowRunContext.get()
    if task_ctx is not None:
        ids = {"flow_run_id": task_ctx.task_run.flow_run_id, "task_run_id": task_ctx.task_run.id}
    elif flow_ctx is not None and flow_ctx.flow_run is not None:
        ids = {"flow_run_id": flow_ctx.flow_run.id}
    else:
        return None
    logger = _api_logger()
    return lambda message: logger.info(message, extra=ids)


def reported(fn: Callable) -> Callable:
    """Inside a task: every lorakit progress line of the call also goes to this task run's Prefect logs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with progress.reporting(prefect_sink()):
            return fn(*args, **kwargs)

    return wrapper


def say(message: str) -> None:
    """One progress line from the flow itself: on the console and in the current Prefect run's logs."""
    progress.emit(message, sink=prefect_sink())


@contextlib.contextmanager
def stage_lines(label: str) -> Iterator[dict[str, str]]:
    """``<label>: started`` and ``<label>: done in 3m12s`` (or ``failed after``) around a stage.

    The caller may put ``outcome`` (e.g. ``cached``) and ``detail`` (e.g. the loss) into the yielded dict.
    """
    sink = prefect_sink()
    progress.emit(f"{label}: started", sink=sink)
    started = time.monotonic()
    info: dict[str, str] = {}
    try:
        with progress.activity(label), progress.reporting(sink):
            yield info
    except BaseException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        progress.emit(f"{label}: failed after {progress.format_duration(time.monotonic() - started)}: {reason}",
                      sink=sink)
        raise
    took = progress.format_duration(time.monotonic() - started)
    outcome = info.get("outcome") or f"done in {took}"
    detail = f" ({info['detail']})" if info.get("detail") else ""
    progress.emit(f"{label}: {outcome}{detail}", sink=sink)
