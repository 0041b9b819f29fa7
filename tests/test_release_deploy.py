"""End to end: a real Prefect server, `cpu` and `cuda` process pools, `prefect deploy --all`, one worker per
pool, the release deployment on a tiny config; the GPU flows must run on the cuda pool's worker."""

from __future__ import annotations

import json
import sys

import pytest

from tests.prefect_server import RELEASE_CLIENT, prefect_cli, prefect_stack
from tests.release_helpers import missing_stages, tiny_config_data

pytestmark = pytest.mark.skipif(bool(missing_stages()), reason=f"stages not on this branch yet: {missing_stages()}")


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
        stack.run(*prefect_cli(), "--no-prompt", "deploy", "--all")
        stack.start_worker("cpu")
        stack.start_worker("cuda")
        out = stack.run(sys.executable, "-c", RELEASE_CLIENT, json.dumps(data), "420", timeout=480)
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
