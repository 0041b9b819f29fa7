"""Train one adapter in a child process of its own, so that several can train at once on one machine.

Why a process and not a thread: training seeds torch's *global* generator (LoRA init, dropout stream,
:mod:`lorakit.train.loop`), and torch's thread count is process-wide. Two trainings in two threads of one process
would draw from one random stream in an order set by the scheduler (a run would not reproduce) and share one
thread pool. A spawned child has its own generator, its own thread count and its own memory, which it gives
back when the adapter is written.

The child reports through the same :mod:`lorakit.progress` lines as an in-process run: each line travels back
over a queue and the parent emits it (to its console and its current sink, e.g. the Prefect task's logs) with
``label`` in front, so two trainings' lines stay told apart. The parent re-raises the child's error (a
:class:`~lorakit.errors.LorakitError` keeps its class, message and exit code) and names a child that died
without one (killed for memory, say). A child whose parent dies (SIGKILL, a scheduler's SIGTERM: no cleanup runs
there) stops at once instead of training on for minutes with nobody to take its adapter (:func:`_exit_with_parent`).
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import sys
import threading
from pathlib import Path
from typing import Any

from lorakit import progress
from lorakit.errors import LorakitError
from lorakit.train.loop import TrainResult, train_adapter

_POLL_S = 1.0


def train_in_child(prep_dir: str | os.PathLike[str], output: str | os.PathLike[str], *, threads: int,
                   label: str = "", **kwargs: Any):
    """``lorakit.train.train_adapter(prep_dir, output, **kwargs)`` in a spawned process with ``threads`` torch threads.

    Returns the :class:`~lorakit.train.loop.TrainResult` (its per-step ``log`` stays in the adapter folder's
    ``lorakit_train.json``, not sent back). ``kwargs`` must be picklable (they are the stage's plain options).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold torch and Prefect threads
    messages = ctx.Queue()
    child = ctx.Process(target=_child_main, args=(messages, str(prep_dir), str(output), threads, kwargs),
                        name=f"lorakit-train-{Path(output).name}", daemon=True)
    prefix = f"{label}: " if label else ""
    child.start()
    outcome: tuple[str, Any] | None = None
    try:
        while outcome is None:
            try:
                kind, payload = messages.get(timeout=_POLL_S)
            except queue_module.Empty:
                if not child.is_alive():
                    break
                continue
            if kind == "line":
                progress.emit(prefix + payload)
            else:
                outcome = (kind, payload)
        child.join()
    finally:
        if child.is_alive():  # the parent was interrupted or failed: never leave a training behind
            child.terminate()
            child.join()
    if outcome is None:
        raise LorakitError(death_message(output, child.exitcode), exit_code=1)
    kind, payload = outcome
    if kind == "error":
        raise payload
    return TrainResult(output=Path(payload["output"]), metadata=payload["metadata"],
                       final_loss=payload["final_loss"], steps=payload["steps"])


def death_message(output: str | os.PathLike[str], exitcode: int | None) -> str:
    """Why a training child ended without a result, and what to do: the advice follows the exit code. A SIGKILL
    (-9, or 137 from a shell) is most often the kernel's out-of-memory killer, so fewer trainings at once is the fix;
    any other early exit (a crash, an import failure before the child could report) is shown in full by training
    in the flow's own process."""
    head = f"training of {output} died in its process (exit code {exitcode}"
    if exitcode in (-9, 137):
        return (f"{head}: killed, perhaps for memory); nothing was written in its place. Train fewer adapters at "
                "once (train_concurrency: 1), or free memory")
    return (f"{head}) before it could report why; nothing was written in its place. Its own output above may say "
            "more; train_concurrency: 1 trains in this process, where the error is shown in full")


def _child_main(messages, prep_dir: str, output: str, threads: int, kwargs: dict[str, Any]) -> None:
    """The child: its own thread count, lines to the queue (not the inherited console), the result or the error."""
    _exit_with_parent()
    os.environ["LORAKIT_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from lorakit.runtime import quiet_third_party_logs

    quiet_third_party_logs()
    progress.configure(console=False, restart_clock=True)
    try:
        with progress.reporting(lambda line: messages.put(("line", line))), progress.activity("training"):
            result = train_adapter(prep_dir, output, **kwargs)
        messages.put(("result", {"output": str(result.output), "metadata": result.metadata,
                                 "final_loss": result.final_loss, "steps": result.steps}))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent, which re-raises it
        messages.put(("error", _portable(exc)))
    finally:
        messages.close()
        messages.join_thread()  # everything put is flushed before the process exits


def _exit_with_parent() -> None:
    """End this child the moment its parent process ends, however it ended.

    A parent stopped by a signal it does not handle (SIGKILL, the OOM killer, a scheduler's SIGTERM) runs none of
    the ``finally`` blocks that terminate children, so a daemonic child would otherwise train on, holding two cores
    and gigabytes, and write an adapter nobody registers. The parent's sentinel (the end of the pipe it spawned
    this child through) becomes readable when the parent is gone; a daemon thread waits on it, costing nothing
    meanwhile. Nothing is half-written: outputs are written by temp + rename (``lorakit.io.atomic``).
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        print(f"lorakit: the parent process {parent.pid} ended; this training stops with it", file=sys.stderr,
              flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="lorakit-parent-watch", daemon=True).start()


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (LorakitError and its subclasses do), else its text."""
    import pickle

    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception type that cannot travel becomes a plain one with its text
        return RuntimeError(f"{type(exc).__name__}: {exc}")
