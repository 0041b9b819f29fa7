"""lorakit export: GGUF files llama.cpp and transformers read the same model from, and portable PEFT adapters.

References are computed here, independently of lorakit's exporter: expected GGUF tensor names from the config,
the Q/K row order by an explicit index loop, quantization error bounds from the block formats' definitions, and
transformers' own GGUF loader as the reader.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_nothing_written, make_eval_text, run_cli

LAYER_NAMES = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
SAMPLE_TEXTS = ["Hello world, 12345 tokens!", "  leading spaces and\ttabs\nnew lines", "<|im_start|>user\nhi<|im_end|>",
                "ünïcödé — and emoji 🙂", "the model reads a short line of text"]


def _reader(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _expected_names(config: dict) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"}
    if not config.get("tie_word_embeddings", True):
        names.add("output.weight")
    for i in range(config["num_hidden_layers"]):
        names |= {f"blk.{i}.{n}.weight" for n in LAYER_NAMES}
    return names


def _hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().float() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def _gguf_state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _error_bound(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """Largest |w - dequant(quant(w))| each element may have, from the format definitions (float64).

    f16: round to nearest with 11 significant bits: |e| <= |w|·2^-11, or 2^-25 in the subnormal range.
    q8_0: blocks of 32 along a row share d = max|w|/127, stored as f16; q = round(w/d) in [-127, 127], so
    |w - q·fp16(d)| <= d/2 + 127·|d - fp16(d)| <= d·(1/2 + 127·2^-11).
    """
    w = w.double()
    if w.dim() == 1 or qtype == "f32":
        return torch.zeros_like(w)
    if qtype == "f16":
        return torch.maximum(w.abs() * 2.0**-11, torch.full_like(w, 2.0**-25))
    blocks = w.reshape(w.shape[0], -1, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return (d * (0.5 + 127 * 2.0**-11)).expand_as(blocks).reshape(w.shape) + 1e-12


def _export(src: Path, out: Path, qtype: str, **kw):
    from lorakit.export import export_gguf

    return export_gguf(src, out, qtype=qtype, progress=False, **kw)


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_weights_round_trip_within_the_format_bound(tmp_path, tiny_base, tiny_tied_base, qtype, tied):
    src = tiny_tied_base if tied else tiny_base
    out = tmp_path / f"m.{qtype}.gguf"
    _export(src, out, qtype)
    config = json.loads((src / "config.json").read_text())
    reader = _reader(out)
    assert {t.name for t in reader.tensors} == _expected_names(config)
    ref = _hf_state(src)
    for t in reader.tensors:  # GGUF lists dimensions innermost first
        hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}.get(t.name)
        if hf is not None:
            assert list(t.shape) == list(reversed(ref[hf].shape)), t.name
    got = _gguf_state(out)
    assert set(got) == set(ref)
    for name, w in ref.items():
        err = (got[name].double() - w.double()).abs()
        bound = _error_bound(w, qtype)
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item():.3g}"
    if tied:
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_q_and_k_rows_are_in_llama_cpps_pair_order(tmp_path, tiny_base):
    """Row h·d + 2i + s of the GGUF tensor is row h·d + s·d/2 + i of HF's (s = which half of the rotary pair)."""
    out = tmp_path / "m.f16.gguf"
    _export(tiny_base, out, "f16")
    config = json.loads((tiny_base / "config.json").read_text())
    ref = _hf_state(tiny_base)
    tensors = {t.name: np.asarray(t.data) for t in _reader(out).tensors}
    d = config["hidden_size"] // config["num_attention_heads"]
    for proj, heads in (("q", config["num_attention_heads"]), ("k", config["num_key_value_heads"])):
        hf = ref[f"model.layers.0.self_attn.{proj}_proj.weight"].numpy()
        stored = tensors[f"blk.0.attn_{proj}.weight"].astype(np.float32)
        expected = np.empty_like(hf)
        for h in range(heads):
            for i in range(d // 2):
                for s in range(2):
                    expected[h * d + 2 * i + s] = hf[h * d + s * (d // 2) + i]
        np.testing.assert_array_equal(stored, expected.astype(np.float16).astype(np.float32))


def test_gguf_metadata_tokenizer_and_provenance(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    from lorakit.export import read_export_meta
    from lorakit.models.folder import weights_digest

    out = tmp_path / "m.q8_0.gguf"
    _export(tiny_base, out, "q8_0")
    config = json.loads((tiny_base / "config.json").read_text())
    fields = _reader(out).fields
    value = {k: f.contents() for k, f in fields.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")}
    assert value["general.architecture"] == "llama"
    assert value["llama.block_count"] == config["num_hidden_layers"]
    assert value["llama.context_length"] == config["max_position_embeddings"]
    assert value["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert value["llama.rope.dimension_count"] == config["hidden_size"] // config["num_attention_heads"]
    assert math.isclose(value["llama.attention.layer_norm_rms_epsilon"], config["rms_norm_eps"], rel_tol=1e-6)
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    meta = read_export_meta(out)
    assert meta["lorakit.type"] == "q8_0" and meta["general.file_type"] == 7
    assert meta["lorakit.source_weights_digest"] == weights_digest(tiny_base)

    want = AutoTokenizer.from_pretrained(tiny_base)
    got = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in SAMPLE_TEXTS:
        assert got(text)["input_ids"] == want(text)["input_ids"], text
    for role in ("bos", "eos", "unk", "pad"):
        assert getattr(got, f"{role}_token_id") == getattr(want, f"{role}_token_id"), role
    chat = [{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "c b a"}]
    assert got.apply_chat_template(chat, tokenize=False) == want.apply_chat_template(chat, tokenize=False)
    assert got.apply_chat_template(chat, tokenize=True) == want.apply_chat_template(chat, tokenize=True)


def test_evaluator_and_gate_take_a_gguf_candidate(tmp_path, tiny_base):
    from lorakit.evaluate import evaluate_models
    from lorakit.gate import check

    out = tmp_path / "gguf" / "m.f16.gguf"
    _export(tiny_base, out, "f16")
    texts = [make_eval_text(200, seed=s) for s in range(3)]
    base, cand = evaluate_models([tiny_base, out], texts, seq_len=128, progress=False)
    assert cand.path_used == "gguf-dequantized" and cand.model["kind"] == "gguf"
    # f16 weights: the perplexity moves by far less than the gate's resolution
    assert abs(cand.ppl / base.ppl - 1) < 1e-3
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    verdict = check(tiny_base, out.parent, data, seq_len=128, progress=False)  # the folder holding one GGUF
    assert verdict.passed and verdict.metadata["candidate"]["path_used"] == "gguf-dequantized"


def test_registered_gguf_folder_is_evaluated_by_reference(tmp_path, tiny_base, monkeypatch):
    """The release flow's form: a folder with model.<type>.gguf + lorakit_export.json, registered as kind gguf."""
    from lorakit.evaluate import describe_model
    from lorakit.export import export_gguf_folder
    from registry import Registry

    folder = export_gguf_folder(tiny_base, tmp_path / "gguf", qtype="q8_0", progress=False).output
    assert sorted(p.name for p in folder.iterdir()) == ["lorakit_export.json", "model.q8_0.gguf"]
    monkeypatch.setenv("LORAKIT_REGISTRY", str(tmp_path / "registry"))
    version = Registry().register(folder, name="tiny-gguf", kind="gguf")
    assert version.metadata["lorakit_export.json"]["type"] == "q8_0"
    spec = describe_model("tiny-gguf@1")
    assert spec.kind == "gguf" and spec.folder.name == "model.q8_0.gguf"
    from lorakit.errors import InputError

    with pytest.raises(InputError, match="no \\*.gguf file"):
        Registry().register(tiny_base, name="not-gguf", kind="gguf")


def test_cli_export_refuses_existing_output_and_bad_sources(tmp_path, tiny_base):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    proc = run_cli("export", str(tiny_base), "--format", "gguf", "--type", "q8_0", "-o", str(out))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert out.read_bytes() == b"keep"
    proc = run_cli("export", str(tiny_base), "--format", "gguf", "--type", "q4_0", "-o", str(out), "--force", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and out.read_bytes()[:4] == b"GGUF"


def test_unsupported_architecture_is_refused_and_nothing_written(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.errors import InputError
    from lorakit.models.tiny import make_byte_tokenizer

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=320)).save_pretrained(src)
    make_byte_tokenizer().save_pretrained(src)
    out = tmp_path / "out.gguf"
    with pytest.raises(InputError, match="gpt2 model .* Llama-architecture models"):
        _export(src, out, "q8_0")
    assert_nothing_written(out)


def test_quantized_source_is_refused_and_nothing_written(tmp_path, tiny_base):
    from lorakit.errors import InputError
    from lorakit.quantize import quantize_model

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(make_eval_text(200, seed=s) for s in range(8)))
    gptq = quantize_model(tiny_base, tmp_path / "gptq", method="gptq", bits=4, group_size=32, calib=calib,
                          n_samples=4, seq_len=64, progress=False).output
    out = tmp_path / "out.gguf"
    with pytest.raises(InputError, match="already quantized \\(gptq\\)"):
        _export(gptq, out, "q8_0")
    assert_nothing_written(out)


def test_a_failure_mid_write_leaves_nothing(tmp_path, tiny_base):
    """A NaN in the last tensor is found while writing: the partial file must vanish."""
    from safetensors.torch import load_file, save_file

    from lorakit.errors import InputError

    src = tmp_path / "broken"
    shutil.copytree(tiny_base, src)
    state = load_file(src / "model.safetensors")
    state["model.norm.weight"][0] = float("nan")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    with pytest.raises(InputError, match="NaN or Inf"):
        _export(src, out, "f16")
    assert_nothing_written(out)


# --- portable PEFT adapters -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rslora_adapter(tiny_base, tmp_path_factory) -> Path:
    """An rsLoRA adapter with rank_pattern and alpha_pattern, random non-zero B (as after training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"],
                     rank_pattern={"down_proj": 4, "layers.1.self_attn.q_proj": 2},
                     alpha_pattern={"v_proj": 5.0, "up_proj": 64.0}, lora_dropout=0.0)
    peft = get_peft_model(model, cfg)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    out = tmp_path_factory.mktemp("adapters") / "rslora"
    peft.save_pretrained(out)
    return out


def _peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_portable_adapter_gives_the_same_logits_with_scaling_one(tmp_path, tiny_base, rslora_adapter):
    from lorakit.export import export_portable_adapter

    out = tmp_path / "portable"
    export_portable_adapter(rslora_adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"] == 8
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    ids = torch.randint(4, 260, (2, 48), generator=torch.Generator().manual_seed(0))
    want = _peft_logits(tiny_base, rslora_adapter, ids)
    got = _peft_logits(tiny_base, out, ids)
    assert (got - want).abs().max().item() <= 1e-5
    # the update is large enough that a lost scaling would show: alpha/r instead of alpha/sqrt(r) moves the logits
    naive = json.loads((rslora_adapter / "adapter_config.json").read_text())
    naive["use_rslora"] = False
    wrong = tmp_path / "naive"
    shutil.copytree(rslora_adapter, wrong)
    (wrong / "adapter_config.json").write_text(json.dumps(naive))
    assert (_peft_logits(tiny_base, wrong, ids) - want).abs().max().item() > 1e-3
    meta = json.loads((out / "lorakit_export.json").read_text())
    assert meta["padded_modules"] > 0 and meta["source_config"]["use_rslora"] is True


def test_portable_cli_refuses_existing_output(tmp_path, rslora_adapter):
    out = tmp_path / "portable"
    out.mkdir()
    proc = run_cli("export", str(rslora_adapter), "--format", "peft", "--portable", "-o", str(out))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert not any(out.iterdir())
    proc = run_cli("export", str(rslora_adapter), "--format", "peft", "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--portable" in proc.stderr
    assert not (tmp_path / "x").exists()
