"""`lorakit run` checks the whole release config before any stage: every problem at once, exit 2, nothing written;
`lorakit run --check` prints the plan. Everything through the real CLI in a subprocess, on a tiny random model."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.release_helpers import missing_stages, tiny_config_data

pytestmark = pytest.mark.skipif(bool(missing_stages()), reason=f"stages not on this branch yet: {missing_stages()}")

STAGE_FOLDERS = ("prep", "adapters", "merged", "quantized", "scorecard", "gate")


@pytest.fixture()
def quiet_prefect(tmp_path, monkeypatch) -> Path:
    """A PREFECT_HOME of the test's own: importing Prefect creates it, so its absence proves Prefect never loaded."""
    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return home


def _cli_timed(*args: str, cwd: Path):
    """The CLI's result and the CPU seconds its process used (load on the machine does not inflate CPU time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run_cli(*args, cwd=cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_every_problem_listed_at_once_exit_2_nothing_written(tiny_base, tmp_path, quiet_prefect):
    import torch

    (tmp_path / "odd.jsonl").write_text('{"question": "2+2?", "reply": "4"}\n', encoding="utf-8")
    data = tiny_config_data(tiny_base, tmp_path, lora={"device": "cuda", "layers": "top:5"},
                            quantize={"group_size": 256, "calib_general": str(tmp_path / "gone-calib.txt")},
                            gate={"general_text": str(tmp_path / "gone-general.jsonl")},
                            registry={"name": "r" * 60})  # valid alone (<= 64); not once '-adapter-...' is added
    data["datasets"] += [{"name": "gone", "files": [str(tmp_path / "nope.jsonl")]},
                         {"name": "odd", "files": [str(tmp_path / "odd.jsonl")]}]
    text = yaml.safe_dump(data).replace("- 0.5\n  - 0.5", "- .nan\n  - 0.5")  # YAML's own NaN, 2 weights for 4 sets
    assert ".nan" in text
    config = tmp_path / "bad.yaml"
    config.write_text(text)

    proc, cpu_s = _cli_timed("run", str(config), cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("- ")]
    expected = {
        "nan weight": ("'merge.weights.0'", "finite"),
        "weight count": ("merge.weights has 2 value(s) for 4 dataset(s)",),
        "missing file": ("'datasets.2.files.0'", "nope.jsonl does not exist"),
        "undetectable format": ("'datasets.3' (odd)", "cannot tell the format", "datasets.3.format"),
        # q/k/v, o and gate/up take the tiny base's hidden size 128 (tests/conftest.py): 256 does not divide it
        "group size": ("'quantize.group_size'", "256 does not divide", "quantize.group_size 128"),
        "layers": ("'lora.layers'", "top:5", "has 2 decoder layers"),  # the tiny base's depth
        # 'r'*60 + '-adapter-reverse-words' = 82 characters; the registry allows 64, so 42 is the longest that fits
        "general text": ("'gate.general_text'", "gone-general.jsonl does not exist"),
        "calibration general text": ("'quantize.calib_general'", "gone-calib.txt does not exist"),
        "registry name": ("'registry.name'", f"{'r' * 60}-adapter-reverse-words", "at most 42 characters"),
    }
    if not torch.cuda.is_available():
        expected["device"] = ("'lora.device'", "no CUDA device")
    for what, parts in expected.items():
        assert any(all(p in line for p in parts) for line in lines), f"{what} not reported:\n{proc.stderr}"
    assert f"{len(lines)} problem(s)" in proc.stderr
    assert proc.stderr.count("'registry.name'") == 1  # one line for the whole name family, not one per name
    # Seconds of CPU, not a Prefect server start (25-45 s) or a torch import for a machine without a driver.
    assert cpu_s < 15, f"the preflight used {cpu_s:.1f} s of CPU"
    for path in (tmp_path / "out", tmp_path / "registry", quiet_prefect):
        assert not path.exists(), f"{path} was written by a refused run"


def test_schema_errors_come_out_as_the_same_list(tiny_base, tmp_path, quiet_prefect):
    data = tiny_config_data(tiny_base, tmp_path, lora={"rank": 4})
    data["datasets"].append({"name": "gone", "files": [str(tmp_path / "nope.jsonl")]})
    config = tmp_path / "schema.yaml"
    config.write_text(yaml.safe_dump(data))

    proc = run_cli("run", str(config), cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    assert "unknown key 'lora.rank'" in proc.stderr  # a schema error ...
    assert "'datasets.2.files.0'" in proc.stderr  # ... and a check of a section that did validate, in one list
    # the cross-key check the schema skips once a section failed still runs
    assert "merge.weights has 2 value(s) for 3 dataset(s)" in proc.stderr
    assert "3 problem(s)" in proc.stderr
    assert not quiet_prefect.exists() and not (tmp_path / "out").exists()


def test_explicit_calibration_that_the_data_cannot_fill_is_refused(tiny_base, tmp_path, quiet_prefect):
    # The bundled tasks are 2 x 2,000 examples of a few dozen tokens; 4000 x 128 = 512k tokens is beyond them.
    too_much = tiny_config_data(tiny_base, tmp_path, quantize={"n_samples": 4000})
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(too_much))
    proc = run_cli("run", str(tmp_path / "big.yaml"), "--check", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "'quantize.n_samples': 4000 x seq_len 128 needs 512000 calibration tokens" in proc.stderr

    # Not asked for explicitly: no calibration error (the stage decides what the data gives).
    default = tiny_config_data(tiny_base, tmp_path)
    for key in ("n_samples", "seq_len"):
        default["quantize"].pop(key)
    (tmp_path / "default.yaml").write_text(yaml.safe_dump(default))
    proc = run_cli("run", str(tmp_path / "default.yaml"), "--check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not quiet_prefect.exists() and not (tmp_path / "out").exists()


def _plan_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """{stage label: (state, folder)} from the plan's stage lines."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}(exists|to run)\s+(/\S+)$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def test_check_prints_the_plan_then_a_real_run_makes_it_cached(tiny_base, tmp_path, quiet_prefect):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_data(tiny_base, tmp_path)))
    out = tmp_path / "out"

    proc = run_cli("run", str(config), "--check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = _plan_rows(proc.stdout)
    # two datasets x (prep, train), the joint calibration prep, merge, quantize, scorecard, gate
    assert set(before) == {"prep reverse-words", "train reverse-words", "prep number-words", "train number-words",
                           "prep calibration", "merge", "quantize", "scorecard", "gate"}, proc.stdout
    assert {state for state, _ in before.values()} == {"to run"}
    assert "0 of 9 stage outputs exist" in proc.stdout and "tiny-release-adapter-reverse-words" in proc.stdout
    for path in (out, tmp_path / "registry", quiet_prefect):
        assert not path.exists(), f"--check wrote {path}"

    run = run_cli("run", str(config), "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]

    proc = run_cli("run", str(config), "--check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    after = _plan_rows(proc.stdout)
    assert {state for state, _ in after.values()} == {"exists"}, proc.stdout
    # The plan names exactly the folders the run made (read from the disk, not from the planner).
    made = {str(p) for stage in STAGE_FOLDERS for p in (out / stage).iterdir() if p.is_dir()}
    assert {folder for _, folder in after.values()} == made
    assert "9 of 9 stage outputs exist" in proc.stdout


def test_accuracy_search_on_text_data_is_refused_before_any_stage(tiny_base, tmp_path, quiet_prefect):
    """`merge.search.objective: accuracy` scores answers: a text dataset (no answers) is named up front, not after
    every adapter trained; the same config with the NLL objective passes the check."""
    from flows.preflight import preflight

    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(f'{{"text": "plain note number {i}"}}\n' for i in range(20)), encoding="utf-8")
    data = tiny_config_data(tiny_base, tmp_path, merge={"weights": None, "search": {"objective": "accuracy"}})
    data["datasets"][1] = {"name": "notes", "files": [str(notes)]}
    problems = preflight(data).problems
    assert any("'merge.search.objective'" in p and "'datasets.1' (notes) is text data" in p for p in problems), problems
    data["merge"]["search"]["objective"] = "nll"
    assert not [p for p in preflight(data).problems if "merge.search" in p]
    assert not (tmp_path / "out").exists()


def test_unknown_kernel_backend_setting_is_refused_before_any_stage(tiny_base, tmp_path, quiet_prefect,
                                                                    monkeypatch):
    """$LORAKIT_KERNEL_BACKEND is read by the gate's kernel path, the last stage: a typo is named up front."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_data(tiny_base, tmp_path)))
    monkeypatch.setenv("LORAKIT_KERNEL_BACKEND", "marlin")
    proc = run_cli("run", str(config), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "LORAKIT_KERNEL_BACKEND must be one of auto, torch, triton, got 'marlin'" in proc.stderr
    for path in (tmp_path / "out", tmp_path / "registry", quiet_prefect):
        assert not path.exists(), f"a refused run wrote {path}"
    monkeypatch.setenv("LORAKIT_KERNEL_BACKEND", "Torch")  # names are case-insensitive
    assert run_cli("run", str(config), "--check", cwd=tmp_path).returncode == 0


def test_regmean_that_cannot_fit_in_memory_is_refused_before_training(tiny_base, tmp_path, monkeypatch):
    from flows.preflight import preflight
    from lorakit import runtime

    data = tiny_config_data(tiny_base, tmp_path, merge={"method": "regmean"})
    assert preflight(data).problems == []
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 1 << 20)
    problems = preflight(data).problems
    assert [p for p in problems if p.startswith("'merge.method': method regmean needs about")
            and "general-text anchor" in p], problems
    data["merge"]["method"] = "linear"  # no Gram matrices: nothing to refuse
    data["quantize"]["tune_steps"] = 0  # (scale tuning's and rounding's own checks: the next tests)
    assert [p for p in preflight(data).problems if not p.startswith("'quantize': ")] == []


def test_scale_tuning_that_cannot_fit_in_memory_is_refused_before_training(tiny_base, tmp_path, monkeypatch):
    from flows.preflight import preflight
    from lorakit import runtime

    data = tiny_config_data(tiny_base, tmp_path, quantize={"device": "cpu"})
    assert data["quantize"]["tune_steps"] > 0 and preflight(data).problems == []
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 1 << 20)
    problems = preflight(data).problems
    assert [p for p in problems if p.startswith("'quantize.tune_steps': scale tuning needs about")
            and "quantize.tune_steps 0" in p], problems
    data["quantize"]["tune_steps"] = 0
    assert not [p for p in preflight(data).problems if "tune_steps" in p]
    data["quantize"]["tune_steps"] = 2
    data["route_gpu"] = True  # quantized on the CUDA pool's machine: not this one's memory
    assert not [p for p in preflight(data).problems if "tune_steps" in p]


def test_rounding_that_cannot_fit_in_memory_is_refused_before_training(tiny_base, tmp_path, monkeypatch):
    """With scale tuning off the rounding itself (the model, calibration states, a layer's Hessians) is still
    checked: one byte short of its estimate is one problem under 'quantize' with the fix, exactly enough is none."""
    from flows.preflight import preflight
    from lorakit import runtime
    from lorakit.quantize.calibration import DEFAULT_N_SAMPLES
    from lorakit.quantize.checks import rounding_memory_bytes

    data = tiny_config_data(tiny_base, tmp_path, quantize={"device": "cpu", "tune_steps": 0}, compute_dtype="float32")
    q = data["quantize"]
    need = sum(rounding_memory_bytes(tiny_base, q.get("method", "gptq"), "float32",
                                     n_samples=q.get("n_samples") or DEFAULT_N_SAMPLES,
                                     seq_len=q.get("seq_len", 256)).values())
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: need - 1)
    problems = preflight(data).problems
    assert len(problems) == 1 and problems[0].startswith("'quantize': the quantize stage: "), problems
    assert "GPTQ rounding in float32 needs about" in problems[0] and "route_gpu" in problems[0]
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: need)
    assert preflight(data).problems == []
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 1 << 20)
    data["route_gpu"] = True  # rounded on the CUDA pool's machine: not this one's memory
    assert not [p for p in preflight(data).problems if p.startswith("'quantize': ")]


def test_the_plan_lists_the_gguf_export_and_its_names_only_when_it_is_on(tiny_base, tmp_path):
    from flows.config import ReleaseConfig
    from flows.preflight import plan_lines

    cfg = ReleaseConfig.model_validate(tiny_config_data(tiny_base, tmp_path))
    off = plan_lines(cfg, tiny_base)
    assert not any("gguf" in label for label in _plan_rows("\n".join(off))), off
    assert f"{cfg.registry.name}-gguf" not in off[-1] and f"{cfg.registry.name}-gate" in off[-1]
    cfg = ReleaseConfig.model_validate(tiny_config_data(tiny_base, tmp_path, export={"gguf": "q8_0"}))
    on = plan_lines(cfg, tiny_base)
    rows = _plan_rows("\n".join(on))
    assert {"export gguf q8_0", "gate gguf"} <= set(rows), on
    assert rows["gate gguf"][1] != rows["gate"][1]  # its own verdict folder
    assert f"{cfg.registry.name}-gguf, {cfg.registry.name}-gguf-gate" in on[-1]
