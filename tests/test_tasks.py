"""Each Prefect task through ``.fn`` (no server): the wrapper passes its arguments through and returns plain data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorakit.errors import InputError
from tasks import stages
from tasks.cache import STAGE_CACHE, InputFileStamps


@pytest.fixture(scope="module")
def two_adapters(tiny_base, tmp_path_factory):
    from lorakit.models.synthetic import make_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return [str(make_random_adapter(tiny_base, root / f"a{i}", r=4, seed=i)) for i in range(2)]


def test_merge_task_writes_model_and_returns_plain_data(tiny_base, two_adapters, tmp_path):
    out = tmp_path / "merged"
    params = {"method": "linear", "density": None, "seed": None, "normalize": None, "output_kind": "model",
              "base": str(tiny_base)}
    result = stages.merge_adapters.fn(two_adapters, [0.7, 0.3], str(out), params)
    assert result["path"] == str(out.absolute())
    assert json.loads(json.dumps(result["metadata"])) == json.loads((out / "lorakit_merge.json").read_text())
    assert result["metadata"]["weights"] == [0.7, 0.3] and result["metadata"]["output_kind"] == "model"
    json.dumps(result)  # serialisable: it is persisted as the task's result
    # A step that runs again replaces its own output folder (the cache decides whether it runs at all).
    again = stages.merge_adapters.fn(two_adapters, [0.5, 0.5], str(out), params)
    assert again["metadata"]["weights"] == [0.5, 0.5]


def test_merge_task_bad_input_is_input_error(tiny_base, two_adapters, tmp_path):
    with pytest.raises(InputError, match="weight"):
        stages.merge_adapters.fn(two_adapters, [1.0], str(tmp_path / "m"), {"output_kind": "model", "base": str(tiny_base)})
    assert not (tmp_path / "m").exists()


def test_stage_tasks_cache_and_persist():
    for t in (stages.prep_data, stages.train_adapter, stages.merge_adapters, stages.quantize_model,
              stages.evaluate, stages.gate, stages.register):
        assert t.cache_policy is STAGE_CACHE and t.persist_result is True, t.name
    assert stages.set_alias.cache_policy is None or stages.set_alias.persist_result is not True
    assert "gpu" in stages.train_adapter.tags and "gpu" in stages.quantize_model.tags
    assert stages.train_adapter.retries == 1 and stages.register.retries == 2
    assert stages.prep_data.retries == 0 and stages.gate.retries == 0  # bad data fails the same way twice


def test_no_retry_on_bad_input():
    from prefect.states import Failed

    assert not stages.retry_unless_bad_input(None, None, Failed(data=InputError("bad")))
    assert stages.retry_unless_bad_input(None, None, Failed(data=RuntimeError("CUDA error: device lost")))


def test_file_stamps_follow_file_contents(tmp_path):
    policy = InputFileStamps()
    data = tmp_path / "d" / "a.jsonl"
    data.parent.mkdir()
    data.write_text("one\n")
    inputs = {"sources": [str(data)], "output": str(tmp_path / "out"), "params": {"calib": str(data.parent)}}
    key = policy.compute_key(None, inputs, {})
    assert key == policy.compute_key(None, inputs, {})
    data.write_text("two, longer\n")
    changed = policy.compute_key(None, inputs, {})
    assert changed != key
    os.utime(data, ns=(1, 1))  # same size, different mtime: still a change
    assert policy.compute_key(None, inputs, {}) != changed
    assert policy.compute_key(None, {"method": "linear", "n": 3}, {}) is None  # no paths, no component
    # The step's own output is not an input: writing it must not change the key of the step that wrote it.
    before = policy.compute_key(None, inputs, {})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text("{}")
    assert policy.compute_key(None, inputs, {}) == before
    # A registry root counts by identity only: registrations change its contents, not which registry it is.
    reg = tmp_path / "registry"
    reg.mkdir()
    with_root = {**inputs, "root": str(reg)}
    key = policy.compute_key(None, with_root, {})
    (reg / "index.sqlite").write_text("more rows")
    assert policy.compute_key(None, with_root, {}) == key
    reg.rename(tmp_path / "old-registry")
    (tmp_path / "keep-inode-busy").mkdir()
    reg.mkdir()
    assert policy.compute_key(None, with_root, {}) != key


def test_importing_tasks_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, tasks.stages, flows.release; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "False"


def test_route_gpu_without_deployment_is_input_error(prefect_harness, tmp_path):
    """route_gpu against a server without the GPU deployments: one actionable line, nothing run."""
    from flows.gpu import run_gpu, train_flow

    with pytest.raises(InputError, match=r"no deployment train/cuda; run scripts/pools_up.sh"):
        run_gpu(train_flow, route=True, pool="cuda", prep_dir=str(tmp_path), output=str(tmp_path / "a"), params={})
