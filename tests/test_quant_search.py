"""lorakit quantize --target-degradation: the bounded search, mixed precision, and how its pick is loaded.

A random tiny model is useless here (4-bit rounding can *lower* its perplexity), so the module trains one for
60 steps (~3 s) on the test corpus: then quantization costs a small, positive, measurable perplexity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_nothing_written
from tests.test_quantize import make_prep
from lorakit.errors import InputError
from lorakit.evaluate import perplexity
from lorakit.quantize import quantize_model, read_quant_meta
from lorakit.quantize.mixed import predicted_size_bytes
from lorakit.quantize.search import SearchSpace, reproduce_trial, search_quantization

SMALL = dict(seq_len=64, eval_seq_len=64)
SPACE = dict(n_samples=(8,), group_sizes=(128, 32))


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    return make_prep(tmp_path_factory.mktemp("prep") / "prep")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prep) -> Path:
    """The tiny Llama after 60 seeded AdamW steps on the prep's train texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data.splits import read_texts
    from lorakit.models.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("trained")
    src = make_tiny_llama(root / "random", seed=0)
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(src))
    ids = torch.tensor([i for t in read_texts(prep, "train") for i in tok(t, add_special_tokens=False)["input_ids"]])
    blocks = ids[: len(ids) // 64 * 64].view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        batch = blocks[torch.randint(0, blocks.shape[0], (8,))]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    return root / "tiny"


@pytest.fixture(scope="module")
def found(tmp_path_factory, trained, prep):
    """A search with a reachable target (0.1%) over GPTQ and AWQ."""
    out = tmp_path_factory.mktemp("search") / "found"
    return search_quantization(trained, out, calib=prep, target_degradation=0.001, space=SearchSpace(**SPACE),
                               calib_general=None, progress=False, **SMALL)


@pytest.fixture(scope="module")
def impossible(tmp_path_factory, trained, prep):
    """Zero degradation at 4 bits: AWQ uniform, then greedy fp16 modules; nothing can pass.

    Calibrated on 2 samples of the tasks' text only: with 8 or more, AWQ on this tiny, undertrained model lands a hair *below* its fp
    perplexity (-0.14%, measured), so 0% was reachable; with 2 it stays above (+0.35% uniform, +0.30% mixed)."""
    out = tmp_path_factory.mktemp("search") / "impossible"
    space = SearchSpace(methods=("awq",), n_samples=(2,), group_sizes=(128,), mixed_steps=(2,))
    return search_quantization(trained, out, calib=prep, target_degradation=0.0, space=space, calib_general=None,
                               progress=False, **SMALL)


def test_search_finds_the_smallest_passing_configuration(found, prep):
    search = found.metadata["search"]
    trials = search["trials"]
    assert search["passed"] and "meets the target" in search["message"]
    chosen = trials[search["chosen_trial"]]
    passing = [t for t in trials if t["passed"]]
    assert chosen["passed"] and chosen["degradation"] <= 0.001
    assert chosen["size_bytes"] == min(t["size_bytes"] for t in passing if t["plain_transformers"])
    assert all(not t["passed"] for t in trials if t["index"] < chosen["index"])  # it stopped at the first pass
    for t in trials:  # every trial has what the report needs, and the size prediction that orders the search holds
        assert t["ppl"] > 0 and t["quantize_s"] > 0 and t["loaders"] and t["error"] is None
        assert t["degradation"] == pytest.approx(t["ppl"] / search["baseline"]["ppl"] - 1)
        assert abs(t["size_bytes"] / t["predicted_size_bytes"] - 1) < 0.05
    # The written folder is the chosen trial: its perplexity, measured again, is the recorded one.
    again = perplexity(found.output, prep, seq_len=64, quant_path="dequantized", progress=False)
    assert again.ppl == pytest.approx(chosen["ppl"], rel=1e-9)
    meta = read_quant_meta(found.output)
    assert meta.search["chosen_trial"] == chosen["index"] and "from_pretrained" in meta.how_to_load
    assert not list(found.output.parent.glob(".found.search-*"))  # trial folders are cleaned up


def test_search_reports_failure_when_the_target_is_impossible(impossible):
    search = impossible.metadata["search"]
    assert not search["passed"] and search["message"].startswith("NO configuration met")
    assert all(t["degradation"] > 0 and not t["passed"] for t in search["trials"])
    assert [t["phase"] for t in search["trials"]] == ["uniform", "mixed"]
    chosen = search["trials"][search["chosen_trial"]]
    assert chosen["degradation"] == min(t["degradation"] for t in search["trials"])  # the best is written
    from lorakit.gate.core import judge

    assert judge(search["baseline"]["ppl"], chosen["ppl"], 0.0)[1] is False  # so the gate rejects it


def test_greedy_mixed_precision_keeps_the_most_sensitive_modules_and_stays_transformers_loadable(impossible):
    from transformers import AutoModelForCausalLM

    search = impossible.metadata["search"]
    mixed = search["trials"][1]
    ranking = [m["module"] for m in search["sensitivity"]["awq"]["top"]]
    assert sorted(mixed["params"]["module_bits"]) == sorted(ranking[:2])
    assert set(mixed["params"]["module_bits"].values()) == {16} and mixed["plain_transformers"]
    assert mixed["size_bytes"] > search["trials"][0]["size_bytes"]
    # Re-create the mixed checkpoint and load it the documented ways: plain transformers and lorakit's path.
    folder = impossible.output.parent / "mixed"
    reproduce_trial(impossible.metadata["input"]["path"], folder, mixed, calib=search["calibration"])
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert set(ranking[:2]) <= set(qc["modules_to_not_convert"])
    ids = torch.randint(4, 250, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        assert type(plain.get_submodule(ranking[0])) is torch.nn.Linear  # kept, not an AWQ layer
        from lorakit.evaluate import describe_model, load_eval_model

        dense = load_eval_model(describe_model(folder), quant_path="dequantized", device="cpu").model
        a, b = plain(ids).logits.float(), dense(ids).logits.float()
    assert (a - b).abs().max() < 2e-2 * a.abs().max()


def test_every_reported_trial_reproduces_from_its_params(tmp_path, found, impossible, prep):
    for result in (found, impossible):
        search = result.metadata["search"]
        for t in search["trials"]:
            out = tmp_path / f"{result.output.name}-{t['index']}"
            reproduce_trial(result.metadata["input"]["path"], out, t, calib=search["calibration"])
            ppl = perplexity(out, prep, seq_len=64, quant_path="dequantized", progress=False).ppl
            assert ppl == pytest.approx(t["ppl"], rel=1e-6), (t["params"], ppl, t["ppl"])


def test_gptq_module_bits_write_gptqmodel_dynamic_and_load(tmp_path, trained, prep):
    from lorakit.evaluate import describe_model, load_eval_model
    from lorakit.io.safetensors_stream import load_file

    name = "model.layers.1.mlp.down_proj"
    res = quantize_model(trained, tmp_path / "mixed", method="gptq", group_size=32, sym=False, calib=prep,
                         n_samples=8, seq_len=64, module_bits={name: 8}, progress=False)
    qc = json.loads((res.output / "config.json").read_text())["quantization_config"]
    assert any(v.get("bits") == 8 for v in qc["dynamic"].values())
    tensors = load_file(res.output / "model.safetensors")
    assert tensors[f"{name}.qweight"].shape[0] == 256 * 8 // 32  # 8-bit codes
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape[0] == 256 * 4 // 32  # the rest stay 4-bit
    assert "GPTQModel.load" in res.metadata["how_to_load"] and "NOT" in res.metadata["how_to_load"]
    assert res.metadata["size_after_bytes"] == pytest.approx(
        predicted_size_bytes(json.loads((trained / "config.json").read_text()), method="gptq", bits=4,
                             group_size=32, module_bits={name: 8}), rel=0.05)
    # GPTQModel's own loader (the documented one) computes what lorakit's dequantized path computes.
    from lorakit.quantize.gptqmodel_backend import _import_gptqmodel

    _import_gptqmodel()
    from gptqmodel import GPTQModel

    ids = torch.randint(4, 250, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        kernel = GPTQModel.load(str(res.output), device="cpu")
        a = kernel.model(ids).logits.float()
        dense = load_eval_model(describe_model(res.output), quant_path="dequantized", device="cpu").model
        b = dense(ids).logits.float()
    assert (a - b).abs().max() < 2e-2 * a.abs().max()
    # What how_to_load warns about, checked: plain transformers (5.24) refuses per-module bit widths. If this starts
    # loading, update lorakit.quantize.mixed (loaders, how_to_load) and the search's preference.
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(str(res.output))
    # ... while lorakit's gate reads it (CPU: dequantized path, per-layer bit widths from the packed tensors).
    from lorakit.gate import check

    verdict = check(trained, res.output, prep, max_degradation=0.05, seq_len=64, progress=False)
    assert verdict.passed and verdict.checks[0].candidate["path_used"] == "gptq-dequantized"


def test_gptq_unquantized_modules_load_with_plain_transformers_and_gptqmodel(tmp_path, trained, prep):
    """=16 leaves a module out of GPTQ: it is stored as a plain weight equal to the source's (bf16 storage), the
    file lists the quantized modules in modules_in_block_to_quantize, and plain transformers, GPTQModel.load and
    lorakit's dequantized path all build and run it, with the kept module as nn.Linear."""
    from transformers import AutoModelForCausalLM

    from lorakit.evaluate import describe_model, load_eval_model
    from lorakit.io.safetensors_stream import load_file

    keep = {f"model.layers.{i}.self_attn.k_proj": 16 for i in range(2)} | {"model.layers.0.mlp.down_proj": 16}
    res = quantize_model(trained, tmp_path / "kept", method="gptq", group_size=32, sym=False, calib=prep,
                         n_samples=8, seq_len=64, module_bits=keep, progress=False)
    qc = json.loads((res.output / "config.json").read_text())["quantization_config"]
    in_block = qc["modules_in_block_to_quantize"][0]
    assert "self_attn.k_proj" not in in_block and "mlp.down_proj" not in in_block
    assert "model.layers.1.mlp.down_proj" in in_block and "model.layers.0.mlp.down_proj" not in in_block
    assert {"self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"} <= set(in_block)
    tensors = load_file(res.output / "model.safetensors")
    source = load_file(trained / "model.safetensors")
    for name in keep:
        assert f"{name}.qweight" not in tensors
        assert torch.equal(tensors[f"{name}.weight"], source[f"{name}.weight"].to(tensors[f"{name}.weight"].dtype))
    assert "model.layers.1.mlp.down_proj.qweight" in tensors
    assert "modules_in_block_to_quantize" in res.metadata["how_to_load"]
    assert res.metadata["loaders"][0].startswith("transformers.")
    assert res.metadata["size_after_bytes"] == pytest.approx(
        predicted_size_bytes(json.loads((trained / "config.json").read_text()), method="gptq", bits=4,
                             group_size=32, module_bits=keep), rel=0.05)
    ids = torch.randint(4, 250, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(res.output)).eval()
        assert type(plain.get_submodule("model.layers.0.self_attn.k_proj")) is torch.nn.Linear
        assert type(plain.get_submodule("model.layers.0.self_attn.q_proj")) is not torch.nn.Linear
        a = plain(ids).logits.float()
        dense = load_eval_model(describe_model(res.output), quant_path="dequantized", device="cpu").model
        b = dense(ids).logits.float()
        from lorakit.quantize.gptqmodel_backend import _import_gptqmodel

        _import_gptqmodel()
        from gptqmodel import GPTQModel

        c = GPTQModel.load(str(res.output), device="cpu").model(ids).logits.float()
    assert (a - b).abs().max() < 2e-2 * b.abs().max()
    assert (c - b).abs().max() < 2e-2 * b.abs().max()


def _with_planted_errors(trained: Path, folder: Path, scales: dict[tuple[str, str], float]) -> Path:
    """A copy of ``trained`` computing the same function, in which each (linear, consumer) pair has the linear's
    weights multiplied by the factor and the consumer's input columns divided by it (v_proj -> o_proj and
    up_proj -> down_proj are linear in between). Rounding is scale-equivariant, so the linear's output error grows
    by the factor (squared in its MSE) and the consumer's stays as it was: the planted linears are the most
    sensitive, in order of their factors, by construction, with no ranking computed by the code under test."""
    import shutil

    from safetensors.torch import save_file

    from lorakit.io.safetensors_stream import load_file

    shutil.copytree(trained, folder)
    tensors = load_file(folder / "model.safetensors")
    for (name, consumer), factor in scales.items():
        tensors[f"{name}.weight"] = tensors[f"{name}.weight"] * factor
        tensors[f"{consumer}.weight"] = tensors[f"{consumer}.weight"] / factor
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 250, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before, after = (AutoModelForCausalLM.from_pretrained(str(f)).eval()(ids).logits for f in (trained, folder))
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)  # the same function: only where the error sits moved
    return folder


def test_keep_sensitive_leaves_the_planted_worst_linears_unquantized(tmp_path, trained, prep):
    """keep_sensitive 2 keeps exactly the two linears made to round worst, most sensitive first, as plain weights
    equal to the source's (bf16 storage); a --module-bits entry on one of them cannot lower it (the higher precision
    wins) and one on another module still applies; the record says what was asked and what was kept."""
    from lorakit.io.safetensors_stream import load_file

    worst, second = "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.up_proj"
    src = _with_planted_errors(trained, tmp_path / "planted", {(worst, "model.layers.1.self_attn.o_proj"): 200.0,
                                                               (second, "model.layers.0.mlp.down_proj"): 50.0})
    res = quantize_model(src, tmp_path / "kept", method="gptq", group_size=32, calib=prep, n_samples=8, seq_len=64,
                         calib_general=None, keep_sensitive=2, module_bits={worst: 8, "model.layers.0.mlp.down_proj": 8}, progress=False)
    meta = read_quant_meta(res.output)
    assert meta.params.keep_sensitive == 2 and meta.used_settings()["keep_sensitive"] == 2
    assert meta.quality["sensitivity"]["kept"] == [worst, second]
    assert [m["module"] for m in meta.quality["sensitivity"]["top"][:2]] == [worst, second]
    assert meta.params.module_bits == {worst: 16, second: 16, "model.layers.0.mlp.down_proj": 8}
    tensors = load_file(res.output / "model.safetensors")
    source = load_file(src / "model.safetensors")
    for name in (worst, second):
        assert f"{name}.qweight" not in tensors
        assert torch.equal(tensors[f"{name}.weight"], source[f"{name}.weight"].to(tensors[f"{name}.weight"].dtype))
    assert "model.layers.0.self_attn.v_proj.qweight" in tensors and "model.layers.1.mlp.up_proj.qweight" in tensors


def test_keep_sensitive_without_planting_keeps_the_highest_rtn_error(tmp_path, trained, prep):
    """On the trained model as it is: the kept linear is the one whose round-to-nearest output error on the
    calibration blocks is largest, that error computed here directly (weights, grid and activations hooked)."""
    from transformers import AutoModelForCausalLM

    from lorakit.quantize.calibration import build_calibration
    from lorakit.quantize.core import _load_tokenizer
    from lorakit.quantize.grid import quantize_weight

    res = quantize_model(trained, tmp_path / "k1", method="gptq", group_size=32, sym=False, calib=prep, n_samples=8,
                         seq_len=64, calib_general=None, keep_sensitive=1, progress=False)
    blocks = build_calibration(prep, _load_tokenizer(trained), n_samples=8, seq_len=64, seed=0).blocks
    model = AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32).eval()
    errors: dict[str, float] = {}

    def hook(name):
        def run(module, args, _out):
            w = module.weight.detach().float()
            q = quantize_weight(w, bits=4, group_size=32, sym=False).dequantize()
            errors[name] = errors.get(name, 0.0) + float((args[0].float() @ (w - q).t()).pow(2).sum())
        return run

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        model(blocks)
    for h in handles:
        h.remove()
    assert read_quant_meta(res.output).quality["sensitivity"]["kept"] == [max(errors, key=errors.get)]


def test_the_search_keeps_the_sensitive_linears_in_every_trial(tmp_path, trained, prep):
    """keep_sensitive is one of the settings the search holds fixed: each trial records it, and the picked file
    has the planted worst linear unquantized, as a fixed quantization would."""
    worst = "model.layers.0.self_attn.v_proj"
    src = _with_planted_errors(trained, tmp_path / "planted", {(worst, "model.layers.0.self_attn.o_proj"): 200.0})
    res = search_quantization(src, tmp_path / "s", calib=prep, target_degradation=5.0, keep_sensitive=1,
                              space=SearchSpace(methods=("gptq",), group_sizes=(32,), n_samples=(8,)),
                              calib_general=None, progress=False, **SMALL)
    trials = res.metadata["search"]["trials"]
    assert trials and all(t["params"]["keep_sensitive"] == 1 for t in trials)
    assert res.metadata["quality"]["sensitivity"]["kept"] == [worst]
    assert res.metadata["params"]["module_bits"] == {worst: 16}


def test_the_size_prediction_bounds_what_keep_sensitive_keeps(tmp_path, trained, prep):
    """Which linears keep_sensitive keeps is known only after calibration, so the size prediction (which orders the
    search and enforces max_size_bytes) counts the K whose 16-bit copy adds most: on the tiny Llama the MLP
    linears, all one size. A quantization that keeps a small linear (v_proj, planted worst) stays under it."""
    config = json.loads((trained / "config.json").read_text())
    kw = dict(method="gptq", bits=4, group_size=32)
    two_mlp = {"model.layers.1.mlp.up_proj": 16, "model.layers.0.mlp.gate_proj": 16}
    assert predicted_size_bytes(config, **kw, keep_sensitive=2) == predicted_size_bytes(config, **kw,
                                                                                         module_bits=two_mlp)
    worst = "model.layers.0.self_attn.v_proj"
    src = _with_planted_errors(trained, tmp_path / "planted", {(worst, "model.layers.0.self_attn.o_proj"): 200.0})
    res = quantize_model(src, tmp_path / "k1", calib=prep, n_samples=8, seq_len=64, sym=False, calib_general=None,
                         keep_sensitive=1, progress=False, **kw)
    assert res.metadata["quality"]["sensitivity"]["kept"] == [worst]
    real = res.metadata["size_after_bytes"]
    assert predicted_size_bytes(config, **kw) < real <= predicted_size_bytes(config, **kw, keep_sensitive=1)


def test_max_size_counts_the_linears_keep_sensitive_keeps(tmp_path, trained, prep):
    """A size bound the all-4-bit file meets but one with the largest linear kept at 16 bits would not: with
    keep_sensitive 1 the search runs no trial that could land over it, says why, and writes nothing (it once
    predicted sizes as if nothing were kept); without, the same bound is met by a real file."""
    from lorakit.quantize.search import SearchBounds

    config = json.loads((trained / "config.json").read_text())
    bound = int(predicted_size_bytes(config, method="gptq", bits=4, group_size=32) * 1.05)  # the header and what
    # else the prediction leaves out (~2% on the tiny Llama; test_search_finds_the_smallest_passing_configuration)
    assert bound < predicted_size_bytes(config, method="gptq", bits=4, group_size=32, keep_sensitive=1)
    space = SearchSpace(methods=("gptq",), group_sizes=(32,), n_samples=(8,), mixed_steps=())
    with pytest.raises(InputError, match=r"no trial ran.*predicted size above max_size_bytes.*raise --max-size-mb"):
        search_quantization(trained, tmp_path / "s", calib=prep, target_degradation=5.0, keep_sensitive=1,
                            space=space, bounds=SearchBounds(max_size_bytes=bound), calib_general=None,
                            progress=False, **SMALL)
    assert_nothing_written(tmp_path / "s")
    fits = search_quantization(trained, tmp_path / "s0", calib=prep, target_degradation=5.0, space=space,
                               bounds=SearchBounds(max_size_bytes=bound), calib_general=None, progress=False, **SMALL)
    assert fits.metadata["size_after_bytes"] <= bound  # the same bound without a kept linear is met
    # A bound the prediction meets but the real file (header and all) does not: the trial runs and does not pass.
    tight = int(predicted_size_bytes(config, method="gptq", bits=4, group_size=32) * 1.005)
    over = search_quantization(trained, tmp_path / "s1", calib=prep, target_degradation=5.0, space=space,
                               bounds=SearchBounds(max_size_bytes=tight), calib_general=None, progress=False, **SMALL)
    trials = over.metadata["search"]["trials"]
    assert trials and all(t["size_bytes"] > tight and t["degradation"] <= 5.0 and not t["passed"] for t in trials)
    assert not over.metadata["search"]["passed"]


@pytest.mark.parametrize("kw, match", [
    (dict(keep_sensitive=14), "this model has 14 quantized linears; keep between 0 and 13"),
    (dict(keep_sensitive=-1), "keep between 0 and 13"),
    (dict(keep_sensitive=1, bits=8), "with --bits 8 there is nothing to raise"),
])
def test_bad_keep_sensitive_is_refused_before_any_work(tmp_path, trained, prep, kw, match):
    with pytest.raises(InputError, match=match):
        quantize_model(trained, tmp_path / "out", method="gptq", calib=prep, n_samples=8, seq_len=64, calib_general=None,
                       progress=False, **kw)
    assert_nothing_written(tmp_path / "out")


def test_registry_export_keeps_a_searched_checkpoint_byte_for_byte(tmp_path, impossible):
    from lorakit.io.digests import file_manifest
    from registry import Registry

    reg = Registry(tmp_path / "reg")
    v = reg.register(impossible.output, name="release", kind="quantized")
    out = reg.export(f"release@{v.version}", tmp_path / "exported")
    assert file_manifest(out) == file_manifest(impossible.output)


@pytest.mark.parametrize("module_bits, match", [
    ({"model.layers.9.mlp.down_proj": 8}, "not a quantized linear"),
    ({"model.layers.0.mlp.down_proj": 12}, "gptq keeps a module at 8 .* or 16"),
    ({"lm_head": 8}, "not a quantized linear"),
])
def test_bad_module_bits_are_refused_before_any_work(tmp_path, trained, prep, module_bits, match):
    with pytest.raises(InputError, match=match):
        quantize_model(trained, tmp_path / "out", method="gptq", calib=prep, n_samples=8, seq_len=64,
                       module_bits=module_bits, progress=False)
    assert_nothing_written(tmp_path / "out")


def test_search_refuses_bad_input_and_writes_nothing(tmp_path, trained, prep):
    with pytest.raises(InputError, match="target-degradation"):
        search_quantization(trained, tmp_path / "o", calib=prep, target_degradation=-0.1, progress=False)
    with pytest.raises(InputError, match="not supported"):
        search_quantization(trained, tmp_path / "o", calib=prep, space=SearchSpace(methods=("int3",)), progress=False)
    assert_nothing_written(tmp_path / "o")


def test_sensitivity_matches_a_direct_computation(trained, prep):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.quantize.calibration import build_calibration
    from lorakit.quantize.grid import fake_quantize
    from lorakit.quantize.sensitivity import module_sensitivity

    blocks = build_calibration(prep, AutoTokenizer.from_pretrained(str(trained)), n_samples=4, seq_len=64,
                               seed=0).blocks
    sens = module_sensitivity(trained, blocks, bits=4, group_size=32, sym=False)
    name = "model.layers.0.mlp.down_proj"
    model = AutoModelForCausalLM.from_pretrained(str(trained)).eval()
    lin = model.get_submodule(name)
    seen = []
    lin.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(blocks)
    x = torch.cat(seen).double()
    w = lin.weight.double()
    direct = ((x @ (w - fake_quantize(lin.weight, 4, 32, False).double()).t()) ** 2).sum().item() / x.shape[0]
    assert sens.output_mse[name] == pytest.approx(direct, rel=1e-4)
    assert sens.ranking[0] == max(sens.output_mse, key=sens.output_mse.get) and len(sens.ranking) == 14
    assert math.isfinite(sens.relative[name]) and sens.tokens == 256


def test_cli_target_degradation_prints_the_trial_table_and_how_to_load(tmp_path, trained, prep):
    from tests.conftest import run_cli

    proc = run_cli("quantize", str(trained), "-o", str(tmp_path / "q"), "--calib", str(prep), "--target-degradation",
                   "0", "--search-methods", "awq", "--n-samples", "8", "--seq-len", "64", "--max-trials", "1",
                   check=True)
    assert "NO configuration met" in proc.stdout and "how to load" in proc.stdout
    meta = read_quant_meta(tmp_path / "q")
    assert len(meta.search["trials"]) == 1 and meta.search["stop_reason"].startswith("max_trials")
    proc = run_cli("quantize", str(trained), "-o", str(tmp_path / "bad"), "--calib", str(prep),
                   "--module-bits", "model.layers.0.mlp.down_proj")
    assert proc.returncode == 2 and "MODULE=BITS" in proc.stderr
    assert_nothing_written(tmp_path / "bad")


def test_release_defaults_fit_the_embedded_model():
    from lorakit.quantize.checks import check_method
    from lorakit.quantize.options import QUANTIZE, RELEASE_TARGET_DEGRADATION

    assert 0 < RELEASE_TARGET_DEGRADATION < 1
    check_method(QUANTIZE.method, QUANTIZE.bits, QUANTIZE.group_size)
    assert 576 % QUANTIZE.group_size == 0 and 1536 % QUANTIZE.group_size == 0  # SmolLM2


def test_release_task_runs_the_search_when_a_target_is_set(tmp_path, trained, prep):
    """The pipeline's quantize task: a fixed configuration without a target, the bounded search with one."""
    from tasks.stages import quantize_model as quantize_task

    # sym and no act-order: the opposite of the search's own preference (asym, act-order first)
    fixed = {"method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False, "n_samples": 4,
             "seq_len": 64, "calib": str(prep)}
    plain = quantize_task.fn(str(trained), str(tmp_path / "plain"), dict(fixed))
    assert plain["metadata"].get("search") in (None, {})
    searched = quantize_task.fn(str(trained), str(tmp_path / "searched"),
                                {**fixed, "target_degradation": 0.5, "max_trials": 1})
    search = searched["metadata"]["search"]
    assert len(search["trials"]) == 1 and search["passed"]
    # The search starts from the configured settings: its first trial is exactly them, not the search's defaults.
    first = search["trials"][0]["params"]
    assert {k: first[k] for k in ("method", "bits", "group_size", "sym", "desc_act", "n_samples", "seq_len")} == {
        "method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False, "n_samples": 4, "seq_len": 64}
    assert list(search["space"]["methods"]) == ["gptq"] and list(search["space"]["group_sizes"]) == [32]
    with pytest.raises(InputError, match=r"awq_grid cannot be combined with target_degradation"):
        quantize_task.fn(str(trained), str(tmp_path / "refused"),
                         {**fixed, "method": "awq", "awq_grid": 10, "target_degradation": 0.5})
    assert_nothing_written(tmp_path / "refused")


def test_configured_space_starts_from_the_configuration():
    from lorakit.quantize.search import configured_space

    space = configured_space({"method": "awq", "bits": 4, "group_size": 64, "sym": None, "desc_act": False,
                              "n_samples": 16})
    assert space.methods == ("awq",) and space.group_sizes == (64, 32) and space.sym == (False, True)
    assert space.n_samples == (16,) and space.bits == 4


def test_search_judges_every_scored_text_and_calibrates_on_the_mix(tmp_path, trained, prep):
    """With the gate's general text, a trial's degradation is the worst of val and general text; the calibration
    mix is the same in every trial and recorded."""
    from lorakit.gate.general import GENERAL_CHECK_NAME

    space = SearchSpace(methods=("gptq",), n_samples=(8,), group_sizes=(128,), sym=(True,), desc_act=(False,))
    result = search_quantization(trained, tmp_path / "q", calib=prep, target_degradation=5.0, space=space,
                                 eval_general="default", eval_general_max_tokens=640, calib_general="default",
                                 calib_general_fraction=0.5, progress=False, **SMALL)
    search = result.metadata["search"]
    trial = search["trials"][0]
    assert set(trial["checks"]) == {"val", GENERAL_CHECK_NAME} and set(search["baselines"]) == set(trial["checks"])
    assert trial["degradation"] == max(c["degradation"] for c in trial["checks"].values())
    assert search["baselines"][GENERAL_CHECK_NAME]["tokens"] <= 640
    general = result.metadata["calibration"]["general"]
    assert general["n_samples"] == 4 and general["fraction"] == 0.5
    # a trial reproduces from its params and the recorded calibration mix
    again = reproduce_trial(trained, tmp_path / "again", {"params": {**trial["params"], **search["calibration_general"]}},
                            calib=prep)
    assert again.metadata["calibration"]["tokens_sha256"] == result.metadata["calibration"]["tokens_sha256"]
