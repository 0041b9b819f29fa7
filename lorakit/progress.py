"""Progress reporting for long work: timestamped lines, bars that fall back to lines, and a silence heartbeat.

Why: a new user's ``make demo`` printed nothing for 18 minutes while an adapter trained on a slow CPU. Every
long step now says what it does, in one of two forms chosen by where output goes:

* an interactive console (stderr is a TTY) gets tqdm bars;
* anything else (CI logs, ``make demo | tee``, Prefect logs) gets plain lines: the first update at once, then
  one at least every :func:`heartbeat_interval` seconds, and one at the end.

Lines are printed to stderr as ``[mm:ss] message`` (time since the process started reporting) and are also
handed to the *sink* of the current context (:func:`reporting`), a plain callback: the Prefect tasks in
``tasks/`` install one that writes each line into the run's Prefect logs. This module knows nothing of Prefect.

A watchdog thread closes the remaining gaps (a model load, a library's JIT build, a server start): while an
:func:`activity` is open and nothing was printed for ``0.6 x`` the interval, it prints
``<activity>: still working (<elapsed>)``. The interval is ``$LORAKIT_HEARTBEAT_S`` (default 15 s), so no
reporting command stays silent for longer than that on long work.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

Sink = Callable[[str], None]

HEARTBEAT_ENV = "LORAKIT_HEARTBEAT_S"
DEFAULT_HEARTBEAT_S = 15.0
_SILENCE_FRACTION = 0.6  # the watchdog speaks after this fraction of the interval without output

_PER_UNIT_ALWAYS = ("step", "layer")  # these read as "s/step" even when fast (tokens read better as tok/s)

_sink: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("lorakit_progress_sink", default=None)


class _Console:
    """Process-wide console state: where lines go, since when, and when the last one was printed."""

    def __init__(self) -> None:
        self.enabled = True
        self.started = time.monotonic()
        self.last_output = self.started
        self.lock = threading.RLock()
        self.activities: list[tuple[str, float, Sink | None]] = []
        self.watchdog: threading.Thread | None = None


_console = _Console()


def heartbeat_interval() -> float:
    """Longest silence allowed on long work, in seconds (``$LORAKIT_HEARTBEAT_S``, default 15)."""
    raw = os.environ.get(HEARTBEAT_ENV)
    if not raw:
        return DEFAULT_HEARTBEAT_S
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_HEARTBEAT_S
    return value if value > 0 else DEFAULT_HEARTBEAT_S


def configure(*, console: bool | None = None, restart_clock: bool = False) -> None:
    """``console=False`` keeps lines and bars off the terminal (``--quiet``); sinks still get every line."""
    with _console.lock:
        if console is not None:
            _console.enabled = console
        if restart_clock:
            _console.started = _console.last_output = time.monotonic()


def console_enabled() -> bool:
    return _console.enabled


def interactive() -> bool:
    """True when stderr is a terminal: bars redraw in place there; elsewhere they would pile up as junk."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """``42s``, ``3m12s``, ``1h02m`` (ETAs and elapsed times in lines)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _clock() -> str:
    s = int(time.monotonic() - _console.started)
    return f"[{s // 3600}:{(s % 3600) // 60:02d}:{s % 60:02d}]" if s >= 3600 else f"[{s // 60:02d}:{s % 60:02d}]"


def _print(message: str) -> None:
    line = f"{_clock()} {message}"
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)  # clears and redraws any open bar around the line
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(line, file=sys.stderr, flush=True)
    sys.stderr.flush()


def touch() -> None:
    """Record that something visible happened (a bar redraw), so the watchdog stays quiet."""
    _console.last_output = time.monotonic()


def emit(message: str, *, console: bool = True, sink: Sink | None = None) -> None:
    """One progress line: on the console (unless off) and to the current context's sink (or ``sink``).

    Only a line the user sees resets the heartbeat's silence clock: one on the console, or, in a process whose
    console is off (a training child relaying to its parent), one in the sink. A sink-only line beside a live
    console (a ``progress=False`` bar inside a Prefect run, which still logs to Prefect) must not: the merge
    search's many short evaluation bars kept the console silent for 60 s that way."""
    target = sink if sink is not None else _sink.get()
    with _console.lock:
        shown = console and _console.enabled
        if shown:
            _print(message)
        if shown or (not _console.enabled and target is not None):
            touch()
    if target is not None:
        try:
            target(message)
        except Exception:  # a broken log sink must never break the work it reports on
            pass


@contextlib.contextmanager
def reporting(sink: Sink | None) -> Iterator[None]:
    """Send every line emitted in this block (this thread and context) also to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def _watch() -> None:
    while True:
        interval = heartbeat_interval()
        time.sleep(max(0.05, interval / 10))
        with _console.lock:
            now = time.monotonic()
            if not _console.activities or now - _console.last_output < _SILENCE_FRACTION * interval:
                continue
            label, since, sink = _console.activities[-1]
            touch()
        emit(f"{label}: still working ({format_duration(now - since)})", sink=sink)


def _ensure_watchdog() -> None:
    with _console.lock:
        if _console.watchdog is None or not _console.watchdog.is_alive():
            _console.watchdog = threading.Thread(target=_watch, name="lorakit-heartbeat", daemon=True)
            _console.watchdog.start()


@contextlib.contextmanager
def activity(label: str) -> Iterator[None]:
    """Mark long work: while it runs, a silence longer than the heartbeat interval gets a ``still working`` line."""
    entry = (label, time.monotonic(), _sink.get())
    with _console.lock:
        _console.activities.append(entry)
    _ensure_watchdog()
    try:
        yield
    finally:
        with _console.lock:
            if entry in _console.activities:
                _console.activities.remove(entry)


class LineBar:
    """A tqdm-like counter that reports as plain lines (and mirrors a real tqdm bar on an interactive console).

    The first update is reported at once, then one line at least every heartbeat interval, and the last one
    when the total is reached: ``training: step 3/10, loss 2.1, 4.50 s/step, ETA 32s``.
    """

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "it", initial: int = 0,
                 disable: bool = False, leave: bool = True, **_ignored: Any) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.disable = disable
        self._initial = initial
        self._postfix = ""
        self._started = time.monotonic()
        self._last_line: float | None = None
        self._closed = False
        use_tqdm = not disable and console_enabled() and interactive()
        if use_tqdm:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave)
        else:
            self._bar = None
        # Lines go to the console only when no bar draws there; the sink (Prefect logs) always gets them.
        self._lines_to_console = not disable and self._bar is None
        self._sink = _sink.get()

    # tqdm's interface, as far as lorakit uses it
    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            touch()
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if self._last_line is None or done or now - self._last_line >= heartbeat_interval():
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rate(self) -> float | None:
        """Seconds per unit over this run (units done before a resume do not count)."""
        done = self.n - self._initial
        return (time.monotonic() - self._started) / done if done > 0 else None

    def _line(self, now: float) -> None:
        self._last_line = now
        if self.disable and self._sink is None:
            return
        per = self.rate()
        parts = [f"{self.unit} {self.n}/{self.total}" if self.total is not None else f"{self.unit} {self.n}"]
        if self._postfix:
            parts.append(self._postfix)
        if per is not None:
            slow = per >= 0.1 or self.unit in _PER_UNIT_ALWAYS
            parts.append(f"{per:.3g} s/{self.unit}" if slow else f"{1 / per:.1f} {self.unit}/s")
            if self.total is not None:
                parts.append(f"ETA {format_duration(per * max(0, self.total - self.n))}")
        emit(f"{self.desc}: {', '.join(parts)}", console=self._lines_to_console, sink=self._sink)


def bar(iterable=None, **kwargs: Any):
    """Drop-in for ``tqdm(...)`` in lorakit: a tqdm bar on a terminal, periodic lines elsewhere.

    With an iterable, yields its items and counts them (``total`` defaults to its length).
    """
    if iterable is None:
        return LineBar(**kwargs)
    if "total" not in kwargs:
        try:
            kwargs["total"] = len(iterable)
        except TypeError:
            kwargs["total"] = None

    def gen():
        with LineBar(**kwargs) as counter:
            for item in iterable:
                yield item
                counter.update(1)

    return gen()
