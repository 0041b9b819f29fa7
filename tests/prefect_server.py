"""A real Prefect server, work pools and workers, as subprocesses a test starts and always stops by PID.

Also used by scripts/gpu_check.py (the release check on a GPU machine), so it needs only Prefect, not pytest.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def prefect_cli() -> list[str]:
    """The ``prefect`` command: the venv's script, or ``python -m prefect`` where Prefect was installed without
    scripts (wheels unpacked with ``pip install --target``, as on the GPU machine)."""
    script = BIN / "prefect"
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(home: Path, **extra: str) -> dict[str, str]:
    """A Prefect environment isolated in ``home`` (its own profile, database, storage), without telemetry."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING", PREFECT_CLI_COLORS="false", LORAKIT_THREADS="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def stop(proc: subprocess.Popen, *, grace: float = 15.0) -> None:
    """SIGINT (a worker may need two), then SIGTERM, then SIGKILL: the process and its children end."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace / 2), (signal.SIGINT, grace / 2), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)  # each process was started in its own group: its flow-run children go too
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class PrefectStack:
    """Started processes in order; ``close`` stops them in reverse order."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = quiet_env(home, PREFECT_API_URL=self.api_url)
        if not (BIN / "prefect").exists():  # scripts/pools_up.sh calls `prefect` from PATH
            shim = home / "bin"
            shim.mkdir(parents=True, exist_ok=True)
            (shim / "prefect").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m prefect "$@"\n')
            (shim / "prefect").chmod(0o755)
            self.env["PATH"] = f"{shim}{os.pathsep}{self.env['PATH']}"
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "wb")
        proc = subprocess.Popen(list(args), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start_server(self, timeout: float = 150) -> None:
        self.spawn("server", *prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port",
                   str(self.port), "--analytics-off")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[-1][1].poll() is not None:
                raise AssertionError(f"prefect server exited:\n{self.log('server')}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"prefect server not healthy after {timeout} s:\n{self.log('server')}")

    def start_worker(self, pool: str) -> subprocess.Popen:
        return self.spawn(f"worker-{pool}", *prefect_cli(), "worker", "start", "--pool", pool,
                          "--type", "process")

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def close(self) -> None:
        for _name, proc in reversed(self.procs):
            stop(proc)


@contextmanager
def prefect_stack(home: Path):
    stack = PrefectStack(home)
    try:
        yield stack
    finally:
        stack.close()


# The release deployment on a config (argv[1], JSON), waited for up to argv[2] s; prints one JSON line: its state,
# pool, child flow runs (flow, pool, state) and result. Runs in its own process against the stack's server (an
# in-process test harness may be active in the caller).
RELEASE_CLIENT = r"""
import asyncio, json, sys
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.deployments import run_deployment

run = run_deployment("release/cpu", parameters=json.loads(sys.argv[1]), timeout=float(sys.argv[2]), as_subflow=False)

async def children():
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        return [{"flow": (await client.read_flow(r.flow_id)).name, "pool": r.work_pool_name,
                 "state": r.state.type.value, "deployment": str(r.deployment_id)} for r in runs]

done = run.state is not None and run.state.is_completed()
print(json.dumps({"state": run.state.type.value if run.state else None, "message": run.state.message if run.state else None,
                  "pool": run.work_pool_name, "children": asyncio.run(children()),
                  "result": run.state.result() if done else None}, default=str))
"""
