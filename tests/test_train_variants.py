"""Training variants on a tiny random Llama: LoRA+ learning rates, LoftQ/PiSSA initialisation and conversion, the
choice recorded, and the combinations a base cannot take refused before anything loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lorakit.data.prep import prepare_dataset
from lorakit.errors import InputError
from lorakit.train import TrainConfig, read_train_record, train_adapter
from lorakit.train import variants
from lorakit.train.batches import Schedule, load_rows, model_inputs
from lorakit.train.model import load_for_training
from tests.conftest import assert_nothing_written, run_cli

FAST = dict(lr=5e-3, batch_size=4, grad_accum=1, progress=False, checkpoint_every=None, min_loss_drop=None)
# float32 compute: the equalities below are checked at fp32 precision, whatever this CPU's bf16 speed
LOAD = dict(compute_dtype="float32", r=4, alpha=8, dropout=0.0, targets="all-linear", rslora=False, seed=0,
            gradient_checkpointing=False)


@pytest.fixture(scope="module")
def prep(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("variants") / "prep"
    prepare_dataset(["bundled:reverse-words"], out, base=tiny_base, max_length=128, progress=False)
    return out


def _train_steps(model, prep: Path, steps: int, lr: float = 1e-2, ratio: float | None = None) -> torch.Tensor:
    """A few real optimizer steps with the loop's optimizer; returns a fixed probe batch's input ids."""
    rows = load_rows(prep, "train")
    schedule = Schedule(len(rows), 4, 1, 0)
    optimizer = variants.build_optimizer(model, lr, 0.0, ratio)
    model.train()
    for step in range(steps):
        idx = schedule.step_microbatches(step)[0]
        inputs = model_inputs(rows, idx, "cpu")
        out = model(**inputs, labels=inputs["input_ids"], use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return rows.input_ids[:2, :48]


def test_lora_plus_gives_b_a_higher_learning_rate(tiny_base):
    model = load_for_training(tiny_base, quant="none", device="cpu", **LOAD).model
    opt = variants.build_optimizer(model, 2e-4, 0.0, 16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: g for g in opt.param_groups}
    assert by_group["B"]["lr"] == pytest.approx(16 * by_group["A"]["lr"]) and by_group["A"]["lr"] == 2e-4
    assert all(".lora_B." in names[id(p)] for p in by_group["B"]["params"])
    assert all(".lora_B." not in names[id(p)] for p in by_group["A"]["params"])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(by_group["A"]["params"]) + len(by_group["B"]["params"]) == n_trainable
    plain = variants.build_optimizer(model, 2e-4, 0.0, None)
    assert len(plain.param_groups) == 1


def test_lora_plus_run_steps_b_faster(prep, tmp_path):
    """In a real run the loop keeps the ratio at every scheduled lr: B moves further than under plain LoRA."""
    a = train_adapter(prep, tmp_path / "plain", quant="none", max_steps=3, lora_plus_ratio=None, **FAST)
    b = train_adapter(prep, tmp_path / "plus", quant="none", max_steps=3, lora_plus_ratio=16, **FAST)
    from safetensors.torch import load_file

    wa, wb = load_file(a.output / "adapter_model.safetensors"), load_file(b.output / "adapter_model.safetensors")
    key_b = next(k for k in wa if k.endswith("lora_B.weight"))
    assert wb[key_b].norm() > 2 * wa[key_b].norm()
    rec = read_train_record(b.output)
    assert rec.config["lora_plus_ratio"] == 16.0 and rec.config["variant"] == "lora" and rec.config["init"] == "default"


def test_variant_run_resumes_exactly(prep, tmp_path):
    """PiSSA (initial factors re-derived on reload) with LoRA+ (two param groups): resumed == uninterrupted."""
    from lorakit.adapters import load_adapter
    from lorakit.train.checkpoint import checkpoint_root

    kw = dict(FAST, quant="none", init="pissa", lora_plus_ratio=4, max_steps=4, r=4, alpha=8)
    kw.pop("checkpoint_every")
    full = train_adapter(prep, tmp_path / "full", checkpoint_every=None, **kw)

    def interrupt(entry: dict) -> None:
        if entry["step"] == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_adapter(prep, out, checkpoint_every=2, on_step=interrupt, **kw)
    assert (checkpoint_root(out) / "step-0000002").is_dir()
    with pytest.raises(InputError, match="other data or settings"):
        train_adapter(prep, out, checkpoint_every=2, resume=True, **dict(kw, lora_plus_ratio=8))
    resumed = train_adapter(prep, out, checkpoint_every=2, resume=True, **kw)
    assert resumed.metadata["resumed_from_step"] == 2
    a, b = load_adapter(full.output), load_adapter(out)
    assert max((a.modules[n].delta() - b.modules[n].delta()).abs().max().item() for n in a.modules) < 1e-5


def test_choice_is_in_the_resume_fingerprint():
    base = TrainConfig().fingerprint("p", "b", "float32")
    for change in (dict(variant="dora"), dict(init="loftq"), dict(lora_plus_ratio=16.0)):
        assert TrainConfig(**change).fingerprint("p", "b", "float32") != base, change


def test_loftq_init_cancels_the_nf4_error_optimally(tiny_base):
    """scaling·B·A is the best rank-r approximation of W − dequant(Q): the remaining error is the float64 tail of
    the residual's singular values (Eckart–Young), and smaller than without the adapter."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    from lorakit.io.safetensors_stream import load_file

    model = load_for_training(tiny_base, quant="nf4", device="cpu", init="loftq", **LOAD).model
    original = load_file(tiny_base / "model.safetensors")
    checked = 0
    for path, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        w = original[path.removeprefix("base_model.model.") + ".weight"].double()
        q = module.get_base_layer().weight
        dq = bnb.functional.dequantize_4bit(q.data, q.quant_state).double()
        delta = (module.scaling["default"] * module.lora_B["default"].weight.double()
                 @ module.lora_A["default"].weight.double()).detach()
        tail = torch.linalg.svdvals(w - dq)[4:].square().sum().sqrt()
        err = (w - dq - delta).norm()
        assert err < (w - dq).norm()
        assert abs(float(err - tail)) <= 1e-5 * float((w - dq).norm()), path
        checked += 1
    assert checked == 14


def test_loftq_with_dora_starts_at_the_loftq_model(tiny_base):
    """DoRA's magnitude is re-initialised after the LoftQ factors: m = ‖dequant(Q) + s·B·A‖ per row, so the
    starting weight m·V/‖V‖ is V = dequant(Q) + s·B·A, the plain LoftQ start."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    model = load_for_training(tiny_base, quant="nf4", device="cpu", init="loftq", variant="dora", **LOAD).model
    with torch.no_grad():
        for module in (m for m in model.modules() if isinstance(m, Linear4bit)):
            q = module.get_base_layer().weight
            v = (bnb.functional.dequantize_4bit(q.data, q.quant_state).double() + module.scaling["default"]
                 * module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double())
            m = module.lora_magnitude_vector["default"].weight.double()
            assert torch.allclose(m, v.norm(dim=1), rtol=1e-6)


def test_pissa_converted_adapter_on_original_base_equals_trained_model(tiny_base, prep, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for init in ("pissa", "olora"):
        model = load_for_training(tiny_base, quant="none", device="cpu", init=init, **LOAD).model
        initial = variants.initial_state(model, init)
        probe = _train_steps(model, prep, steps=3)
        model.eval()
        with torch.no_grad():
            trained = model(input_ids=probe).logits
        variants.save_adapter(model, tmp_path / init, init, initial)
        fresh = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        converted = PeftModel.from_pretrained(fresh, tmp_path / init).eval()
        assert converted.peft_config["default"].r == 8  # rank 2r: trained factors minus the initial ones
        with torch.no_grad():
            got = converted(input_ids=probe).logits
        assert (got - trained).abs().max() <= 1e-4, init
        # Training moved the adapter: the equality is not a base-vs-base triviality.
        with torch.no_grad():
            base_logits = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)(input_ids=probe).logits
        assert (base_logits - trained).abs().max() > 1e-3


@pytest.mark.parametrize("kw, fragment", [
    (dict(quant="none", init="loftq"), "--init loftq"),
    (dict(quant="nf4", init="pissa"), "--init pissa"),
    (dict(quant="nf4", init="olora"), "--init olora"),
    (dict(quant="none", init="pissa", variant="dora"), "--variant dora with --init pissa"),
    (dict(quant="none", variant="vera"), "--variant"),
    (dict(quant="none", init="gaussian"), "--init"),
    (dict(quant="none", lora_plus_ratio=0.0), "--lora-plus-ratio"),
])
def test_bad_variant_refused_before_loading(prep, tmp_path, kw, fragment):
    with pytest.raises(InputError, match=fragment):
        train_adapter(prep, tmp_path / "out", max_steps=1, **FAST, **kw)
    assert_nothing_written(tmp_path / "out")


def test_dora_on_quantized_conv1d_refused(tiny_base, prep, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    from lorakit.models.folder import read_model_config

    GPT2LMHeadModel(GPT2Config(vocab_size=read_model_config(tiny_base)["vocab_size"], n_embd=32, n_layer=1, n_head=2,
                               tie_word_embeddings=False)).save_pretrained(gpt2)
    for f in tiny_base.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy2(f, gpt2 / f.name)
    with pytest.raises(InputError, match="Conv1D"):
        train_adapter(prep, tmp_path / "out", base=gpt2, quant="nf4", variant="dora", target="c_attn", max_steps=1,
                      **FAST)
    assert_nothing_written(tmp_path / "out")


def test_cli_train_variant_flags(prep, tmp_path):
    proc = run_cli("train", str(prep), "-o", str(tmp_path / "bad"), "--quant", "none", "--init", "loftq")
    assert proc.returncode == 2 and "init 'loftq'" in proc.stderr and "quant 'nf4'" in proc.stderr
    help_text = run_cli("train", "--help").stdout
    assert "--variant" in help_text and "--lora-plus-ratio" in help_text


def test_run_config_keys_reach_train_and_pairs_are_checked():
    import inspect

    from pydantic import ValidationError

    from flows.config import LoraConfig, MergeConfig, ReleaseConfig

    assert set(LoraConfig.model_fields) <= set(inspect.signature(train_adapter).parameters)
    for bad in (dict(init="pissa", quant="nf4"), dict(init="loftq", quant="none"), dict(lora_plus_ratio=0),
                dict(init="olora", quant="none", variant="dora")):
        with pytest.raises(ValidationError):
            LoraConfig(**bad)
    with pytest.raises(ValidationError, match="merge.loftq_base"):
        ReleaseConfig(lora=LoraConfig(init="loftq"))
    with pytest.raises(ValidationError, match="merge.loftq_base"):
        ReleaseConfig(merge=MergeConfig(loftq_base="original"))
    ok = ReleaseConfig(lora=LoraConfig(init="loftq", variant="dora", lora_plus_ratio=16),
                       merge=MergeConfig(loftq_base="dequantized"))
    assert ok.lora.variant == "dora"
