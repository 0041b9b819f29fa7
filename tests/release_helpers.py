"""Helpers shared by the release-flow tests: tiny run configs and reading flow/task runs back from Prefect."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

# The stage modules the release flow composes; its tests need all of them.
STAGE_MODULES = ("lorakit.data.prep", "lorakit.data.bundled", "lorakit.train", "lorakit.quantize",
                 "lorakit.evaluate", "lorakit.gate", "registry")


def missing_stages() -> list[str]:
    import importlib.util

    missing = []
    for name in STAGE_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    if "registry" not in missing:
        import registry

        if not hasattr(registry, "Registry"):
            missing.append("registry.Registry")
    return missing


def _deep_update(data: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _deep_update(data[key], value)
        else:
            data[key] = value
    return data


def tiny_config_data(base: Path, workdir: Path, **updates: Any) -> dict[str, Any]:
    """configs/tiny.yaml pointed at a tiny model folder, with outputs and registry under ``workdir``."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data.update(base=str(base), output_dir=str(workdir / "out"))
    data["registry"] = {**data.get("registry", {}), "root": str(workdir / "registry")}
    return _deep_update(copy.deepcopy(data), updates)


async def _runs_under(client, flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    children = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    return children


def flow_runs_under(flow_run_id) -> list:
    """The flow runs started as subflows of ``flow_run_id`` (in-process or through run_deployment)."""
    from prefect import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go():
        async with get_client() as client:
            return await _runs_under(client, flow_run_id)

    return run_coro_as_sync(go())


def task_runs_of(flow_run_ids) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))))

    return run_coro_as_sync(go())


def artifacts_of(flow_run_id) -> dict[str, object]:
    """The artifacts a flow run published, by key."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in run_coro_as_sync(go())}


def log_messages_of(flow_run_ids, must_contain: str = "", timeout: float = 30.0) -> list[str]:
    """Messages of every Prefect log line of the given flow runs (and their task runs).

    Logs reach the server from a background worker; poll until one contains ``must_contain`` or time runs out.
    """
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(flow_run_ids))))

    deadline = time.monotonic() + timeout
    while True:
        messages = [log.message for log in run_coro_as_sync(go())]
        if any(must_contain in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)
