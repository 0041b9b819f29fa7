"""Merge outputs agree with PEFT itself: merge_and_unload for one adapter, PeftModel logits for merged adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.merge import merge_adapters
from lorakit.models.synthetic import make_random_adapter
from tests.conftest import run_cli
from tests.merge_reference import hand_deltas


@pytest.fixture(scope="module")
def two_adapters(tiny_base, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    return (make_random_adapter(tiny_base, root / "a", r=8, alpha=16, seed=11, model=model),
            make_random_adapter(tiny_base, root / "b", r=16, alpha=8, use_rslora=True, seed=12, model=model,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def test_single_adapter_at_weight_one_equals_merge_and_unload(two_adapters, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge_adapters([two_adapters[1]], [1.0], tmp_path / "m", output_kind="model", base=tiny_base, progress=False)
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), two_adapters[1]).merge_and_unload()
    ours = load_file(out.output / "model.safetensors")
    theirs = peft_merged.state_dict()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= 1e-5


def test_merged_adapter_and_merged_model_give_the_same_logits(two_adapters, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = merge_adapters(two_adapters, [0.6, 0.4], tmp_path / "adapter", base=tiny_base, progress=False)
    model = merge_adapters(two_adapters, [0.6, 0.4], tmp_path / "model", output_kind="model", base=tiny_base,
                           progress=False)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    via_peft = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter.output), ids)
    via_model = _logits(AutoModelForCausalLM.from_pretrained(model.output), ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_base), ids)
    assert (via_peft - via_model).abs().max().item() <= 1e-4
    assert (via_model - base).abs().max().item() > 1e-3, "the merge changed nothing; the test would be vacuous"
    # the merged model folder is a complete HF folder: tokenizer and config came along
    assert (model.output / "tokenizer.json").exists() and (model.output / "config.json").exists()


def test_cli_merge_two_adapters_half_half(two_adapters, tiny_base, tmp_path):
    a, b = two_adapters
    proc = run_cli("merge", str(a), str(b), "--weights", "0.5,0.5", "-o", str(tmp_path / "out"), "--base", str(tiny_base),
                   check=True)
    assert "merged 2 adapters (linear, weights 0.5,0.5)" in proc.stdout and "exact" in proc.stdout
    meta = json.loads((tmp_path / "out" / "lorakit_merge.json").read_text())
    assert meta["weights"] == [0.5, 0.5] and meta["exact"] is True
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "out")


def test_cli_rank_reports_error_and_negative_weight(two_adapters, tiny_base, tmp_path):
    a, b = two_adapters
    proc = run_cli("merge", str(a), str(b), "-w", "1,-0.5", "--rank", "4", "-o", str(tmp_path / "out"), check=True)
    assert "relative Frobenius error" in proc.stdout
    assert "negative weight" in proc.stdout


@pytest.mark.slow
def test_real_model_three_adapters_model_output(real_base, tmp_path):
    """SmolLM2-135M, three adapters of ranks 8/16/8 into the full model: every adapted tensor equals
    W + Σ wᵢ·sᵢ·BᵢAᵢ computed here in float64 from the safetensors files (scalings from the configs by hand,
    not lorakit's delta()), every other tensor is the base's; targeting the tied lm_head is refused."""
    from transformers import AutoModelForCausalLM

    from lorakit.errors import InputError

    model = AutoModelForCausalLM.from_pretrained(real_base)
    targets = ["q_proj", "v_proj", "down_proj"]
    adapters = [make_random_adapter(real_base, tmp_path / n, r=r, alpha=2 * r, seed=s, model=model, target_modules=targets)
                for n, r, s in (("a", 8, 1), ("b", 16, 2), ("c", 8, 3))]
    weights = [0.5, 0.3, -0.2]
    out = merge_adapters(adapters, weights, tmp_path / "m", output_kind="model", progress=False)
    assert out.metadata["base"]["path"] == str(real_base)
    W, M = load_file(real_base / "model.safetensors"), load_file(out.output / "model.safetensors")
    deltas, magnitudes = hand_deltas(adapters), hand_deltas(adapters, absolute=True)
    assert len(deltas) == 30 * len(targets) and set(M) == set(W)
    u, r_max = 2.0**-24, 16  # float32 unit roundoff; a length-r dot product errs by <= r·u·Σ|bₖ||aₖ|
    for name, ds in deltas.items():
        base = W[f"{name}.weight"].double()
        update = sum(w * d for w, d in zip(weights, ds))
        want = base + update
        # lorakit folds in float32: B@A (r terms), the scaling, the weights and the sums each round once more.
        bound = (r_max + 6) * u * (base.abs() + sum(abs(w) * m for w, m in zip(weights, magnitudes[name])))
        excess = ((M[f"{name}.weight"].double() - want).abs() - bound).max().item()
        assert excess <= 0, f"{name}: off by more than float32 rounding"
    for key in set(W) - {f"{n}.weight" for n in deltas}:
        assert torch.equal(M[key], W[key]), f"{key} is not a target but changed"
    tied = make_random_adapter(real_base, tmp_path / "tied", r=4, alpha=8, model=model, target_modules=["lm_head"])
    with pytest.raises(InputError, match="tied to the input embedding"):
        merge_adapters([tied], [1.0], tmp_path / "t", output_kind="model", progress=False)
