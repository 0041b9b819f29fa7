"""Each Prefect task through ``.fn`` (no server): the wrapper passes its arguments through and returns plain data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorakit.errors import InputError
from tasks import stages
from tasks.cache import STAGE_CACHE, InputFileStamps, placement_blind_cache


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
    for t in (stages.prep_data, stages.merge_adapters, stages.quantize_model, stages.evaluate, stages.gate,
              stages.register):
        assert t.cache_policy is STAGE_CACHE and t.persist_result is True, t.name
    # training: the same policy, blind to where it runs (tests/test_release_flow.py: a hit across placements)
    assert stages.train_adapter.persist_result is True
    assert repr(stages.train_adapter.cache_policy) == repr(placement_blind_cache("process_threads"))
    assert "process_threads" not in repr(STAGE_CACHE) and "process_threads" in repr(stages.train_adapter.cache_policy)
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


# --- every stage task through .fn, on a one-dataset tiny release; arguments come from the real stage plan, so
# --- these tests also prove that flows.plan's keyword arguments match the library functions' signatures.

def _have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_quantize = pytest.mark.skipif(not _have("lorakit.quantize"), reason="quantize stage not on this branch yet")
needs_gate = pytest.mark.skipif(not (_have("lorakit.gate") and _have("lorakit.evaluate")),
                                reason="eval/gate stage not on this branch yet")


@pytest.fixture(scope="module")
def plan(tiny_base, tmp_path_factory):
    from flows.config import parse_config
    from flows.plan import ReleasePlan
    from tests.release_helpers import tiny_config_data

    data = tiny_config_data(tiny_base, tmp_path_factory.mktemp("chain"), merge={"weights": [1.0]})
    data["datasets"] = data["datasets"][:1]
    return ReleasePlan(parse_config(data))


def _same_as_file(result: dict, meta_file: str) -> None:
    path = Path(result["path"])
    assert path.is_absolute() and path.is_dir()
    assert json.loads(json.dumps(result["metadata"])) == json.loads((path / meta_file).read_text())


@pytest.fixture(scope="module")
def prepped(plan):
    return stages.prep_data.fn(**plan.prep(plan.config.datasets[0]))


@pytest.fixture(scope="module")
def trained(plan, prepped):
    return stages.train_adapter.fn(**plan.train(plan.config.datasets[0], prepped["path"]))


@pytest.fixture(scope="module")
def merged_model(plan, trained):
    return stages.merge_adapters.fn(**plan.merge([trained["path"]]))


@pytest.fixture(scope="module")
def quantized(plan, merged_model, prepped):
    return stages.quantize_model.fn(**plan.quantize(merged_model["path"], prepped["path"]))


def test_prep_task(prepped):
    _same_as_file(prepped, "prep.json")
    assert prepped["metadata"]["counts"]["val"]["examples"] > 0


def test_train_task(plan, trained):
    _same_as_file(trained, "lorakit_train.json")
    assert trained["metadata"]["steps"] == plan.config.lora.max_steps
    assert (Path(trained["path"]) / "adapter_config.json").exists()


@needs_quantize
def test_quantize_task(plan, quantized):
    _same_as_file(quantized, "lorakit_quant.json")
    config = json.loads((Path(quantized["path"]) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == plan.config.quantize.method


@needs_gate
def test_evaluate_task(prepped, merged_model):
    import math

    result = stages.evaluate.fn(merged_model["path"], prepped["path"], {"seq_len": 128, "max_tokens": 512})
    assert math.isfinite(result["ppl"]) and result["ppl"] > 1 and result["tokens"] > 0
    json.dumps(result)


@needs_quantize
@needs_gate
def test_gate_task(plan, merged_model, quantized, prepped):
    name = plan.config.datasets[0].name
    verdict = stages.gate.fn(**plan.gate(merged_model["path"], quantized["path"], {name: prepped["path"]}))
    _same_as_file(verdict, "gate.json")
    assert isinstance(verdict["metadata"]["passed"], bool)
    assert (Path(verdict["path"]) / "gate.png").exists()


def test_register_and_alias_tasks(prepped, trained, tmp_path):
    from registry import Registry

    root = str(tmp_path / "registry")
    data = stages.register.fn(prepped["path"], root, "t-data", "dataset", {}, {"seed": 0}, [], ["x"])
    adapter = stages.register.fn(trained["path"], root, "t-adapter", "adapter", {"loss": 1.5}, {},
                                 [[data["ref"], {"step": "train"}]], [])
    assert adapter["ref"] == "t-adapter@1" and adapter["verdict"] is None
    again = stages.register.fn(trained["path"], root, "t-adapter", "adapter", {"loss": 1.5}, {}, [data["ref"]], [])
    assert again["ref"] == adapter["ref"]  # identical content: the same version
    assert stages.set_alias.fn(root, adapter["ref"], "candidate") == "t-adapter@candidate"
    reg = Registry(root)
    assert reg.resolve("t-adapter@candidate") == reg.resolve("t-adapter@1")
    assert [n.artifact.ref for n in reg.lineage("t-adapter@1").walk()] == ["t-adapter@1", "t-data@1"]
    with pytest.raises(InputError):  # bad input is an InputError (never retried)
        stages.register.fn(trained["path"], root, "bad/name", "adapter", {}, {}, [], [])
