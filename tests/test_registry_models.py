"""Registry artifacts are real model folders: export/resolve load in plain transformers and PEFT, and every
lorakit option that takes a model or adapter path accepts a registry reference."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import InputError
from lorakit.io.digests import file_manifest
from registry import Registry


@pytest.fixture
def registered(tiny_base, tmp_path, monkeypatch):
    from lorakit.models.synthetic import make_random_adapter

    monkeypatch.setenv("LORAKIT_REGISTRY", str(tmp_path / "registry"))
    adapter = make_random_adapter(tiny_base, tmp_path / "adapter", r=4, alpha=8, seed=3)
    with Registry() as reg:
        base = reg.register(tiny_base, name="tiny", kind="base")
        ad = reg.register(adapter, name="tiny-lora", kind="adapter", parents=[base.ref], params={"r": 4})
        reg.set_alias(ad.ref, "candidate")
        yield reg, base, ad, adapter


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 9, 42, 7, 100]])).logits


def test_export_loads_in_plain_transformers_and_peft(registered, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg, base, ad, adapter = registered
    base_out = reg.export(base.ref, tmp_path / "exported-base")
    ad_out = reg.export("tiny-lora@candidate", tmp_path / "exported-adapter")
    assert file_manifest(base_out) == file_manifest(tiny_base)
    assert file_manifest(ad_out) == file_manifest(adapter)

    original = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    expected = _logits(PeftModel.from_pretrained(original, adapter))
    exported = AutoModelForCausalLM.from_pretrained(base_out, dtype=torch.float32)
    AutoTokenizer.from_pretrained(base_out)
    got = _logits(PeftModel.from_pretrained(exported, ad_out))
    assert torch.equal(got, expected)
    # resolve() hands out a checkout that loads the same way, without copying.
    resolved = AutoModelForCausalLM.from_pretrained(reg.resolve("tiny@latest"), dtype=torch.float32)
    assert torch.equal(_logits(PeftModel.from_pretrained(resolved, reg.resolve(ad.ref))), expected)
    # An export is the exact artifact: registering it again is the same version.
    assert reg.register(ad_out, name="tiny-lora", kind="adapter").ref == ad.ref
    with pytest.raises(InputError, match="already exists"):
        reg.export(base.ref, base_out)


def test_lorakit_model_and_adapter_options_accept_registry_refs(registered):
    from lorakit.adapters import load_adapter
    from lorakit.models.folder import resolve_model_dir

    reg, base, ad, adapter = registered
    assert resolve_model_dir("tiny@1") == reg.resolve(base.ref)
    assert resolve_model_dir(f"sha256:{base.digest[:16]}") == reg.resolve(base.ref)
    loaded = load_adapter("tiny-lora@candidate")
    direct = load_adapter(adapter)
    assert loaded.digest == direct.digest and set(loaded.modules) == set(direct.modules)
    with pytest.raises(InputError, match="has no alias 'production'"):
        resolve_model_dir("tiny@production")
    with pytest.raises(InputError, match="no artifact named 'nope'"):
        load_adapter("nope@1")


def test_merge_cli_takes_registry_refs_and_the_result_registers_with_lineage(registered, tiny_base, tmp_path):
    from tests.conftest import run_cli
    from lorakit.models.synthetic import make_random_adapter

    reg, base, ad, _ = registered
    second = reg.register(make_random_adapter(tiny_base, tmp_path / "ad2", r=4, alpha=8, seed=4), name="tiny-lora",
                          kind="adapter", parents=[base.ref])
    out = tmp_path / "merged"
    run_cli("merge", "tiny-lora@candidate", second.ref, "-w", "0.5,0.5", "--output-kind", "model", "--base", "tiny@1",
            "-o", str(out), check=True)
    merged = reg.register(out, name="tiny-merged", kind="merged",
                          parents=[(ad.ref, {"weight": 0.5}), (second.ref, {"weight": 0.5})])
    assert "lorakit_merge.json" in merged.metadata
    tree = reg.lineage(merged.ref)
    assert {p.artifact.ref for p in tree.parents} == {"tiny-lora@1", "tiny-lora@2"}
    assert {pp.artifact.ref for p in tree.parents for pp in p.parents} == {"tiny@1"}


def test_prepared_data_from_a_registered_base_registers_as_a_dataset(registered, tmp_path):
    from lorakit.data.prep import prepare_dataset

    reg, base, _, _ = registered
    prep = prepare_dataset(["bundled:reverse-words"], tmp_path / "prep", base="tiny@1", max_length=128, progress=False)
    data = reg.register(prep.output, name="reverse-words", kind="dataset", parents=[base.ref], params={"max_length": 128})
    assert data.metadata["prep.json"] == prep.metadata
    assert [n.artifact.ref for n in reg.lineage(data.ref).walk()] == ["reverse-words@1", "tiny@1"]
    assert [v.ref for v in reg.descendants(base.ref)] == ["reverse-words@1", "tiny-lora@1"]
