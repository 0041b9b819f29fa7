"""The whole release flow on a tiny model, in-process under one session-scoped Prefect test harness."""

from __future__ import annotations

import os

import pytest

from tests.release_helpers import (artifacts_of, flow_runs_under, log_messages_of, missing_stages, task_runs_of,
                                   tiny_config_data)

pytestmark = pytest.mark.skipif(bool(missing_stages()), reason=f"stages not on this branch yet: {missing_stages()}")

STAGE_TASKS = {"prep-data", "train-adapter", "merge-adapters", "quantize-model", "scorecard", "gate", "register"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("release")


def run_release(data: dict):
    from flows.config import parse_config
    from flows.release import release

    return release(**parse_config(data).flow_parameters(), return_state=True)


def stage_states(flow_run_id, timeout: float = 30.0) -> dict[str, set[str]]:
    """Task name -> state names of every stage task in the run and its subflows.

    Prefect records task-run states from events, after the flow has returned: a task run can be listed with no
    state (or a non-final one) for a moment (seen once in CI). Poll until every stage task run has a final state.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        ids = [flow_run_id, *(r.id for r in flow_runs_under(flow_run_id))]
        runs = [tr for tr in task_runs_of(ids) if tr.name.rsplit("-", 1)[0] in STAGE_TASKS]
        settled = all(tr.state is not None and tr.state.is_final() for tr in runs)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    states: dict[str, set[str]] = {}
    for tr in runs:
        name = tr.name.rsplit("-", 1)[0]  # task run names are "<task name>-<suffix>"
        states.setdefault(name, set()).add(tr.state.name if tr.state is not None else "no state recorded")
    return states


def test_release_completes_registers_lineage_and_caches(prefect_harness, tiny_base, workdir):
    from registry import Registry

    data = tiny_config_data(tiny_base, workdir)
    first = run_release(data)
    assert first.is_completed(), first.message
    result = first.result()
    refs = result["refs"]
    assert set(refs) == {"base", "prep:reverse-words", "prep:number-words", "adapter:reverse-words",
                         "adapter:number-words", "merged", "quantized", "verdict"}
    reg = Registry(data["registry"]["root"])
    ancestors = {node.artifact.ref for node in reg.lineage(refs["quantized"]).walk()}
    assert ancestors == {refs[r] for r in refs if r != "verdict"}
    release_version = reg.get(refs["quantized"])
    assert release_version.verdict["passed"] is True and "candidate" in release_version.aliases
    assert reg.resolve("tiny-release@candidate") == reg.resolve(refs["quantized"])
    assert "production" not in release_version.aliases  # a human promotes (auto_promote is off)
    report = artifacts_of(first.state_details.flow_run_id)
    summary = report["release-report"].data
    assert summary.startswith("# Release `tiny-release`: PASSED") and refs["quantized"] in summary
    assert "data:image/png;base64," in summary  # the gate chart, embedded
    assert report["release-report-stages"].type == "table"
    # the scorecard stage ran between quantize and the gate: in the report, the verdict and the release's metadata
    assert "## Scorecard" in summary and summary.count("data:image/png;base64,") == 2
    assert report["release-report-scorecard"].type == "table"
    card = release_version.metadata["scorecard.json"]
    assert set(card["tasks"]) == {"reverse-words", "number-words"}
    assert card["models"]["quantized"]["folder"] == result["release"]
    assert {"val", "test"} == set(card["tasks"]["reverse-words"]["splits"])
    verdict_meta = reg.get(refs["verdict"]).metadata
    assert verdict_meta["scorecard.json"]["tasks"] == card["tasks"] and verdict_meta["gate.json"]["scorecard_checks"] == []
    # general text was scored once: the gate took the scorecard's merged-vs-quantized pass, numbers and all
    general = next(c for c in verdict_meta["gate.json"]["checks"] if c["kind"] == "general")
    assert general["measured_in"] == "scorecard"
    assert general["candidate_ppl"] == card["general_text"]["pair"]["quantized"]["ppl"]
    # lorakit's progress lines are in the Prefect logs of the run (stage lines) and of its task runs (steps)
    run_ids = [first.state_details.flow_run_id, *(r.id for r in flow_runs_under(first.state_details.flow_run_id))]
    logs = "\n".join(log_messages_of(run_ids, must_contain="register: done in"))
    for line in ("prep reverse-words: started", "train number-words: done in", "quantize gptq: started",
                 "training: step 3/3, loss", "GPTQ: quantizing layers: layer 2/2", "register: done in"):
        assert line in logs, (line, logs[-3000:])

    second = run_release(data)
    assert second.is_completed(), second.message
    states = stage_states(second.state_details.flow_run_id)
    assert set(states) == STAGE_TASKS
    assert all(s == {"Cached"} for s in states.values()), states
    logs = log_messages_of([second.state_details.flow_run_id], must_contain="merge: cached")
    assert any(m.startswith("merge: cached") for m in logs), logs
    assert second.result()["refs"] == refs

    import shutil

    shutil.rmtree(second.result()["release"])  # a cached output deleted by hand is rebuilt, not handed on
    third = run_release(data)
    assert third.is_completed(), third.message
    assert "Completed" in stage_states(third.state_details.flow_run_id)["quantize-model"]
    assert os.path.isdir(third.result()["release"])


# The gate options of a release that any quantization fails (see test_rejected_release_fails_and_stays_registered).
REJECT_ANY_CHANGE = {"max_kl": 0.0}


def test_rejected_release_fails_and_stays_registered(prefect_harness, tiny_base, workdir):
    from registry import Registry

    # Same chain as the passing run (cached up to the quantization). A zero KL bar rejects any change to the next-token
    # distributions, which 4-bit weights always make; a zero perplexity bar would not do: on a random model the
    # quantized perplexity moves either way (by ~0.1%, its sign set by the data).
    data = tiny_config_data(tiny_base, workdir, gate=REJECT_ANY_CHANGE, registry={"name": "tiny-rejected"})
    state = run_release(data)
    assert state.is_failed()
    assert state.message.startswith("gate rejected: mean KL ") and "gate:failed" in state.message, state.message
    reg = Registry(data["registry"]["root"])
    [rejected] = reg.list("tiny-rejected")  # the rejected candidate is still registered ...
    assert rejected.verdict["passed"] is False and "gate:failed" in rejected.tags
    assert "candidate" not in rejected.aliases  # ... but gets no alias
    assert reg.list("tiny-rejected-gate") and reg.list("tiny-rejected-merged")


def test_release_rejected_by_the_scorecard_names_the_task(prefect_harness, tiny_base, workdir):
    from registry import Registry

    # The tiny adapters train 3 steps on a random model: they learn neither task, which the default retention
    # check must catch (the perplexity threshold of tiny.yaml passes them).
    data = tiny_config_data(tiny_base, workdir, gate={"min_retention": 0.9}, registry={"name": "tiny-unlearned"})
    state = run_release(data)
    assert state.is_failed()
    assert state.message.startswith("gate rejected: min_retention failed on reverse-words: the adapter for "
                                    "reverse-words did not learn it"), state.message
    assert "gate:failed" in state.message
    [rejected] = Registry(data["registry"]["root"]).list("tiny-unlearned")
    assert rejected.verdict["passed"] is False and "gate:failed" in rejected.tags and "candidate" not in rejected.aliases


@pytest.mark.parametrize("label,quantize,want", [
    # 256 does not divide the tiny model's 128-wide layers: the stage lowers it to 128.
    ("lowered", {"group_size": 256}, {"group_size": 128, "group_size_requested": 256}),
    # The search starts from the configured settings (configs/tiny.yaml's group size); with one trial its pick is
    # exactly them.
    ("searched", {"target_degradation": 1.0, "max_trials": 1}, {"search": {
        "target_degradation": 1.0, "passed": True, "chosen_trial": 0}}),
])
def test_report_and_lineage_record_the_quantization_used(prefect_harness, tiny_base, workdir, label, quantize, want):
    """The release report and the registry carry what the quantize stage used, read from its lorakit_quant.json,
    with the configuration it was given beside it in the lineage."""
    import json
    from pathlib import Path

    from lorakit.quantize.options import GPTAQ_ALPHA
    from registry import Registry

    data = tiny_config_data(tiny_base, workdir, quantize=quantize, registry={"name": f"tiny-{label}"})
    want = {"group_size": data["quantize"]["group_size"], **want}  # unless the case says otherwise: as configured
    state = run_release(data)
    assert state.is_completed(), state.message
    result = state.result()
    record = json.loads((Path(result["release"]) / "lorakit_quant.json").read_text())
    assert record["params"]["group_size"] == want["group_size"]
    params = Registry(data["registry"]["root"]).get(result["refs"]["quantized"]).params
    assert {k: params[k] for k in want} == want
    assert params["method"] == "gptq" and params["sym"] is False and params["desc_act"] is True  # the defaults
    assert params["n_samples"] == 8
    assert params["requested"]["group_size"] == data["quantize"]["group_size"]
    summary = artifacts_of(state.state_details.flow_run_id)["release-report"].data
    item = f"gptq 4-bit g{want['group_size']} asym"
    if "group_size_requested" in want:
        item += f" (g{want['group_size_requested']} requested)"
    item += f" act-order GPTAQ {GPTAQ_ALPHA:g}, 8x128 calibration"
    # configs/tiny.yaml tunes 2 steps, so the release's tuning runs; on a random model it may or may not be kept
    assert record["params"]["tune_steps"] == 2 and params["tune_steps"] == 2 and params["tune_kept"] == record["tuning"]["kept"]
    on = " on answers" if record["tuning"]["tokens"] == "answers" else ""
    assert record["tuning"]["tokens"] == params["tune_tokens"] == record["params"]["tune_tokens"]  # bundled data: answers
    item += (f", scales tuned{on} (2 steps)" if record["tuning"]["kept"]
             else f", scale tuning{on} not kept (2 steps raised the held-out KL)")
    item += ", search pick (trial 0)" if "search" in want else ""
    assert f"| quantize | {item} |" in summary, summary


def test_cli_run_exit_codes(prefect_harness, tiny_base, workdir, tmp_path):
    """`lorakit run` in a fresh process: exit 0 with the verdict on a pass, exit 3 with it on a rejection.

    It shares the harness's result storage, so every stage comes from the cache of the tests above: a fresh
    process (with its own ephemeral Prefect server) reuses what another process computed.
    """
    import subprocess
    import sys

    import yaml

    from tests.release_helpers import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_LOCAL_STORAGE_PATH=str(prefect_harness), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    outcomes = {}
    for label, updates in {"pass": {}, "reject": {"gate": REJECT_ANY_CHANGE,
                                                  "registry": {"name": "tiny-rejected"}}}.items():
        config = tmp_path / f"{label}.yaml"
        config.write_text(yaml.safe_dump(tiny_config_data(tiny_base, workdir, **updates)))
        outcomes[label] = subprocess.run([sys.executable, "-m", "lorakit", "run", str(config), "-q"], env=env,
                                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    ok, rejected = outcomes["pass"], outcomes["reject"]
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.startswith("gate passed: degradation +")
    assert rejected.returncode == 3, rejected.stderr[-3000:]
    # the verdict line; under load the ephemeral Prefect server's shutdown may log a CancelledError after it
    assert any(line.startswith("error: gate rejected: mean KL ") for line in rejected.stderr.splitlines()), \
        rejected.stderr[-3000:]


def test_cli_run_stopped_by_sigterm_takes_its_prefect_server_and_training_with_it(tiny_base, tmp_path):
    """`kill PID` of a `lorakit run` (SIGTERM, what schedulers send) while adapters train: the run exits 143 and no
    process it started outlives it: not its ephemeral Prefect server (before, it stayed running, orphaned), not a
    training process; nothing is published in the adapters' place."""
    import signal
    import subprocess
    import sys
    import time

    import psutil
    import yaml

    from tests.release_helpers import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    config = tmp_path / "long.yaml"
    # two training processes whatever `auto` would decide on this machine's free memory (it may train in-process)
    config.write_text(yaml.safe_dump(tiny_config_data(tiny_base, tmp_path, lora={"max_steps": 100000},
                                                      train_concurrency=2)))
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lorakit", "run", str(config)], env=env, cwd=tmp_path,
                                stdout=out, stderr=err)
    try:
        run = psutil.Process(proc.pid)
        deadline = time.monotonic() + 240
        while True:  # until the server and both training processes run
            started = run.children(recursive=True)
            training = [c for c in started if "spawn_main" in " ".join(c.cmdline())]
            if len(training) >= 2 and any("uvicorn" in " ".join(c.cmdline()) for c in started):
                break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err.log").read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
        assert "stopped by signal 15" in (tmp_path / "err.log").read_text()
        assert not list((tmp_path / "out" / "adapters").glob("*/adapter_model.safetensors"))
    finally:
        if proc.poll() is None:  # the test failed before the signal: leave no server or training behind
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()


def test_release_with_gguf_export_gates_and_registers_it(prefect_harness, tiny_base, workdir):
    from pathlib import Path

    from registry import Registry

    # Same chain as the passing run (cached up to the gate); `export: {gguf: q8_0}` adds export, gate, registration.
    data = tiny_config_data(tiny_base, workdir, export={"gguf": "q8_0"}, registry={"name": "tiny-gguf"})
    state = run_release(data)
    assert state.is_completed(), state.message
    result = state.result()
    refs = result["refs"]
    assert {"gguf", "gguf-verdict"} <= set(refs) and "GGUF q8_0 gate passed" in result["summary"]
    assert (Path(result["gguf"]) / "model.q8_0.gguf").is_file()
    reg = Registry(data["registry"]["root"])
    gguf = reg.get(refs["gguf"])
    assert gguf.kind == "gguf" and gguf.verdict["passed"] is True and "candidate" in gguf.aliases
    assert gguf.metadata["lorakit_export.json"]["type"] == "q8_0"
    parents = {node.artifact.ref for node in reg.lineage(refs["gguf"]).walk()}
    assert refs["merged"] in parents
    verdict = reg.get(refs["gguf-verdict"])
    assert verdict.kind == "verdict"


def test_release_with_merge_search_records_the_chosen_weights_in_the_lineage(prefect_harness, tiny_base, workdir):
    """`merge: {search: ...}` in a run: the merge stage searches (adapters come from the cache of the runs above),
    the merged model's folder records every trial, and its registry entry carries the pick."""
    import json
    from pathlib import Path

    from registry import Registry

    data = tiny_config_data(tiny_base, workdir, registry={"name": "tiny-searched"})
    # objective nll: a random tiny model's adapters answer nothing (exact match 0), so auto's accuracy would refuse them
    data["merge"] = {"method": "linear", "search": {"max_trials": 4, "max_tokens": 512, "objective": "nll"}}
    state = run_release(data)
    assert state.is_completed(), state.message
    merged = Registry(data["registry"]["root"]).get(state.result()["refs"]["merged"])
    assert merged.source is not None
    search = json.loads((Path(merged.source) / "lorakit_merge.json").read_text())["search"]
    assert 1 <= search["n_trials"] <= 4
    chosen = search["trials"][search["chosen"]]
    assert merged.params["weights"] == chosen["params"]["weights"]
    assert merged.params["search"]["n_trials"] == search["n_trials"]
    assert merged.params["search"]["chosen"]["method"] == "linear"
    lineage = Registry(data["registry"]["root"]).lineage(merged.ref)
    by_task = {p.artifact.name.rsplit("-adapter-", 1)[1]: p.params["weight"] for p in lineage.parents}
    assert by_task == dict(zip(["reverse-words", "number-words"], chosen["params"]["weights"]))  # each its own
    assert all(p.params["searched"] is True for p in lineage.parents)


def test_adapters_train_at_once_and_where_they_trained_is_not_in_the_cache_key(prefect_harness, tiny_base, workdir):
    data = tiny_config_data(tiny_base, workdir, output_dir=str(workdir / "out-concurrent"), train_concurrency=2,
                            registry={"root": str(workdir / "registry-concurrent")})
    first = run_release(data)
    assert first.is_completed(), first.message
    run_ids = [first.state_details.flow_run_id, *(r.id for r in flow_runs_under(first.state_details.flow_run_id))]
    trains = [tr for tr in task_runs_of(run_ids) if tr.name.startswith("train-adapter")]
    assert len(trains) == 2 and all(tr.start_time and tr.end_time for tr in trains), trains
    assert max(tr.start_time for tr in trains) < min(tr.end_time for tr in trains)  # both ran at the same time
    logs = "\n".join(log_messages_of(run_ids, must_contain="register: done in"))
    assert "train: 2 adapters, 2 at once, each in its own process with" in logs
    for name in ("reverse-words", "number-words"):  # each child's lines come back labelled with its adapter
        assert f"train {name}: training: step 3/3, loss" in logs, logs[-3000:]

    second = run_release({**data, "train_concurrency": 1})  # in-process this time: the same adapters, from the cache
    assert second.is_completed(), second.message
    assert stage_states(second.state_details.flow_run_id)["train-adapter"] == {"Cached"}
    assert second.result()["refs"] == first.result()["refs"]
