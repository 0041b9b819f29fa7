"""Every input the merge cannot handle correctly is refused with an actionable message, writing nothing."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lorakit.errors import InputError
from lorakit.merge import merge_adapters
from lorakit.models.synthetic import make_random_adapter
from lorakit.models.tiny import make_tiny_llama
from tests.conftest import assert_nothing_written, run_cli


@pytest.fixture(scope="module")
def pair(tiny_base, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("refusals")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    a = make_random_adapter(tiny_base, root / "a", r=4, alpha=8, seed=1, model=model)
    b = make_random_adapter(tiny_base, root / "b", r=4, alpha=8, seed=2, model=model)
    qv = make_random_adapter(tiny_base, root / "qv", r=4, alpha=8, seed=3, model=model, target_modules=["q_proj", "v_proj"])
    return a, b, qv


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _refused(tmp_path: Path, match: str, adapters, weights, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        merge_adapters(adapters, weights, out, progress=False, **kwargs)
    assert_nothing_written(out)


def test_weights_count(pair, tmp_path):
    _refused(tmp_path, r"got 3 weight\(s\) for 2 adapter\(s\); pass one weight per adapter", pair[:2], [0.3, 0.3, 0.4])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(pair, tmp_path, bad):
    _refused(tmp_path, r"weight 2 is .*; weights must be finite", pair[:2], [0.5, bad])


def test_different_base_models(pair, tmp_path):
    other = _copy(pair[1], tmp_path / "other")
    _edit_config(other, base_model_name_or_path="some-org/another-model")
    _refused(tmp_path, r"different base models.*--ignore-base-name", [pair[0], other], [0.5, 0.5])


def test_different_target_modules(pair, tmp_path):
    _refused(tmp_path, r"adapters target different modules .*same target modules", [pair[0], pair[2]], [0.5, 0.5])


def test_different_shapes(pair, tmp_path):
    wide = make_tiny_llama(tmp_path / "wide", hidden_size=64, intermediate_size=128, seed=4)
    other = make_random_adapter(wide, tmp_path / "wide-adapter", r=4, alpha=8, seed=5)
    _edit_config(other, base_model_name_or_path=json.loads((pair[0] / "adapter_config.json").read_text())["base_model_name_or_path"])
    _refused(tmp_path, r"updates a \[\d+, \d+\] weight in .* different architectures", [pair[0], other], [0.5, 0.5])


def test_wrong_base_model_for_model_output(pair, tmp_path):
    wide = make_tiny_llama(tmp_path / "wide", hidden_size=64, intermediate_size=128, seed=4)
    _refused(tmp_path, r"expects a \[\d+, \d+\] weight at .* pass --base with the model the adapters were trained on",
             pair[:2], [0.5, 0.5], output_kind="model", base=wide)


def test_nan_tensor(pair, tmp_path):
    broken = _copy(pair[1], tmp_path / "nan")
    t = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in t if "lora_B" in k)
    t[key][0, 0] = float("nan")
    save_file(t, broken / "adapter_model.safetensors")
    _refused(tmp_path, r"contains NaN or Inf values", [pair[0], broken], [0.5, 0.5])


@pytest.mark.parametrize("field,match", [("use_dora", "DoRA adapter"), ("lora_bias", "trains LoRA biases")])
def test_lora_variants_refused(pair, tmp_path, field, match):
    variant = _copy(pair[1], tmp_path / field)
    _edit_config(variant, **{field: True})
    _refused(tmp_path, match, [pair[0], variant], [0.5, 0.5])


def test_rank_mismatch_between_config_and_weights(pair, tmp_path):
    broken = _copy(pair[1], tmp_path / "rank")
    _edit_config(broken, r=8)
    _refused(tmp_path, r"has rank 4/4 in its weights but r=8", [pair[0], broken], [0.5, 0.5])


def test_tied_embedding_target(tiny_tied_base, tmp_path):
    a = make_random_adapter(tiny_tied_base, tmp_path / "tied", r=4, alpha=8, seed=1,
                            target_modules=["q_proj", "lm_head"])
    _refused(tmp_path, r"targets lm_head, which is tied to the input embedding", [a], [1.0],
             output_kind="model", base=tiny_tied_base)
    _refused(tmp_path, r"tied to the input embedding", [a], [1.0])  # adapter output checks the recorded base too


def test_missing_adapter(pair, tmp_path):
    _refused(tmp_path, r"does not exist or is not a folder", [pair[0], tmp_path / "nope"], [0.5, 0.5])


def test_corrupt_config(pair, tmp_path):
    broken = _copy(pair[1], tmp_path / "cfg")
    (broken / "adapter_config.json").write_text('{"r": 4, "lora_al')
    _refused(tmp_path, r"not valid JSON .* truncated or corrupt", [pair[0], broken], [0.5, 0.5])


def test_truncated_weights(pair, tmp_path):
    broken = _copy(pair[1], tmp_path / "trunc")
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _refused(tmp_path, r"truncated", [pair[0], broken], [0.5, 0.5])


def test_truncated_base_shard(pair, tiny_base, tmp_path):
    base = _copy(tiny_base, tmp_path / "base")
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:-1000])
    _refused(tmp_path, r"truncated", pair[:2], [0.5, 0.5], output_kind="model", base=base)


def test_method_parameters(pair, tmp_path):
    _refused(tmp_path, r"method ties needs --density", pair[:2], [0.5, 0.5], method="ties", output_kind="model")
    _refused(tmp_path, r"--density must be in \(0, 1\]", pair[:2], [0.5, 0.5], method="ties", density=1.5,
             output_kind="model")
    _refused(tmp_path, r"ties produces full-rank updates; pass --rank K", pair[:2], [0.5, 0.5], method="ties",
             density=0.5)
    _refused(tmp_path, r"method linear takes no --density", pair[:2], [0.5, 0.5], density=0.5)


def test_existing_output_needs_force(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="already exists; .* --force"):
        merge_adapters(pair[:2], [0.5, 0.5], out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    merge_adapters(pair[:2], [0.5, 0.5], out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()


def test_interrupted_merge_leaves_nothing(pair, tiny_base, tmp_path, monkeypatch):
    import lorakit.merge.core as core

    calls = {"n": 0}
    real = core.overwrite_tensor

    def interrupt_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "overwrite_tensor", interrupt_after_three)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge_adapters(pair[:2], [0.5, 0.5], out, output_kind="model", base=tiny_base, progress=False)
    assert_nothing_written(out)


def test_disk_full_is_reported_and_leaves_nothing(pair, tiny_base, tmp_path, monkeypatch):
    import lorakit.merge.core as core

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(core, "copy_with_digest", full)
    _refused(tmp_path, r"no space left on the device while writing .*free some space", pair[:2], [0.5, 0.5],
             output_kind="model", base=tiny_base)


def test_cli_refusal_exit_code_and_one_line(pair, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("merge", str(pair[0]), str(pair[1]), "--weights", "0.5", "-o", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: got 1 weight(s) for 2 adapter(s)")
    assert "Traceback" not in proc.stderr
    assert_nothing_written(out)
    proc = run_cli("merge", str(pair[0]), "--weights", "abc", "-o", str(out))
    assert proc.returncode == 2 and "'abc' is not a comma-separated list of float values" in proc.stderr


def test_output_may_not_be_an_input(pair, tmp_path):
    from lorakit.io.digests import folder_digest

    before = folder_digest(pair[0])
    with pytest.raises(InputError, match="is one of the inputs"):
        merge_adapters(pair[:2], [0.5, 0.5], pair[0], force=True, progress=False)
    assert folder_digest(pair[0]) == before
