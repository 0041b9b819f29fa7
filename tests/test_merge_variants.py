"""Merging what the training variants produce, on adapters really trained (a few steps) on a tiny random Llama.

The reference for each merged model is PEFT's own model with that single adapter (DoRA forward, converted
PiSSA/OLoRA factors, LoftQ on the dequantized NF4 base), never lorakit's merge code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorakit.data.prep import prepare_dataset
from lorakit.errors import InputError
from lorakit.merge import merge_adapters
from lorakit.train import train_adapter
from lorakit.train.batches import load_rows
from tests.conftest import assert_nothing_written, run_cli

FAST = dict(lr=5e-3, batch_size=4, grad_accum=1, progress=False, checkpoint_every=None, min_loss_drop=None, r=4, alpha=8,
            max_steps=4)
VARIANTS = {
    "lora_plus": dict(quant="none", lora_plus_ratio=16),
    "dora": dict(quant="none", variant="dora"),
    "dora_nf4": dict(quant="nf4", variant="dora"),
    "pissa": dict(quant="none", init="pissa"),
    "olora": dict(quant="none", init="olora"),
    "loftq": dict(quant="nf4", init="loftq"),
    "loftq_dora": dict(quant="nf4", init="loftq", variant="dora"),
}


@pytest.fixture(scope="module")
def prep(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merge-variants") / "prep"
    prepare_dataset(["bundled:reverse-words"], out, base=tiny_base, max_length=128, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(prep, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variant-adapters")
    return {name: train_adapter(prep, root / name, **FAST, **kw).output for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def probe(prep) -> torch.Tensor:
    return load_rows(prep, "train").input_ids[:2, :48]


def _fp_base(tiny_base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)


def _dequantized_base(tiny_base: Path):
    """The base the NF4 training saw, independently: the training loader's 4-bit layers, dequantized."""
    import bitsandbytes as bnb

    from lorakit.train.model import load_for_training

    q = load_for_training(tiny_base, quant="nf4", device="cpu", r=4, alpha=8, dropout=0.0, targets="all-linear",
                          rslora=False, seed=0, gradient_checkpointing=False).model
    model = _fp_base(tiny_base)
    params = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = m.weight
                key = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"
                params[key].copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state))
                n += 1
    assert n == 14
    return model


def _logits(model, probe) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=probe).logits.double()


def _peft_logits(base_model, adapter: Path, probe) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(base_model, adapter), probe)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_merged_model_equals_peft_model_with_the_adapter(trained, tiny_base, probe, tmp_path, name):
    from transformers import AutoModelForCausalLM

    kw = {"loftq_base": "dequantized"} if name.startswith("loftq") else {}
    res = merge_adapters([trained[name]], [1.0], tmp_path / "m", output_kind="model", progress=False, **kw)
    assert res.exact
    merged = _logits(AutoModelForCausalLM.from_pretrained(res.output, dtype=torch.float32), probe)
    base = _dequantized_base(tiny_base) if name.startswith("loftq") else _fp_base(tiny_base)
    ref = _peft_logits(base, trained[name], probe)
    assert (merged - ref).abs().max() <= 1e-4, name
    assert (ref - _logits(_fp_base(tiny_base), probe)).abs().max() > 1e-3  # the adapter does change the model
    meta = json.loads((res.output / "lorakit_merge.json").read_text())
    assert meta["inputs"][0]["variant"] == ("dora" if "dora" in name else "lora")


def test_dora_linear_merge_is_the_weighted_sum_of_materialised_updates(trained, tiny_base, tmp_path):
    """W + Σ wᵢ(W'ᵢ − W) with W'ᵢ from PEFT's own merge_and_unload, in float64."""
    from peft import PeftModel
    from safetensors.torch import load_file

    names, weights = ["dora", "lora_plus"], [0.7, -0.4]
    res = merge_adapters([trained[n] for n in names], weights, tmp_path / "m", output_kind="model", progress=False)
    got = load_file(res.output / "model.safetensors")
    base = {k: v.double() for k, v in _fp_base(tiny_base).state_dict().items()}
    ref = {k: v.clone() for k, v in base.items()}
    for n, w in zip(names, weights):
        merged_i = PeftModel.from_pretrained(_fp_base(tiny_base), trained[n]).merge_and_unload().state_dict()
        for k in ref:
            ref[k] += w * (merged_i[k].double() - base[k])
    worst = max(float((got[k].double() - ref[k]).abs().max()) for k in ref if "proj" in k)
    assert worst <= 1e-5
    assert max(float((got[k].double() - base[k]).abs().max()) for k in ref if "proj" in k) > 1e-4


def test_dora_adapter_output_needs_rank_and_reports_error(trained, tiny_base, probe, tmp_path):
    with pytest.raises(InputError, match="DoRA adapter.*--rank K"):
        merge_adapters([trained["dora"]], [1.0], tmp_path / "a", progress=False)
    assert_nothing_written(tmp_path / "a")
    low = merge_adapters([trained["dora"]], [1.0], tmp_path / "low", rank=2, progress=False)
    assert low.relative_error > 1e-3 and not low.exact
    full = merge_adapters([trained["dora"]], [1.0], tmp_path / "full", rank=128, progress=False)  # = min(out, in)
    assert full.relative_error < 1e-6
    ref = _peft_logits(_fp_base(tiny_base), trained["dora"], probe)
    got = _peft_logits(_fp_base(tiny_base), full.output, probe)
    assert (got - ref).abs().max() <= 1e-4


def test_loftq_into_original_base_refused_unless_asked(trained, tiny_base, probe, tmp_path):
    with pytest.raises(InputError, match="LoftQ.*--loftq-base dequantized"):
        merge_adapters([trained["loftq"]], [1.0], tmp_path / "m", output_kind="model", progress=False)
    assert_nothing_written(tmp_path / "m")
    with pytest.raises(InputError, match="applies to LoftQ adapters"):
        merge_adapters([trained["dora"]], [1.0], tmp_path / "m", output_kind="model", loftq_base="original",
                       progress=False)
    res = merge_adapters([trained["loftq"]], [1.0], tmp_path / "orig", output_kind="model", loftq_base="original",
                         progress=False)
    assert res.metadata["loftq_base"] == "original"
    from transformers import AutoModelForCausalLM

    # Why it is refused: on the original weights the adapter no longer gives the model that was trained.
    trained_model = _peft_logits(_dequantized_base(tiny_base), trained["loftq"], probe)
    on_original = _logits(AutoModelForCausalLM.from_pretrained(res.output, dtype=torch.float32), probe)
    assert (on_original - trained_model).abs().max() > 1e-3
    proc = run_cli("merge", str(trained["loftq"]), "-o", str(tmp_path / "cli"), "--output-kind", "model")
    assert proc.returncode == 2 and "--loftq-base" in proc.stderr


def test_dora_portable_export_refused(trained, tmp_path):
    from lorakit.export.portable import export_portable_adapter

    with pytest.raises(InputError, match="DoRA adapter.*no portable LoRA form"):
        export_portable_adapter(trained["dora"], tmp_path / "p")
    assert_nothing_written(tmp_path / "p")


def test_unconverted_pissa_adapter_refused(trained, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(trained["pissa"], raw)
    cfg = json.loads((raw / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (raw / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="unconverted.*path_initial_model_for_weight_conversion"):
        merge_adapters([raw], [1.0], tmp_path / "m", progress=False)
    assert_nothing_written(tmp_path / "m")


def test_pissa_adapter_is_saved_converted(trained):
    cfg = json.loads((trained["pissa"] / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
