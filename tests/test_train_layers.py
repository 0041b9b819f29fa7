"""``--layers``: adapters on some decoder layers only (PEFT's ``layers_to_transform``), on a tiny random Llama.

What the option promises: only the named layers get LoRA weights, the saved folder is a plain PEFT adapter that
PEFT loads to the trained model, the frozen layers below the lowest adapted one take no part in the backward
pass (the reason the option saves time), merging changes only the adapted layers, and a spec the base cannot
take is refused before anything is loaded or written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.data.prep import prepare_dataset
from lorakit.errors import InputError
from lorakit.train import read_train_record, train_adapter
from lorakit.train.options import TrainOptions, layer_indices, parse_layer_spec
from tests.conftest import assert_nothing_written, run_cli

FAST = dict(lr=5e-3, batch_size=4, grad_accum=1, progress=False, checkpoint_every=None, min_loss_drop=None,
            compute_dtype="float32")


@pytest.fixture(scope="module")
def prep(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layers") / "prep"
    prepare_dataset(["bundled:reverse-words"], out, base=tiny_base, max_length=128, progress=False)
    return out


@pytest.mark.parametrize("spec, depth, expected", [
    ("all", 30, None), ("ALL", 4, None), ("top:15", 30, list(range(15, 30))), ("top:2", 2, [0, 1]),
    ("3-5", 30, [3, 4, 5]), ("0-0", 2, [0]), (" top:1 ", 2, [1]),
])
def test_layer_specs_name_the_layers(spec, depth, expected):
    assert layer_indices(spec, depth) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("top:0", "positive whole N"), ("top:", "positive whole N"), ("top:x", "positive whole N"),
    ("5-3", "is not one of"), ("last:3", "is not one of"), ("1,2", "is not one of"), ("", "is not one of"),
])
def test_bad_layer_specs_say_the_forms(spec, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        parse_layer_spec(spec)
    assert "top:N" in str(info.value) and "A-B" in str(info.value)
    with pytest.raises(ValueError):
        TrainOptions(layers=spec)


@pytest.mark.parametrize("spec, fragment", [("top:3", "has 2 decoder layers"), ("1-2", "decoder layers are 0-1")])
def test_layers_the_base_lacks_are_refused_before_loading(prep, tmp_path, spec, fragment):
    with pytest.raises(InputError, match=fragment):
        train_adapter(prep, tmp_path / "out", quant="none", max_steps=1, layers=spec, **FAST)
    assert_nothing_written(tmp_path / "out")


def test_top_layer_adapter_trains_only_it_and_loads_in_peft(tiny_base, prep, tmp_path):
    """The saved adapter holds weights for layer 1 only, reloads in PEFT alone to the model that trained (every
    LoRA weight moved), and the merge leaves layer 0 exactly the base's."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorakit.merge import merge_adapters

    result = train_adapter(prep, tmp_path / "adapter", quant="none", max_steps=3, layers="top:1", **FAST)
    weights = load_file(result.output / "adapter_model.safetensors")
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in weights}
    assert layers == {1}
    kinds = {k.split(".layers.1.")[1].split(".lora_")[0] for k in weights}
    assert kinds == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # all-linear, as on every layer
    assert all(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)  # B starts at 0: it trained
    record = read_train_record(result.output)
    assert record.config["layers"] == "top:1"

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    probe = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
        peft_logits = PeftModel.from_pretrained(base, result.output).eval()(input_ids=probe).logits
    assert (peft_logits - base_logits).abs().max() > 1e-4

    merge_adapters([result.output], [1.0], tmp_path / "merged", output_kind="model", base=tiny_base, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    for name, param in fresh.model.layers[0].named_parameters():
        assert torch.equal(param, dict(merged.model.layers[0].named_parameters())[name]), name
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, peft_logits, rtol=1e-4, atol=1e-4)


def test_layers_below_the_lowest_adapted_one_get_no_backward(tiny_base):
    """Why the option saves time: layer 0's output does not require grad when only layer 1 is adapted, so
    autograd never runs back through it; with every layer adapted it does."""
    from lorakit.train.model import load_for_training

    load = dict(quant="none", device="cpu", r=4, alpha=8, dropout=0.0, targets="all-linear", rslora=False, seed=0,
                gradient_checkpointing=False, compute_dtype="float32")
    seen = {}
    for layers in (None, [1]):
        model = load_for_training(tiny_base, layers=layers, **load).model
        decoder = model.get_base_model().model.layers
        hook = decoder[0].register_forward_hook(lambda m, i, o: seen.__setitem__(
            str(layers), (o[0] if isinstance(o, tuple) else o).requires_grad))
        model(input_ids=torch.arange(3, 20).unsqueeze(0)).logits.sum().backward()
        hook.remove()
    assert seen == {"None": True, "[1]": False}


def test_cli_takes_layers_and_refuses_a_bad_spec(prep, tmp_path):
    proc = run_cli("train", str(prep), "-o", str(tmp_path / "bad"), "--layers", "top:0")
    assert proc.returncode == 2 and "top:N needs a positive whole N" in proc.stderr
    assert not (tmp_path / "bad").exists()
    assert "--layers" in run_cli("train", "--help").stdout


def test_adapters_of_different_layers_are_not_merged(tiny_base, prep, tmp_path):
    """Every adapter of a merge must adapt the same modules: one on the top layer and one on both is refused,
    naming a module of the layer only one of them has, and nothing is written."""
    from lorakit.adapters import IncompatibleAdaptersError
    from lorakit.merge import merge_adapters

    top = train_adapter(prep, tmp_path / "top", quant="none", max_steps=1, layers="top:1", **FAST).output
    every = train_adapter(prep, tmp_path / "all", quant="none", max_steps=1, **FAST).output
    with pytest.raises(IncompatibleAdaptersError, match=r"layers\.0\..* is only in .*--layers"):
        merge_adapters([top, every], [0.5, 0.5], tmp_path / "merged", output_kind="model", base=tiny_base,
                       progress=False)
    assert_nothing_written(tmp_path / "merged")


def test_the_default_keeps_stage_folders_and_checkpoints_of_before_the_option():
    """`all` is left out of the release's train parameters (its adapters' stage folder, so adapters trained before
    the option stay cached) and of the resume fingerprint (written before the option as below); any other spec
    is a new folder and a new fingerprint."""
    import hashlib
    import json
    from dataclasses import asdict

    from flows.config import LoraConfig, ReleaseConfig
    from flows.plan import ReleasePlan
    from lorakit.train import TrainConfig

    default, top = ReleaseConfig(), ReleaseConfig(lora=LoraConfig(layers="top:15"))
    plain, other = (ReleasePlan(c).train(c.datasets[0], "prep") for c in (default, top))
    assert "layers" not in plain["params"] and other["params"]["layers"] == "top:15"
    assert plain["output"] != other["output"]

    config = TrainConfig()
    before = {k: v for k, v in asdict(config).items() if k not in ("checkpoint_every", "min_loss_drop", "layers")}
    blob = json.dumps({"config": before, "prep": "p", "base": "b", "compute_dtype": "float32"}, sort_keys=True)
    assert config.fingerprint("p", "b", "float32") == hashlib.sha256(blob.encode()).hexdigest()
    assert TrainConfig(layers="top:1").fingerprint("p", "b", "float32") != config.fingerprint("p", "b", "float32")
