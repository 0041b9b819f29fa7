"""End to end: a real Prefect server, `cpu` and `cuda` process pools, `prefect deploy --all`, one worker per
pool, the release deployment on a tiny config; the GPU flows must run on the cuda pool's worker."""

from __future__ import annotations

import json
import sys

import pytest

from tests.prefect_server import BIN, prefect_stack
from tests.release_helpers import missing_stages, tiny_config_data

pytestmark = pytest.mark.skipif(bool(missing_stages()), reason=f"stages not on this branch yet: {missing_stages()}")

# Runs in its own process against the test server (the in-process tests' harness may be active in this one).
CLIENT = r"""
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


def test_release_deployment_runs_gpu_flows_on_cuda_pool(tiny_base, tmp_path):
    from registry import Registry

    home = tmp_path / "prefect-home"
    home.mkdir()
    data = tiny_config_data(tiny_base, tmp_path, route_gpu=True, merge={"weights": [1.0]})
    data["datasets"] = data["datasets"][:1]  # one adapter: every routed flow kind once, in CI time
    with prefect_stack(home) as stack:
        stack.env.update(LORAKIT_RESULTS=str(tmp_path / "results"), PYTHON=sys.executable,
                         PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2")
        stack.start_server()
        stack.run("bash", "scripts/pools_up.sh")
        stack.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
        stack.start_worker("cpu")
        stack.start_worker("cuda")
        out = stack.run(sys.executable, "-c", CLIENT, json.dumps(data), "420", timeout=480)
        info = json.loads(out.stdout.strip().splitlines()[-1])
        logs = f"{info}\n--- cpu worker\n{stack.log('worker-cpu')}\n--- cuda worker\n{stack.log('worker-cuda')}"
    assert info["state"] == "COMPLETED", logs
    assert info["pool"] == "cpu"
    gpu_runs = sorted((c["flow"], c["pool"], c["state"]) for c in info["children"])
    assert gpu_runs == [("quantize", "cuda", "COMPLETED"), ("train", "cuda", "COMPLETED")], logs
    refs = info["result"]["refs"]
    reg = Registry(data["registry"]["root"])
    assert reg.resolve("tiny-release@candidate") == reg.resolve(refs["quantized"])
    assert (reg.resolve(refs["quantized"]) / "config.json").exists()
