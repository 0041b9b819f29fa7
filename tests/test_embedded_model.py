"""The embedded default model: fetched from PyPI, converted once, verified by digest, and a real chat model."""

from __future__ import annotations

import shutil

import pytest

from lorakit.errors import LorakitError

pytestmark = pytest.mark.slow


def test_default_model_is_a_verified_hf_folder(real_base):
    from lorakit.io.atomic import read_json
    from lorakit.io.digests import file_manifest

    manifest = read_json(real_base / "lorakit_model.json")
    assert manifest["source"]["gguf_sha256"] and manifest["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    files = {k: v for k, v in file_manifest(real_base).items() if k != "lorakit_model.json"}
    assert files == manifest["files"] and "model.safetensors" in files


def test_default_model_generates_sensible_text(real_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_base)
    model = AutoModelForCausalLM.from_pretrained(real_base)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_corrupted_cache_is_detected(real_base, tmp_path, monkeypatch):
    import lorakit.models.embedded as embedded

    home = tmp_path / "home"
    shutil.copytree(real_base, home / "models" / embedded.DEFAULT_MODEL_NAME)
    monkeypatch.setenv("LORAKIT_HOME", str(home))
    copy = embedded.default_model_dir()
    assert embedded.ensure_default_model() == copy
    with open(copy / "config.json", "a") as fh:
        fh.write(" ")
    embedded._verified.discard(copy)
    with pytest.raises(LorakitError, match="does not match its manifest .* delete .* and run again"):
        embedded.ensure_default_model()
