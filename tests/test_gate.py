"""The validation gate: rejection of a worse candidate (exit 3), identical copies, thresholds, extra checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import assert_nothing_written, make_eval_text, make_prep_dir, run_cli
from lorakit.errors import EXIT_REJECTED, InputError
from lorakit.gate import CheckSpec, check, judge, read_verdict

DOCS = [make_eval_text(70, seed=10), make_eval_text(70, seed=11)]
SEQ = ["--seq-len", "64"]


def _perturbed(tiny_base, path, std: float, seed: int = 0):
    """A copy of the tiny base with Gaussian noise of ``std`` added to every weight matrix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_prep_dir(tmp_path_factory.mktemp("data") / "prep", DOCS)


@pytest.fixture(scope="module")
def noisy(tiny_base, tmp_path_factory):
    return _perturbed(tiny_base, tmp_path_factory.mktemp("models") / "noisy", std=0.2)


@pytest.fixture(scope="module")
def slightly_noisy(tiny_base, tmp_path_factory):
    return _perturbed(tiny_base, tmp_path_factory.mktemp("models") / "slightly", std=0.05, seed=1)


def test_judge_boundary_passes():
    d, ok = judge(10.0, 10.5, 0.05)  # exactly 5% worse; the float ratio is 0.05000000000000004
    assert ok and d == 10.5 / 10.0 - 1
    assert judge(10.0, 10.5, 0.05 - 1e-9) == (d, False)
    assert judge(10.0, 10.5000001, 0.05)[1] is False
    assert judge(10.0, 9.0, 0.0)[1]  # a better candidate always passes


def test_noisy_candidate_is_rejected_with_exit_3(tiny_base, noisy, data, tmp_path):
    out = tmp_path / "verdict"
    proc = run_cli("gate", "--baseline", str(tiny_base), "--candidate", str(noisy), "--data", str(data), *SEQ,
                   "-o", str(out))
    assert proc.returncode == EXIT_REJECTED, proc.stderr
    assert "REJECTED" in proc.stdout and "FAIL" in proc.stdout
    verdict = json.loads((out / "gate.json").read_text())
    # lorakit gate judges as the release gate does: general text is checked by default, and the noise loses it too
    assert verdict["passed"] is False and verdict["failed_checks"] == ["primary", "general text"]
    assert verdict["degradation"] > 0.05
    assert verdict["checks"][0]["method"]["seq_len"] == 64
    assert verdict["params"]["dtype"] == "auto" and verdict["params"]["compute_dtype"] == "float32"
    assert "REJECTED" in (out / "gate.md").read_text()
    assert (out / "gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_copy_passes_with_zero_degradation(tiny_base, data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    out = tmp_path / "verdict"
    proc = run_cli("gate", "--baseline", str(tiny_base), "--candidate", str(copy), "--data", str(data), *SEQ,
                   "--max-degradation", "0", "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "PASSED"
    verdict = read_verdict(out)
    assert verdict.passed and verdict.degradation == 0.0
    assert verdict.checks[0].baseline_ppl == verdict.checks[0].candidate_ppl
    assert verdict.baseline["digest"]["folder"] == verdict.candidate["digest"]["folder"]


def test_threshold_is_honoured_at_the_boundary(tiny_base, slightly_noisy, data):
    ppl_only = dict(seq_len=64, max_kl=None, progress=False)  # the perplexity rule alone (KL: its own tests)
    first = check(tiny_base, slightly_noisy, data, max_degradation=1.0, **ppl_only)
    d = first.degradation
    assert 0 < d < 1
    at = check(tiny_base, slightly_noisy, data, max_degradation=d, **ppl_only)
    assert at.degradation == d and at.passed  # exactly at the threshold passes
    below = check(tiny_base, slightly_noisy, data, max_degradation=d - 1e-9, **ppl_only)
    assert below.degradation == d and not below.passed


def test_extra_checks_each_with_their_own_threshold(tiny_base, noisy, data, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text(make_eval_text(150, seed=99))
    task = make_prep_dir(tmp_path / "task", [make_eval_text(100, seed=5)])
    verdict = check(tiny_base, noisy, data, max_degradation=1e6, max_kl=None, seq_len=64, progress=False,
                    output=tmp_path / "v",
                    extra_checks=[CheckSpec("task-a", task, 0.01, "task"), CheckSpec("general", general, 1e6, "general")])
    by_name = {c.name: c for c in verdict.checks}
    assert [c.name for c in verdict.checks] == ["primary", "task-a", "general"]
    assert by_name["primary"].passed and by_name["general"].passed and not by_name["task-a"].passed
    assert not verdict.passed and verdict.metadata["failed_checks"] == ["task-a"]
    assert by_name["general"].method["source_kind"] == "text" and by_name["task-a"].method["source_kind"] == "prep"
    stored = read_verdict(tmp_path / "v")
    assert stored.to_dict() == verdict.to_dict()
    md = (tmp_path / "v" / "gate.md").read_text()
    assert "task-a" in md and "general" in md and "**FAIL**" in md


def test_bad_input_exits_2_and_writes_nothing(tiny_base, data, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "othertok"
    shutil.copytree(tiny_base, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(other)
    out = tmp_path / "verdict"
    proc = run_cli("gate", "--baseline", str(tiny_base), "--candidate", str(other), "--data", str(data), *SEQ,
                   "-o", str(out))
    assert proc.returncode == 2 and "different tokenizer" in proc.stderr
    assert_nothing_written(out)
    # In-process (fast) for the other bad inputs: each is an InputError before any weights load.
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="holds no text"):
        check(tiny_base, tiny_base, empty, seq_len=64, output=out, progress=False)
    with pytest.raises(InputError, match="shorter than one window"):
        check(tiny_base, tiny_base, data, seq_len=4096, output=out, progress=False)
    with pytest.raises(InputError, match="finite fraction"):
        check(tiny_base, tiny_base, data, max_degradation=-0.1, seq_len=64, output=out, progress=False)
    with pytest.raises(InputError, match="check 'x'"):
        check(tiny_base, tiny_base, data, seq_len=64, output=out, progress=False,
              extra_checks=[CheckSpec("x", tmp_path / "missing.txt", 0.1)])
    assert_nothing_written(out)
