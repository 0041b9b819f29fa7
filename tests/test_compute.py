"""The compute-dtype resolver: the per-stage policy, explicit choices, refusals, the cached bf16 probe, and the
probe's verdict on a CPU whose bf16 kernels are switched off (torch held to AVX2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lorakit import compute
from lorakit.compute import POLICY, resolve_compute_dtype
from lorakit.errors import InputError
from tests.conftest import REPO, run_cli

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_policy_table_covers_every_stage_and_comparable_stages_are_float32(home):
    assert set(POLICY) == {"train", "quantize", "eval", "gate", "merge"}
    for stage in ("eval", "gate", "merge"):  # whatever this CPU is
        assert resolve_compute_dtype("auto", stage, "cpu") == torch.float32
    fast = compute.bf16_is_fast("cpu")
    for stage in ("train", "quantize"):
        assert resolve_compute_dtype("auto", stage, "cpu") == (torch.bfloat16 if fast else torch.float32)


def test_explicit_dtypes_are_honoured_and_recorded_names_round_trip(home):
    for name in ("float32", "bfloat16", "float16"):
        for stage in ("train", "quantize", "eval", "gate"):
            dtype = resolve_compute_dtype(name, stage, "cpu")
            assert compute.dtype_name(dtype) == name
    assert resolve_compute_dtype("float32", "merge", "cpu") == torch.float32


@pytest.mark.parametrize("bad", ["bfloat16", "float16"])
def test_merge_refuses_reduced_precision(home, bad):
    with pytest.raises(InputError, match="merge is exact"):
        resolve_compute_dtype(bad, "merge", "cpu")


def test_unknown_dtype_and_cuda_without_cuda_are_input_errors(home):
    with pytest.raises(InputError, match="--compute-dtype must be one of"):
        resolve_compute_dtype("fp8", "train", "cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for requested in ("auto", "bfloat16"):
        with pytest.raises(InputError, match="no CUDA device is available"):
            resolve_compute_dtype(requested, "train", "cuda")


def test_probe_is_cached_per_machine_and_setting(home, monkeypatch):
    first = compute.cpu_bf16_probe()
    assert first["cached"] is False
    files = list((home / "compute").glob("cpu-bf16-*.json"))
    assert len(files) == 1 and not list((home / "compute").glob(".*tmp*"))  # written atomically, nothing left over
    stored = json.loads(files[0].read_text())
    assert stored["fast"] == first["fast"] and stored["torch"] == torch.__version__
    assert stored["threads"] == torch.get_num_threads()
    again = compute.cpu_bf16_probe()
    assert again["cached"] is True and again["fast"] == first["fast"]
    # Another kernel setting is another machine as far as speed goes: a new entry, not the cached one.
    current = os.environ.get("ATEN_CPU_CAPABILITY")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default" if current == "avx2" else "avx2")
    assert compute.probe_cache_path(compute._probe_key(compute.cpu_info())) != files[0]
    if current is None:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", current)
    files[0].write_text("{not json")  # a corrupt entry is measured again and replaced
    assert compute.cpu_bf16_probe()["cached"] is False
    assert json.loads(files[0].read_text())["fast"] == first["fast"]


def test_probe_verdict_agrees_with_its_own_measurement(home):
    record = compute.cpu_bf16_probe(refresh=True)
    has_units = any(f in record["cpu_flags"] for f in compute.BF16_CPU_FLAGS)
    if not has_units:
        assert record["fast"] is False and "fp32_s" not in record  # no bf16 units: no timing needed
    else:
        assert record["fast"] == (record["bf16_over_fp32"] <= compute.FAST_RATIO)


def test_without_bf16_flags_the_answer_is_float32(home, monkeypatch):
    monkeypatch.setattr(compute, "cpu_info", lambda: {"model": "a CPU without bf16 units", "flags": ["avx2"]})
    record = compute.measure_cpu_bf16()
    assert record["fast"] is False and "avx512_bf16" in record["reason"]


def test_avx2_kernels_make_auto_resolve_to_float32(tmp_path):
    """A CPU without AVX512-BF16, emulated: with torch held to AVX2 kernels, bf16 matmuls are many times slower,
    and the probe (not the cpuinfo flags, which still say avx512_bf16 here) must see it."""
    code = ("from lorakit.compute import resolve_compute_dtype, cpu_bf16_probe; import json; "
            "p = cpu_bf16_probe(); print(json.dumps({'train': str(resolve_compute_dtype('auto', 'train', 'cpu')), "
            "'quantize': str(resolve_compute_dtype('auto', 'quantize', 'cpu')), 'ratio': p.get('bf16_over_fp32')}))")
    env = dict(os.environ, PYTHONPATH=str(REPO), LORAKIT_HOME=str(tmp_path / "home"), **AVX2_ONLY)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["train"] == out["quantize"] == "torch.float32", out


def test_awq_uses_the_one_resolver(home):
    from lorakit.quantize import awq

    assert not hasattr(awq, "_cpu_has_fast_bf16")
    cpu = torch.device("cpu")
    assert awq.compute_dtype("auto", cpu) == resolve_compute_dtype("auto", "quantize", cpu)
    assert awq.compute_dtype("float32", cpu) == torch.float32
    with pytest.raises(ValueError, match="for AWQ"):
        awq.compute_dtype("float16", cpu)


def test_every_command_has_the_one_compute_dtype_option():
    from lorakit.cli.eval_cmd import eval_, gate
    from lorakit.cli.merge_cmd import merge
    from lorakit.cli.quantize_cmd import quantize
    from lorakit.cli.run_cmd import run
    from lorakit.cli.train_cmd import train

    for command in (train, quantize, eval_, gate, merge, run):
        opts = {o.name: o for o in command.params}
        assert "compute_dtype" in opts, command.name
        assert list(opts["compute_dtype"].type.choices) == list(compute.DTYPE_CHOICES)
        assert "dtype" not in opts and "awq_compute_dtype" not in opts


def test_merge_cli_refuses_bfloat16_before_any_work(tmp_path):
    proc = run_cli("merge", str(tmp_path / "missing-adapter"), "-o", str(tmp_path / "out"), "--compute-dtype",
                   "bfloat16")
    assert proc.returncode == 2
    assert "merge is exact" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
