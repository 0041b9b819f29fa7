"""lorakit quantize: GPTQ (GPTQModel) and AWQ (lorakit) checkpoints that plain transformers loads, on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_nothing_written, run_cli
from lorakit.errors import InputError
from lorakit.io.safetensors_stream import load_file
from lorakit.quantize import QUANT_META, quantize_model, read_quant_meta
from lorakit.quantize.checks import resolve_group_size
from lorakit.quantize.grid import dequantize, quantize_weight
from lorakit.quantize.layouts import AWQ_ORDER, pack_awq, pack_gptq, unpack_awq, unpack_gptq
from lorakit.quantize.options import QUANTIZE

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CALIB = dict(n_samples=8, seq_len=64, calib_general=None)  # the tasks' text only (general text: its own tests)


def make_prep(folder: Path, n_train: int = 120, n_val: int = 10, seed: int = 0) -> Path:
    """A prepared-data folder per the lorakit.data.splits contract, with English-like sentences."""
    import random

    rng = random.Random(seed)
    words = ("the model reads a short text and writes an answer about data weights layers tokens quantization "
             "of small networks on a shared machine with two cores").split()
    folder.mkdir(parents=True)
    (folder / "prep.json").write_text(json.dumps({"format": "test", "seed": seed}))
    for split, n in (("train", n_train), ("val", n_val)):
        with open(folder / f"{split}.texts.jsonl", "w") as fh:
            for _ in range(n):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(30, 80))).capitalize() + "."
                fh.write(json.dumps({"text": text}) + "\n")
    return folder


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    return make_prep(tmp_path_factory.mktemp("prep") / "prep")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_base, prep) -> dict[str, Path]:
    """Tiny model quantized eight ways (made once for the module; each takes a few seconds). gptq4/gptq8 keep the
    natural group order (no act-order) so lorakit's unpacker can read them; ``default`` is the release default
    (GPTQ 4-bit g16, zero point, act-order, GPTAQ, clipping search), ``no-clip`` without the clipping search, ``plain-gptq`` without either."""
    root = tmp_path_factory.mktemp("quant")
    runs = {"gptq4": dict(method="gptq", bits=4, group_size=32, desc_act=False),
            "gptq8": dict(method="gptq", bits=8, group_size=64, desc_act=False), "default": {},
            "no-clip": dict(clip_search=False), "plain-gptq": dict(clip_search=False, gptaq_alpha=0),
            "awq4": dict(method="awq", bits=4, group_size=32), "awq8": dict(method="awq", bits=8, group_size=64),
            "awq4-fp32": dict(method="awq", bits=4, group_size=32, compute_dtype="float32", awq_scale_form="both")}
    return {name: quantize_model(tiny_base, root / name, calib=prep, progress=False, **CALIB, **kw).output
            for name, kw in runs.items()}


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _sample_ids(n: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(4, 250, (n, length), generator=torch.Generator().manual_seed(1))


def _unpack(folder: Path) -> dict[str, object]:
    """module name -> GroupQuant, read from the checkpoint with lorakit's unpackers (layout per its config)."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name in tensors:
        if name.endswith(".qweight"):
            mod = name[: -len(".qweight")]
            if config["quant_method"] == "awq":
                out[mod] = unpack_awq(tensors[f"{mod}.qweight"], tensors[f"{mod}.qzeros"], tensors[f"{mod}.scales"],
                                      config["group_size"])
            else:
                out[mod] = unpack_gptq(tensors[f"{mod}.qweight"], tensors[f"{mod}.qzeros"], tensors[f"{mod}.scales"],
                                       tensors[f"{mod}.g_idx"], config["bits"])
    return out


# --- layouts and grids: exact, against direct computation --------------------------------------------------------

def test_awq_packing_order_matches_a_hand_packed_word():
    from lorakit.quantize.grid import GroupQuant

    q = torch.arange(8, dtype=torch.int32).view(8, 1).repeat(1, 32)  # out=8, in=32: row r holds value r
    gq = GroupQuant(q, torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.int32), 4, 32)
    word = int(pack_awq(gq)["qweight"][0, 0]) & 0xFFFFFFFF
    expected = sum(AWQ_ORDER[i] << (4 * i) for i in range(8))  # nibble i holds output channel ORDER[i]
    assert word == expected == 0x75316420


@pytest.mark.parametrize("bits,layout", [(4, "awq"), (4, "gptq"), (8, "gptq")])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_unpack_roundtrip_is_exact(bits, layout, sym):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    gq = quantize_weight(w, bits, 32, sym, min_zero=1 if layout == "gptq" else 0)
    if layout == "awq":
        back = unpack_awq(**pack_awq(gq), group_size=32)
    else:
        packed = pack_gptq(gq)
        back = unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    assert torch.equal(back.q, gq.q) and torch.equal(back.zeros, gq.zeros) and torch.equal(back.scales, gq.scales)
    # Round-to-nearest on a grid that covers each group: error at most half a step per weight.
    step = gq.scales.repeat_interleave(32, dim=1)
    assert torch.all((gq.dequantize() - w).abs() <= step / 2 * (1 + 1e-6))


def test_resolve_group_size_for_smollm2_shapes():
    smol = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_hidden_layers": 30}
    assert resolve_group_size(smol, 64, strict=False) == (64, None)
    chosen, note = resolve_group_size(smol, 128, strict=False)
    assert chosen == 64 and "576" in note and "using 64" in note
    with pytest.raises(InputError, match="--group-size 64"):
        resolve_group_size(smol, 128, strict=True)


# --- end to end on the tiny model -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,bound", [("gptq4", 0.25), ("awq4", 0.25), ("gptq8", 0.025), ("awq8", 0.025),
                                        ("awq4-fp32", 0.25), ("default", 0.25)])
def test_reloads_with_plain_from_pretrained_and_logits_stay_close(quantized, tiny_base, name, bound):
    ids = _sample_ids()
    fp, q = _logits(tiny_base, ids), _logits(quantized[name], ids)
    rel = ((q - fp).norm() / fp.norm()).item()
    assert 0 < rel < bound, f"{name}: relative logit error {rel:.4f}"


# What a user's process does: import lorakit, then load a checkpoint with plain transformers and run it.
_LOAD_AND_RUN = """
import sys, torch
import lorakit
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.randint(4, 250, (2, 48), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    torch.save(model(ids).logits.float(), sys.argv[2])
"""


def test_a_process_held_to_avx2_runs_a_checkpoint_after_wider_kernels_were_cached(quantized, tmp_path):
    """GPTQModel compiles its dequantization (torch.compile) when transformers loads a checkpoint. On a CPU with
    AVX512, a process held to AVX2 reused the 16-lane kernels torch had cached and aborted ("index out of bounds");
    lorakit gives each ATEN_CPU_CAPABILITY a cache folder of its own (lorakit.runtime.compile_cache_per_capability).
    On a CPU with AVX2 only, both runs generate the same kernels and the test holds as well."""
    held = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "TORCHINDUCTOR_CACHE_DIR")
    env = {k: v for k, v in os.environ.items() if k not in held}
    env["TMPDIR"] = str(tmp_path)  # torch's default cache folder is under it: this test's own, empty at first
    for name, extra in (("native", {}), ("avx2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})):
        done = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(quantized["gptq8"]), str(tmp_path / name)],
                              env={**env, **extra}, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}"
    native, avx2 = (torch.load(tmp_path / name) for name in ("native", "avx2"))
    # the same model's outputs: the checkpoint runs in float16, whose step near 1 is 2^-8, summed in another order
    torch.testing.assert_close(avx2, native, rtol=1e-2, atol=1e-2)
    folders = sorted(p.name for p in tmp_path.glob("torchinductor_*"))  # torch's default, then the AVX2 one
    assert len(folders) == 2 and folders[1].endswith("_avx2"), folders


def test_compile_cache_folder_follows_the_capability_unless_one_is_given():
    """The folder is set only for a process held to a capability, and never over the user's own choice."""
    code = "import os, lorakit; print(os.environ.get('TORCHINDUCTOR_CACHE_DIR'))"
    base = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_CACHE_DIR")}

    def cache_dir(**extra: str) -> str:
        return subprocess.run([sys.executable, "-c", code], env={**base, **extra}, capture_output=True, text=True,
                              check=True, timeout=300).stdout.strip()

    assert cache_dir() == "None"
    avx2 = cache_dir(ATEN_CPU_CAPABILITY="avx2")
    assert os.path.basename(avx2).startswith("torchinductor_") and avx2.endswith("_avx2")
    assert cache_dir(ATEN_CPU_CAPABILITY="default").endswith("_default")
    assert cache_dir(ATEN_CPU_CAPABILITY="avx2", TORCHINDUCTOR_CACHE_DIR="/mine") == "/mine"


@pytest.mark.parametrize("name", ["gptq4", "gptq8", "awq4", "awq8"])
def test_packed_weights_lie_on_the_declared_grid_and_match_the_loader(quantized, tiny_base, name):
    """Integers in range, one scale/zero per declared group, and the loader's kernel computes x·Wᵀ with exactly
    the weights lorakit's unpacker reads (checked on the identity matrix, to fp16/bf16 kernel precision)."""
    from transformers import AutoModelForCausalLM

    folder = quantized[name]
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits, g = qcfg["bits"], qcfg["group_size"]
    assert bits == int(name[-1]) and qcfg["quant_method"] == ("awq" if name == "awq4" else "gptq")
    unpacked = _unpack(folder)
    assert sorted(unpacked) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in LINEARS)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    fp = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    for mod, gq in unpacked.items():
        assert gq.q.min() >= 0 and gq.q.max() <= 2**bits - 1
        assert gq.zeros.min() >= 0 and gq.zeros.max() <= 2**bits - 1
        assert gq.scales.shape[1] * g == gq.q.shape[1] and torch.all(gq.scales > 0)
        w = dequantize(gq.q, gq.scales, gq.zeros, g)
        module = loaded.get_submodule(mod)
        with torch.no_grad():
            kernel_w = module(torch.eye(w.shape[1]).unsqueeze(0)).squeeze(0).t().float()
        assert (kernel_w - w).abs().max() <= 0.01 * w.abs().max(), mod
        if name.startswith("gptq"):  # AWQ weights also carry the folded scales, so only GPTQ compares to fp directly
            ref = fp.get_submodule(mod).weight.float()
            assert ((w - ref).norm() / ref.norm()).item() < (0.2 if bits == 4 else 0.02), mod


def test_act_order_checkpoint_keeps_its_groups_in_g_idx_and_the_loader_reads_them(quantized, tiny_base):
    """The default (act-order) checkpoint: groups follow activation order, so g_idx is not arange(in) // g; the
    transformers loader's kernel computes x·Wᵀ with the weights the g_idx-aware dequantizer reads, and every group
    still has exactly group_size input rows (a permutation of the natural grouping)."""
    from transformers import AutoModelForCausalLM

    from lorakit.evaluate.dequant import dequantize_gptq

    folder = quantized["default"]
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == (
        "gptq", 4, QUANTIZE.group_size, False, True)
    tensors = load_file(folder / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    permuted = 0
    for mod in (f"model.layers.{i}.{m}" for i in range(2) for m in LINEARS):
        g_idx = tensors[f"{mod}.g_idx"].to(torch.int64)
        assert torch.all(torch.bincount(g_idx) == QUANTIZE.group_size), mod
        permuted += not torch.equal(g_idx, torch.arange(g_idx.numel()) // QUANTIZE.group_size)
        w = dequantize_gptq(tensors[f"{mod}.qweight"], tensors[f"{mod}.qzeros"], tensors[f"{mod}.scales"], g_idx,
                            bits=4, group_size=QUANTIZE.group_size)  # [out, in]
        with torch.no_grad():
            kernel_w = loaded.get_submodule(mod)(torch.eye(g_idx.numel()).unsqueeze(0)).squeeze(0).t().float()
        assert kernel_w.shape == w.shape, (mod, kernel_w.shape, w.shape)
        assert (kernel_w - w).abs().max() <= 0.01 * w.abs().max(), mod
    assert permuted, "act-order changed no module's group order"


def test_how_to_load_a_mixed_bit_file_at_a_group_the_cpu_kernel_refuses_names_the_backend():
    """A per-module-bits GPTQ file loads through GPTQModel.load only, which ignores the file's backend key: the
    instructions must say to pass it on CPU, and say nothing of it when the group runs on the int4 kernel."""
    from lorakit.quantize.mixed import how_to_load, loader_backend

    bits = {"model.layers.0.mlp.down_proj": 8}
    assert loader_backend("gptq-v1", 4, 16) == "torch" and loader_backend("gptq-v1", 4, 32) is None
    text = how_to_load("gptq", "gptq-v1", bits, loader_backend("gptq-v1", 4, 16))
    assert "GPTQModel.load" in text and "backend='torch'" in text
    assert "backend" not in how_to_load("gptq", "gptq-v1", bits, loader_backend("gptq-v1", 4, 32))


def test_a_file_that_splits_a_group_vllm_fuses_does_not_claim_vllm():
    """vLLM fuses q/k/v and gate/up and loads each fused layer at one precision: keeping k_proj alone unquantized
    (or at 8 bits) splits the group, so the loaders and how_to_load leave vLLM out and say why; keeping the whole
    group, or a module vLLM does not fuse, keeps it."""
    from lorakit.quantize.mixed import how_to_load, loaders, split_fused_groups

    k_only = {f"model.layers.{i}.self_attn.k_proj": 16 for i in range(2)}
    qkv = {f"model.layers.0.self_attn.{m}_proj": 16 for m in "qkv"}
    assert split_fused_groups(k_only) == ["model.layers.0.self_attn.q/k/v", "model.layers.1.self_attn.q/k/v"]
    assert split_fused_groups(qkv) == [] and split_fused_groups({"model.layers.0.mlp.down_proj": 8}) == []
    assert split_fused_groups({"model.layers.3.mlp.up_proj": 16}) == ["model.layers.3.mlp.gate/up"]
    for method, layout in (("gptq", "gptq-v1"), ("awq", "awq-gemm")):
        assert not any(x.startswith("vLLM") for x in loaders(method, layout, k_only))
        assert "Not vLLM" in how_to_load(method, layout, k_only) and "vLLM read" not in how_to_load(method, layout, k_only)
        assert any(x.startswith("vLLM") for x in loaders(method, layout, qkv))
        assert "Not vLLM" not in how_to_load(method, layout, qkv)
    assert not any(x.startswith("vLLM") for x in loaders("gptq", "gptq-v1", {"model.layers.0.self_attn.q_proj": 8}))


def test_group_16_names_the_portable_kernel_and_plain_transformers_runs_it_on_cpu(quantized):
    """Torch's CPU int4 kernel takes groups of 32/64/128/256; GPTQModel would still pick it for a group-16 file and
    fail at the first forward. lorakit names the portable torch kernel in quantization_config.backend (and only
    there: group 32 leaves the choice to the loader); plain from_pretrained then computes x·Wᵀ with
    exactly the weights the g_idx-aware dequantizer reads."""
    from transformers import AutoModelForCausalLM

    from lorakit.evaluate.dequant import dequantize_gptq

    folder = quantized["default"]  # group 16 is the default
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (qcfg["group_size"], qcfg["backend"]) == (16, "torch") and QUANTIZE.group_size == 16
    assert "backend" not in json.loads((quantized["gptq4"] / "config.json").read_text())["quantization_config"]
    meta = read_quant_meta(folder)
    assert "backend = 'torch'" in meta.how_to_load and any("group size 16" in n for n in meta.notes)
    tensors = load_file(folder / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    for mod in (f"model.layers.{i}.{m}" for i in range(2) for m in LINEARS):
        g_idx = tensors[f"{mod}.g_idx"].to(torch.int64)
        w = dequantize_gptq(tensors[f"{mod}.qweight"], tensors[f"{mod}.qzeros"], tensors[f"{mod}.scales"], g_idx,
                            bits=4, group_size=16)
        with torch.no_grad():
            kernel_w = loaded.get_submodule(mod)(torch.eye(g_idx.numel()).unsqueeze(0)).squeeze(0).t().float()
        assert (kernel_w - w).abs().max() <= 0.01 * w.abs().max(), mod
    with torch.no_grad():
        assert torch.isfinite(loaded(_sample_ids()).logits).all()


def test_gptaq_corrects_only_where_earlier_modules_left_input_error(quantized):
    """GPTAQ (the default's gptaq_alpha) rounds each module against the float model's inputs as well as its own.
    Layer 0's q/k/v read the unquantized embeddings, so their inputs carry no error yet and their codes must be
    plain GPTQ's; further down, where quantized modules feed the inputs, the codes must differ widely. Both
    checkpoints have the same layout, and the record and quantize_config say which is which. (Compared without the
    clipping search, whose range choice reacts to float noise.) "Must be plain GPTQ's" up to float noise: GPTAQ's
    input-error term there is zero only in exact arithmetic. Where the rounding ran in bfloat16 (a CPU with
    AVX512-BF16) the codes came out equal; where it ran in float32 (one without) a handful of one module's codes
    moved by one level. A real correction moves a large share of every module's codes, by several levels."""
    from lorakit.quantize.options import GPTAQ_ALPHA

    default, plain = load_file(quantized["no-clip"] / "model.safetensors"), load_file(
        quantized["plain-gptq"] / "model.safetensors")
    assert {k: v.shape for k, v in default.items()} == {k: v.shape for k, v in plain.items()}

    def codes(key: str) -> tuple[torch.Tensor, torch.Tensor]:  # the 4-bit codes, eight to an int32
        from lorakit.evaluate.dequant import unpack_words

        return unpack_words(default[key], 4, 0), unpack_words(plain[key], 4, 0)

    for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        a, b = codes(f"model.layers.0.{mod}.qweight")
        assert (a != b).float().mean() <= 0.002 and (a - b).abs().max() <= 1, mod
    last = max(int(k.split(".")[2]) for k in default if k.startswith("model.layers."))
    share = {}
    for m in LINEARS:
        a, b = codes(f"model.layers.{last}.{m}.qweight")
        share[m] = float((a != b).float().mean())
    assert min(share.values()) >= 0.05, share
    assert read_quant_meta(quantized["default"]).params.method_params["gptaq_alpha"] == GPTAQ_ALPHA == 0.5
    assert read_quant_meta(quantized["plain-gptq"]).params.method_params["gptaq_alpha"] == 0.0
    from lorakit.quantize.gptqmodel_backend import CALIB_BATCH_SIZE  # recorded: it orders the Hessians' sums

    assert read_quant_meta(quantized["default"]).params.method_params["calib_batch_size"] == CALIB_BATCH_SIZE
    meta = json.loads((quantized["default"] / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["gptaq"]["alpha"] == GPTAQ_ALPHA


def test_clip_search_is_gptqmodels_mse_and_changes_the_rounding(quantized):
    """clip_search (default on) is GPTQModel's clipping search with the reference norm 2.4, recorded where loaders
    and lorakit look; off, GPTQ takes each group's min/max and rounds differently from the first module on."""
    from lorakit.quantize.options import GPTQ_CLIP_NORM

    on, off = (load_file(quantized[n] / "model.safetensors") for n in ("default", "no-clip"))
    assert not torch.equal(on["model.layers.0.self_attn.q_proj.qweight"], off["model.layers.0.self_attn.q_proj.qweight"])
    assert read_quant_meta(quantized["default"]).params.method_params["clip_norm"] == GPTQ_CLIP_NORM == 2.4
    assert read_quant_meta(quantized["no-clip"]).params.method_params["clip_norm"] == 0.0
    assert read_quant_meta(quantized["default"]).used_settings()["clip_search"] is True
    assert read_quant_meta(quantized["no-clip"]).used_settings()["clip_search"] is False
    for name, mse in (("default", 2.4), ("no-clip", 0.0)):
        assert json.loads((quantized[name] / "config.json").read_text())["quantization_config"]["meta"]["mse"] == mse


def test_quant_record_says_how_it_was_made(quantized, tiny_base, prep):
    for name, folder in quantized.items():
        meta = read_quant_meta(folder)
        p = meta.params
        kind = "gptq4" if name in ("default", "plain-gptq", "no-clip") else name.split("-")[0]
        assert (p.method, p.bits) == (kind[:-1], int(kind[-1]))
        assert p.layout == ("awq-gemm" if kind == "awq4" else "gptq-v1")
        assert p.threads == torch.get_num_threads() > 0
        assert meta.calibration["n_samples"] == 8 and meta.calibration["split"] == "train"
        assert len(meta.calibration["tokens_sha256"]) == 64 and len(meta.calibration["source_sha256"]) == 64
        assert meta.input["weights_digest"] and meta.backend["versions"]["gptqmodel"] == "7.6.0"
        assert meta.size_after_bytes < meta.size_before_bytes and meta.wall_time_s > 0
        assert "from_pretrained" in meta.how_to_load
        assert (folder / "tokenizer.json").exists()
        assert (folder / "generation_config.json").read_text() == (tiny_base / "generation_config.json").read_text()
        assert not (folder / "quant_log.csv").exists()
    assert read_quant_meta(quantized["awq8"]).notes and "GPTQ v1 layout" in read_quant_meta(quantized["awq8"]).notes[0]
    # Same calibration for every method: the digest of the tokens is shared.
    assert len({read_quant_meta(f).calibration["tokens_sha256"] for f in quantized.values()}) == 1


def test_gptq_record_keeps_every_modules_loss(quantized, tiny_base):
    """Each GPTQ checkpoint's record holds GPTQModel's reconstruction loss of every quantized linear, with GPTAQ on
    (the release default, whose losses GPTQModel leaves out of its quant_log.csv) and off: a sensitivity ranking
    of the modules, which choosing what to keep at higher precision needs, without quantizing again."""
    layers = json.loads((tiny_base / "config.json").read_text())["num_hidden_layers"]
    every_linear = {f"model.layers.{i}.{lin}" for i in range(layers) for lin in LINEARS}
    for name in ("gptq4", "gptq8", "default", "no-clip", "plain-gptq"):
        losses = read_quant_meta(quantized[name]).quality["module_loss"]
        assert set(losses) == every_linear, name
        assert all(0 <= v < float("inf") for v in losses.values()) and max(losses.values()) > 0, name


def test_calibration_sampling_is_seeded(tiny_base, prep):
    from transformers import AutoTokenizer

    from lorakit.quantize.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    a, b = (build_calibration(prep, tok, n_samples=4, seq_len=32, seed=0) for _ in range(2))
    c = build_calibration(prep, tok, n_samples=4, seq_len=32, seed=1)
    assert torch.equal(a.blocks, b.blocks) and a.tokens_digest == b.tokens_digest
    assert a.tokens_digest != c.tokens_digest


def test_awq_search_beats_plain_rounding(quantized):
    from lorakit.quantize.awq import compute_dtype

    """The chosen scale never loses to plain rounding on the calibration tokens; on average it gains. Both search
    precisions: float32 (exact errors) and the machine's default (bfloat16 here when the CPU has fast bf16)."""
    for name, dtype in (("awq4", compute_dtype("auto", torch.device("cpu"))), ("awq4-fp32", torch.float32)):
        meta = read_quant_meta(quantized[name])
        q = meta.quality
        assert q["compute_dtype"] == meta.params.compute_dtype == str(dtype).removeprefix("torch.")
        assert all(q["output_mse_best"][k] <= q["output_mse_rtn"][k] for k in q["alpha"])
        assert q["mean_mse_ratio_vs_rtn"] < 1.0
        assert set(q["scale_form"].values()) <= {"duo", "activation", None} and set(q["scale_form"]) == set(q["alpha"])


def test_awq_gram_errors_equal_a_direct_forward_over_every_token():
    """AWQ scores scales and clip ranges through XᵀX; that must be the exact output error a forward pass over the
    same tokens gives (not an estimate), for whole linears and per group of input channels."""
    from torch import nn

    from lorakit.quantize.awq import AwqParams, InputStats, output_mse, search_clip

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=gen) * torch.linspace(0.1, 4.0, 64)  # uneven channels, as in LLMs
    w1, w2 = torch.randn(48, 64, generator=gen), torch.randn(16, 64, generator=gen)
    q1, q2 = w1 + 0.01 * torch.randn_like(w1), w2 + 0.02 * torch.randn_like(w2)
    stats = InputStats(64, torch.device("cpu"))
    stats.add(x[:2])
    stats.add(x[2:])  # accumulated over batches, as during the block forward
    flat = x.reshape(-1, 64)
    direct = (torch.cat([flat @ (q1 - w1).t(), flat @ (q2 - w2).t()], dim=1)).pow(2).mean().item()
    assert stats.tokens == 150
    assert output_mse([w1, w2], [q1, q2], stats.mean_gram()) == pytest.approx(direct, rel=1e-5)
    assert torch.allclose(stats.mean_abs(), flat.abs().mean(dim=0), rtol=1e-6)

    # bfloat16 forwards: the Gram matrix and the candidate errors are multiplied in bfloat16; the error must stay
    # within 1e-3 of the exact one over the same (bfloat16) activations.
    xb = x.bfloat16()
    stats_bf16 = InputStats(64, torch.device("cpu"))
    stats_bf16.add(xb[:2])
    stats_bf16.add(xb[2:])
    flat_b = xb.reshape(-1, 64).double()
    direct_b = (torch.cat([flat_b @ (q1 - w1).double().t(), flat_b @ (q2 - w2).double().t()], dim=1)).pow(2).mean().item()
    assert output_mse([w1, w2], [q1, q2], stats_bf16.mean_gram().bfloat16()) == pytest.approx(direct_b, rel=1e-3)

    # Clipping: keep the shrink that minimises each group's own output error, computed directly here.
    p = AwqParams(bits=3, group_size=16, clip_grid=10)
    lin = nn.Linear(64, 48, bias=False)
    lin.weight.data.copy_(w1)
    search_clip(lin, stats.mean_gram(), p)
    from lorakit.quantize.grid import fake_quantize

    wg = w1.view(48, 4, 16)
    absmax = wg.abs().amax(dim=-1, keepdim=True)
    errs = []
    for i in range(6):
        cur = absmax * (1 - i / 10)
        d = fake_quantize(torch.maximum(torch.minimum(wg, cur), -cur).reshape(48, 64), 3, 16, False).view(48, 4, 16) - wg
        xg = flat.view(-1, 4, 16)
        errs.append(torch.einsum("tGk,oGk->oGt", xg, d).pow(2).mean(dim=-1))
    best = torch.stack(errs).argmin(dim=0)  # [o, G]
    expected = torch.maximum(torch.minimum(wg, absmax * (1 - best.unsqueeze(-1) / 10)), -absmax * (1 - best.unsqueeze(-1) / 10))
    assert torch.allclose(lin.weight.data, expected.reshape(48, 64), atol=1e-6)
    assert (best > 0).any()  # the check saw some group actually clipped


def test_awq_scale_search_picks_the_best_form_and_alpha_on_its_grid():
    """The search's answer is the minimum over its whole grid (both scale forms, every α, plain rounding),
    recomputed here candidate by candidate from the definition of each form."""
    from lorakit.quantize.awq import AwqParams, InputStats, _weight_mean, output_mse, search_scale
    from lorakit.quantize.grid import fake_quantize

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(400, 64, generator=gen) * torch.linspace(0.05, 6.0, 64)
    weights = [torch.randn(32, 64, generator=gen), torch.randn(16, 64, generator=gen)]
    stats = InputStats(64, torch.device("cpu"))
    stats.add(x)
    p = AwqParams(bits=3, group_size=16, n_grid=10, scale_forms=("duo", "activation"))
    s, alpha, form, loss_rtn, loss = search_scale(weights, stats, p)
    gram, x_mean, w_mean = stats.mean_gram(), stats.mean_abs(), _weight_mean(weights, 16)
    losses = {}
    for f in ("duo", "activation"):
        for i in range(10):
            cand = x_mean.pow(i / 10) / ((w_mean.pow(1 - i / 10) + 1e-4) if f == "duo" else 1)
            cand = cand.clamp(min=1e-4)
            cand = cand / (cand.max() * cand.min()).sqrt()
            approx = [fake_quantize(w * cand, 3, 16, False) / cand for w in weights]
            losses[(f, i / 10)] = output_mse(weights, approx, gram)
    assert loss_rtn == pytest.approx(output_mse(weights, [fake_quantize(w, 3, 16, False) for w in weights], gram))
    assert (form, alpha) == min(losses, key=losses.get) and loss == pytest.approx(min(losses.values()))
    assert loss < loss_rtn
    only_duo = search_scale(weights, stats, AwqParams(bits=3, group_size=16, n_grid=10, scale_forms=("duo",)))
    assert only_duo[2] in ("duo", None) and only_duo[4] >= loss
    assert AwqParams().scale_forms == ("duo",)  # the default, as measured best at g64 in bench/README.md


def test_awq_on_a_tied_embedding_model_keeps_the_tie(tmp_path, tiny_tied_base, prep):
    """SmolLM2 ties lm_head to the input embedding: the checkpoint stores it once and the loader re-ties it."""
    from transformers import AutoModelForCausalLM

    out = quantize_model(tiny_tied_base, tmp_path / "tied-awq", method="awq", group_size=64, calib=prep,
                         progress=False, **CALIB).output
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = _sample_ids()
    fp, q = _logits(tiny_tied_base, ids), _logits(out, ids)
    assert ((q - fp).norm() / fp.norm()).item() < 0.25


def test_awq_scale_folding_leaves_the_fp_model_unchanged():
    """Folding s into the preceding op (norm, v_proj, up_proj) is an exact identity before rounding: with clipping
    off, the folded fp model must reproduce the original logits. Full multi-head attention (kv heads = heads) so
    the o_proj -> v_proj fold is exercised too."""
    import copy

    from lorakit.models.tiny import make_tiny_llama
    from lorakit.quantize.awq import AwqParams, awq_quantize

    original = make_tiny_llama(num_kv_heads=4, seed=3)
    folded = copy.deepcopy(original)
    blocks = _sample_ids(4, 32)
    quantized, report = awq_quantize(folded, blocks, AwqParams(group_size=32, clip=False, n_grid=5),
                                     device=torch.device("cpu"), progress=False)
    assert len(quantized) == 14 and any(k.endswith("self_attn.o_proj") for k in report.alphas)
    assert any(a > 0 for a in report.alphas.values())  # some scale differs from 1, so the test sees a fold
    ids = _sample_ids(2, 40)
    with torch.no_grad():
        ref, got = original(ids).logits, folded(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    changed = (folded.model.layers[0].input_layernorm.weight - original.model.layers[0].input_layernorm.weight)
    assert changed.abs().max() > 1e-3


def test_cli_quantizes_from_a_text_file_and_generates(tmp_path, tiny_base, prep):
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(json.loads(line)["text"] for line in (prep / "train.texts.jsonl").read_text().splitlines()))
    out = tmp_path / "gptq"
    proc = run_cli("quantize", str(tiny_base), "-o", str(out), "--method", "gptq", "--group-size", "64",
                   "--calib", str(text), "--n-samples", "4", "--seq-len", "64", "--calib-general", "default",
                   "--calib-general-fraction", "0.5", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{out}\n"  # GPTQModel's banners and tables went to stderr
    assert not (tmp_path / "logs").exists()  # nor did its log files land in the working directory
    calibration = read_quant_meta(out).calibration
    assert calibration["kind"] == "file" and calibration["general"]["n_samples"] == 2
    bad = run_cli("quantize", str(tiny_base), "-o", str(tmp_path / "bad"), "--calib", str(text),
                  "--calib-general", "none", "--calib-general-fraction", "0.5", cwd=tmp_path)
    assert bad.returncode == 2 and "needs general text" in bad.stderr and not (tmp_path / "bad").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    gen = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)


# --- bad input: one clear error, nothing written ------------------------------------------------------------------

def _bad(tmp_path, model, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        quantize_model(model, out, progress=False, **{"calib": kw.pop("calib", None), **CALIB, **kw})
    assert_nothing_written(out)


def test_rejects_a_folder_that_is_not_a_model(tmp_path, prep):
    (tmp_path / "notamodel").mkdir()
    _bad(tmp_path, tmp_path / "notamodel", "not an HF model folder", calib=prep)


def test_rejects_an_already_quantized_model(tmp_path, quantized, prep):
    _bad(tmp_path, quantized["gptq4"], "already quantized", calib=prep)


def test_rejects_an_unsupported_architecture(tmp_path, tiny_base, prep):
    other = tmp_path / "gpt2ish"
    shutil.copytree(tiny_base, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    _bad(tmp_path, other, "gpt2 model; lorakit quantize supports llama", calib=prep)


@pytest.mark.parametrize("kw,match", [
    (dict(bits=3), "--bits 3 is out of range"),
    (dict(group_size=100), "--group-size 100 is out of range"),
    (dict(method="hqq"), "--method 'hqq' is not supported"),
    (dict(method="awq", desc_act=True), "--desc-act"),
    (dict(method="awq", gptaq_alpha=0.25), "--gptaq-alpha .* is a GPTQ option"),
    (dict(gptaq_alpha=1.5), "--gptaq-alpha must be in"),
    (dict(group_size=256, strict_group_size=True), "does not divide"),
    (dict(method="awq", awq_grid=0), "--awq-grid must be positive"),
    (dict(method="awq", awq_scale_form="paper"), "--awq-scale-form must be one of duo, activation, both"),
    (dict(method="awq", compute_dtype="float16"), "--compute-dtype float16 is not available for AWQ"),
    (dict(method="gptq", compute_dtype="fp8"), "--compute-dtype must be one of auto, float32, bfloat16, float16"),
])
def test_rejects_out_of_range_parameters(tmp_path, tiny_base, prep, kw, match):
    _bad(tmp_path, tiny_base, match, calib=prep, **kw)


def test_rejects_too_little_or_missing_calibration_data(tmp_path, tiny_base, prep):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    _bad(tmp_path, tiny_base, "less than one block", calib=short)
    _bad(tmp_path, tiny_base, r"--n-samples 1000 needs .* lower --n-samples", calib=prep, n_samples=1000, seq_len=64)
    _bad(tmp_path, tiny_base, "needs calibration text", calib=None)
    _bad(tmp_path, tiny_base, "does not exist", calib=tmp_path / "nope.txt")
    (tmp_path / "plain").mkdir()
    _bad(tmp_path, tiny_base, "not a prepared-data folder", calib=tmp_path / "plain")


def _byte_tokens(prep: Path) -> int:
    """Calibration tokens of a prep's train split under the tiny models' byte tokenizer: UTF-8 bytes + one EOS
    per text (computed here, not by lorakit)."""
    texts = [json.loads(line)["text"] for line in (prep / "train.texts.jsonl").read_text().splitlines()]
    return sum(len(t.encode()) + 1 for t in texts)


def test_default_calibration_volume_takes_what_the_data_gives(tmp_path, tiny_base, prep):
    """`lorakit quantize M --calib PREP` with less text than the default 64 blocks (here of 1024 tokens): it
    calibrates on every block the data gives, warns, and records the rule; an explicit --n-samples the data cannot
    fill stays an error."""
    from lorakit.quantize.calibration import DEFAULT_N_SAMPLES, MIN_AUTO_SAMPLES
    from lorakit.quantize.metadata import read_quant_meta

    blocks = _byte_tokens(prep) // 1024
    assert MIN_AUTO_SAMPLES <= blocks < DEFAULT_N_SAMPLES, blocks  # the fixture is in the branch under test
    out = tmp_path / "auto"
    tasks_only = ("--calib-general", "none", "--seq-len", "1024")
    proc = run_cli("quantize", str(tiny_base), "-o", str(out), "--calib", str(prep), "--group-size", "32", *tasks_only,
                   "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: calibration data {prep} gives" in proc.stderr and f"calibrating on all {blocks}" in proc.stderr
    meta = read_quant_meta(out)
    assert meta.params.n_samples == blocks and meta.params.seq_len == 1024
    assert meta.calibration["n_samples"] == blocks and meta.calibration["n_samples_requested"] is None
    assert any(f"calibrating on all {blocks}" in n for n in meta.notes)
    assert meta.used_settings()["n_samples"] == blocks

    refused = tmp_path / "explicit"
    proc = run_cli("quantize", str(tiny_base), "-o", str(refused), "--calib", str(prep), "--n-samples",
                   str(DEFAULT_N_SAMPLES), *tasks_only)
    assert proc.returncode == 2 and f"--n-samples {DEFAULT_N_SAMPLES} needs" in proc.stderr
    assert_nothing_written(refused)


def test_default_calibration_volume_has_a_floor(tmp_path, tiny_base):
    from lorakit.quantize.calibration import MIN_AUTO_SAMPLES

    few = make_prep(tmp_path / "few", n_train=12)
    blocks = _byte_tokens(few) // 512
    assert 0 < blocks < MIN_AUTO_SAMPLES, blocks
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"{blocks} blocks of 512, fewer than the {MIN_AUTO_SAMPLES} .* "
                                         rf"--n-samples {blocks} to accept fewer"):
        quantize_model(tiny_base, out, calib=few, seq_len=512, progress=False)
    assert_nothing_written(out)
    # Asking for exactly what the data gives is the user's decision, and works.
    done = quantize_model(tiny_base, out, calib=few, n_samples=blocks, seq_len=512, group_size=32, progress=False)
    assert done.metadata["params"]["n_samples"] == blocks and not done.metadata["notes"]


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_base, prep):
    out = tmp_path / "out"
    proc = run_cli("quantize", str(tiny_base), "-o", str(out), "--bits", "5", "--calib", str(prep))
    assert proc.returncode == 2 and "'--bits': '5' is not one of '4', '8'" in proc.stderr  # the choices, from the options
    assert_nothing_written(out)


def test_refuses_an_existing_output_without_force(tmp_path, tiny_base, prep):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(InputError, match="already exists"):
        quantize_model(tiny_base, out, calib=prep, progress=False, **CALIB)
    assert list(out.iterdir()) == []


# --- the real model ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gptq_on_smollm2_loads_and_generates(tmp_path, real_base):
    """SmolLM2-135M with GPTQ on CPU: 576 is not a multiple of 128, so the group size is lowered to 64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prep = make_prep(tmp_path / "prep", n_train=40)
    out = tmp_path / "smol-gptq"
    result = quantize_model(real_base, out, method="gptq", bits=4, group_size=128, calib=prep, n_samples=4,
                            seq_len=64, progress=False)
    meta = read_quant_meta(out)
    assert result.group_size == 64 and meta.params.group_size_requested == 128 and "576" in meta.notes[0]
    assert meta.size_after_bytes < meta.size_before_bytes / 2
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3
    assert (out / QUANT_META).exists()


def test_gptq_runs_in_the_resolved_compute_dtype(quantized):
    """GPTQModel picks bfloat16 on every CPU by itself; lorakit hands it the resolved dtype and records it."""
    from lorakit.compute import dtype_name, resolve_compute_dtype

    expected = dtype_name(resolve_compute_dtype("auto", "quantize", "cpu"))
    for name in ("gptq4", "gptq8"):
        meta = read_quant_meta(quantized[name])
        assert meta.params.compute_dtype == expected
        assert meta.params.method_params["compute_dtype"] == expected  # the dtype GPTQModel's model was in
        # Unquantized tensors are stored in bfloat16 whatever the compute dtype (a float32 run must not grow them).
        from safetensors import safe_open

        with safe_open(str(quantized[name] / "model.safetensors"), "pt") as f:
            assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert meta.params.method_params["unquantized_storage_dtype"] == "bfloat16"


def test_calibration_mix_takes_general_blocks_from_the_corpus_end_the_gate_never_scores(tiny_base, prep):
    """Half the blocks are general text, cut from the shipped corpus's last document onward; the gate's general
    check reads the corpus from its first document (its default cap is far inside it), so they never overlap."""
    from transformers import AutoTokenizer

    from lorakit.data.general import general_text_path
    from lorakit.evaluate.text import read_eval_texts
    from lorakit.gate.general import DEFAULT_GENERAL_MAX_TOKENS
    from lorakit.quantize.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    plain = build_calibration(prep, tok, n_samples=8, seq_len=32, seed=0)
    mixed = build_calibration(prep, tok, n_samples=8, seq_len=32, seed=0, general="default", general_fraction=0.5)
    assert mixed.blocks.shape == plain.blocks.shape == (8, 32)
    assert torch.equal(mixed.blocks[:4], plain.blocks[:4])  # the tasks' share: the same first blocks
    docs = read_eval_texts(general_text_path()).texts
    last = tok(docs[-1], add_special_tokens=False)["input_ids"]
    assert mixed.blocks[4:].flatten().tolist() == last[: 4 * 32]
    first = tok(docs[0], add_special_tokens=False)["input_ids"]
    assert len(first) > DEFAULT_GENERAL_MAX_TOKENS  # the gate's default general text lies inside document 0
    summary = mixed.summary()["general"]
    assert summary["n_samples"] == 4 and summary["fraction"] == 0.5 and summary["documents"] == "last first"
    assert plain.summary()["general"] is None and mixed.tokens_digest != plain.tokens_digest


def test_calibration_never_takes_the_documents_the_gate_scores(tiny_base, tmp_path):
    """Asked for more general text than the corpus holds outside the documents the gate's default window reads,
    calibration refuses (naming them) instead of cutting into them; just under that, every general token comes from
    the other documents, last first."""
    from transformers import AutoTokenizer

    from lorakit.data.general import general_text_path
    from lorakit.evaluate.text import read_eval_texts
    from lorakit.gate.general import DEFAULT_GENERAL_MAX_TOKENS
    from lorakit.quantize.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    docs = read_eval_texts(general_text_path()).texts
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]  # each joined with one EOS
    gate_docs = next(i + 1 for i in range(len(docs)) if sum(lengths[: i + 1]) >= DEFAULT_GENERAL_MAX_TOKENS)
    outside = sum(lengths[gate_docs:])
    seq_len = 256
    fits = outside // seq_len
    tasks = tmp_path / "tasks.txt"  # enough task text for the other half of the blocks
    tasks.write_text("\n\n".join(f"task text number {i} and its answer {i * 7}" for i in range(4 * outside // 10)))
    ok = build_calibration(tasks, tok, n_samples=2 * fits, seq_len=seq_len, seed=0, general="default",
                           general_fraction=0.5)
    expected = []
    for d in reversed(docs[gate_docs:]):
        expected += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ok.blocks[-fits:].flatten().tolist() == expected[: fits * seq_len]
    assert ok.summary()["general"]["gate_documents_left_out"] == gate_docs
    with pytest.raises(InputError, match=f"outside the {gate_docs} document\\(s\\) the release gate scores"):
        build_calibration(tasks, tok, n_samples=2 * (fits + 1), seq_len=seq_len, seed=0, general="default",
                          general_fraction=0.5)


@pytest.mark.parametrize("kw, match", [
    ({"general": "default", "general_fraction": 1.0}, "must be in \\[0, 1\\)"),
    ({"general": "/nonexistent/general.txt", "general_fraction": 0.5}, "does not exist"),
])
def test_calibration_mix_bad_input_is_one_clear_error(tiny_base, prep, kw, match):
    from transformers import AutoTokenizer

    from lorakit.quantize.calibration import build_calibration

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    with pytest.raises(InputError, match=match):
        build_calibration(prep, tok, n_samples=8, seq_len=32, seed=0, **kw)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_rounding_that_cannot_fit_in_memory_is_refused_before_any_rounding(tiny_base, prep, tmp_path, monkeypatch,
                                                                           method):
    """The estimate is counted from the loaded model's own parameters and config here, not by the code under test;
    one byte short of it is refused with the fix and nothing written, exactly enough goes through."""
    from transformers import AutoModelForCausalLM

    from lorakit import runtime
    from lorakit.quantize.checks import (ROUNDING_BYTES_PER_PARAM, ROUNDING_HESSIAN_COPIES, ROUNDING_STATE_BYTES,
                                         rounding_memory_bytes)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    h, inter = model.config.hidden_size, model.config.intermediate_size
    linears = {id(m.weight) for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    in_linears = sum(p.numel() for p in model.parameters() if id(p) in linears)
    others = sum(p.numel() for p in model.parameters() if id(p) not in linears)  # a tied head is counted once
    per_linear, per_other = ROUNDING_BYTES_PER_PARAM[method, "float32"]
    need = rounding_memory_bytes(tiny_base, method, "float32", n_samples=CALIB["n_samples"], seq_len=64)
    assert need == {"weights": int(per_linear * in_linears + per_other * others),
                    "states": ROUNDING_STATE_BYTES[method] * CALIB["n_samples"] * 64 * h,
                    "hessians": ROUNDING_HESSIAN_COPIES * 4 * (6 * h * h + inter * inter)}
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: sum(need.values()) - 1)
    out = tmp_path / "q"
    kw = dict(method=method, calib=prep, progress=False, device="cpu", compute_dtype="float32", **CALIB)
    with pytest.raises(InputError, match=rf"{method.upper()} rounding in float32 needs about .*--n-samples"):
        quantize_model(tiny_base, out, **kw)
    assert_nothing_written(out)
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: sum(need.values()))
    assert quantize_model(tiny_base, out, **kw).output == out
