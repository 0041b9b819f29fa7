"""``lorakit merge --method regmean``: W* = (Σₜ Wₜ G̃ₜ)(Σₜ G̃ₜ)⁻¹ per adapted linear layer.

The reference is computed here without lorakit's merge code: each task model is PEFT's own ``merge_and_unload``
of its adapter, its layer inputs are hooked document by document (no padding), and the closed form is evaluated on
the full weight matrices in float64. lorakit computes it in factor space (each A re-projected, then the linear
sum) from padded batches; both must give the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import InputError
from tests.conftest import assert_nothing_written, make_prep_dir, run_cli

ALPHA = 0.9


def _texts(chars: str, n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(chars) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(3, 12)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory) -> dict:
    from lorakit.models.synthetic import make_random_adapter

    root = tmp_path_factory.mktemp("regmean")
    preps = [make_prep_dir(root / "prep-letters", _texts("abcdefghijklm", 6, 1), _texts("abcdefghijklm", 20, 2)),
             make_prep_dir(root / "prep-digits", _texts("0123456789", 6, 3), _texts("0123456789", 20, 4))]
    adapters = [make_random_adapter(tiny_base, root / f"adapter-{k}", r=4, alpha=8, seed=10 + k, scale=0.2)
                for k in range(2)]
    return {"root": root, "base": tiny_base, "preps": preps, "adapters": adapters}


def _reference(base: Path, adapter: Path, prep: Path, examples: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights of base + adapter via PEFT, Gram matrices of every adapted layer's inputs), float64."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    model = model.merge_and_unload().eval()
    names = sorted({k.removeprefix("base_model.model.").split(".lora_A")[0]
                    for k in load_file(adapter / "adapter_model.safetensors") if ".lora_A" in k})
    assert names
    grams = {n: torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features,
                            dtype=torch.float64) for n in names}

    def hook_for(name: str):
        def hook(module, args):  # returns None: the input goes on unchanged
            x = args[0][0].double()
            grams[name].add_(x.T @ x)
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    tok = AutoTokenizer.from_pretrained(base)
    texts = [json.loads(line)["text"] for line in (prep / "train.texts.jsonl").read_text().splitlines()][:examples]
    with torch.no_grad():
        for t in texts:  # one document at a time: nothing to pad or mask
            model(torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]))
    for h in hooks:
        h.remove()
    return {n: model.get_submodule(n).weight.detach().double() for n in names}, grams


def _shrink(g: torch.Tensor) -> torch.Tensor:
    return ALPHA * g + (1 - ALPHA) * torch.diag(torch.diagonal(g))


def test_regmean_model_equals_the_closed_form_on_peft_models(setup, tmp_path):
    from lorakit.merge import merge_adapters

    examples = 12
    out = merge_adapters(setup["adapters"], [1.0, 1.0], tmp_path / "m", method="regmean", output_kind="model",
                         base=setup["base"], data=setup["preps"], regmean_examples=examples, progress=False)
    merged = load_file(out.output / "model.safetensors")
    refs = [_reference(setup["base"], a, p, examples) for a, p in zip(setup["adapters"], setup["preps"])]
    base = load_file(Path(setup["base"]) / "model.safetensors")
    assert out.metadata["method"] == "regmean" and out.metadata["regmean"]["examples"] == examples
    residual_ref: list[list[float]] = [[], []]
    for name in refs[0][0]:
        shrunk = [_shrink(g[name]) for _, g in refs]
        expected = torch.linalg.solve(sum(shrunk), sum(s @ w[name].T for (w, _), s in zip(refs, shrunk))).T
        got = merged[f"{name}.weight"].double()
        assert torch.allclose(got, expected, rtol=0, atol=5e-5 * float(expected.abs().max())), (
            name, float((got - expected).abs().max()), float((got - base[f"{name}.weight"].double()).abs().max()))
        for t, (w, g) in enumerate(refs):
            own = w[name] - base[f"{name}.weight"].double()
            diff = expected - w[name]
            residual_ref[t].append(float(((diff @ g[name]) * diff).sum() / ((own @ g[name]) * own).sum()) ** 0.5)
    # an untouched module is the base's
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    for t, rec in enumerate(out.metadata["regmean"]["residual"]):
        assert rec["max"] == pytest.approx(max(residual_ref[t]), rel=1e-4)
        assert rec["mean"] == pytest.approx(sum(residual_ref[t]) / len(residual_ref[t]), rel=1e-4)
        assert 0 < rec["mean"] < 1  # a compromise between the tasks, not either adapter alone


def test_regmean_adapter_output_is_the_same_update(setup, tmp_path):
    """As an adapter (rank Σrᵢ, no SVD) RegMean's update is exactly the model output's W* − W."""
    from lorakit.adapters import load_adapter
    from lorakit.merge import merge_adapters

    kw = dict(method="regmean", base=setup["base"], data=setup["preps"], regmean_examples=8, progress=False)
    model = merge_adapters(setup["adapters"], [1.0, 1.0], tmp_path / "m", output_kind="model", **kw)
    adapter = merge_adapters(setup["adapters"], [1.0, 1.0], tmp_path / "a", output_kind="adapter", **kw)
    assert adapter.exact
    weights, base = load_file(model.output / "model.safetensors"), load_file(Path(setup["base"]) / "model.safetensors")
    modules = load_adapter(adapter.output).modules
    assert {m.rank for m in modules.values()} == {8}  # r₁ + r₂, no truncation
    for name, module in modules.items():
        dense = weights[f"{name}.weight"] - base[f"{name}.weight"]
        assert torch.allclose(module.delta(), dense, atol=1e-6 * float(dense.abs().max()) + 1e-7), name


def test_one_adapter_is_its_own_update_and_its_data_is_still_checked(setup, tmp_path):
    """RegMean of one update is that update: the model equals the linear merge at weight 1, the record says no data
    was read; data given for it is still checked (a folder that is not a prep fails before anything is written)."""
    from lorakit.merge import merge_adapters

    one = setup["adapters"][:1]
    out = merge_adapters(one, [1.0], tmp_path / "rm", method="regmean", base=setup["base"],
                         data=setup["preps"][:1], output_kind="model", progress=False)
    linear = merge_adapters(one, [1.0], tmp_path / "lin", method="linear", base=setup["base"], output_kind="model",
                            progress=False)
    a, b = load_file(out.output / "model.safetensors"), load_file(linear.output / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "no task data was read" in out.metadata["regmean"]["note"]
    with pytest.raises(InputError, match="not a prepared-data folder"):
        merge_adapters(one, [1.0], tmp_path / "bad", method="regmean", base=setup["base"], data=[tmp_path],
                       output_kind="model", progress=False)
    assert not (tmp_path / "bad").exists()


def test_projection_properties():
    """One adapter: its own update back. The same Gram matrix for every adapter: the mean of the updates."""
    from lorakit.adapters import Adapter, LoraModule
    from lorakit.merge.regmean import project

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    gram = {"m": x.T @ x}

    def adapter(seed: int) -> Adapter:
        gen = torch.Generator().manual_seed(seed)
        module = LoraModule("m", torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen), 0.5)
        return Adapter(Path(f"a{seed}"), {}, {"m": module}, f"d{seed}", None)

    a, b = adapter(1), adapter(2)
    (alone,), report = project([a], [gram])
    assert torch.allclose(alone.modules["m"].delta(), a.modules["m"].delta(), atol=1e-5)
    assert report["residual"][0]["max"] < 1e-6
    both, _ = project([a, b], [gram, gram])
    merged = sum(m.modules["m"].delta() for m in both)
    assert torch.allclose(merged, (a.modules["m"].delta() + b.modules["m"].delta()) / 2, atol=1e-5)


def _anchor_reference(base: Path, names: list[str], tokens: int) -> dict[str, torch.Tensor]:
    """G₀ of the plain base (transformers, no lorakit) on the general text the anchor must read: the shipped
    corpus's documents after those the gate's first 8192 tokens cover, last first, each followed by EOS, cut at
    ``tokens``, in windows of 512."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    corpus = Path(__file__).resolve().parent.parent / "lorakit" / "data" / "general" / "sotu.jsonl"
    docs = [tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            for line in corpus.read_text().splitlines() if line.strip()]
    read, gate_docs = 0, len(docs)
    for i, d in enumerate(docs):
        read += len(d) + 1
        if read >= 8192:
            gate_docs = i + 1
            break
    stream: list[int] = []
    for d in reversed(docs[gate_docs:]):
        stream += d + [tok.eos_token_id]
    stream = stream[:tokens]
    assert len(stream) == tokens
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    grams = {n: torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features,
                            dtype=torch.float64) for n in names}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0][0].double()
            grams[name].add_(x.T @ x)
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        for i in range(0, len(stream), 512):
            model(torch.tensor([stream[i:i + 512]]))
    for h in hooks:
        h.remove()
    return grams


def test_general_text_anchor_equals_its_closed_form_and_pulls_toward_the_base(setup, tmp_path):
    """regmean_anchor λ: W* = (Σₜ Wₜ G̃ₜ + c·W G̃₀)(Σₜ G̃ₜ + c·G̃₀)⁻¹, c = λ·(mean task tokens)/(anchor tokens), G₀
    the base's inputs on general text outside the gate's documents. λ = 0 is RegMean itself; a larger λ keeps the
    merged model's outputs closer to the base's on that text."""
    from lorakit.merge import merge_adapters
    from lorakit.merge.regmean import ANCHOR_TOKENS

    examples, lam = 12, 2.0
    kw = dict(method="regmean", output_kind="model", base=setup["base"], data=setup["preps"],
              regmean_examples=examples, progress=False)
    plain = merge_adapters(setup["adapters"], [1.0, 1.0], tmp_path / "plain", **kw)
    off = merge_adapters(setup["adapters"], [1.0, 1.0], tmp_path / "off", regmean_anchor=0.0, **kw)
    out = merge_adapters(setup["adapters"], [1.0, 1.0], tmp_path / "anchored", regmean_anchor=lam, **kw)
    a, b = load_file(plain.output / "model.safetensors"), load_file(off.output / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and off.metadata["regmean"]["anchor"] is None

    record = out.metadata["regmean"]["anchor"]
    assert record["weight"] == lam and record["tokens"] == ANCHOR_TOKENS and record["gate_documents_left_out"] >= 1
    refs = [_reference(setup["base"], ad, p, examples) for ad, p in zip(setup["adapters"], setup["preps"])]
    names = sorted(refs[0][0])
    g0 = _anchor_reference(setup["base"], names, ANCHOR_TOKENS)
    task_tokens = out.metadata["regmean"]["tokens"]
    c = lam * (sum(task_tokens) / len(task_tokens)) / ANCHOR_TOKENS
    assert record["gram_scale"] == pytest.approx(c, rel=1e-12)
    merged = load_file(out.output / "model.safetensors")
    base = load_file(Path(setup["base"]) / "model.safetensors")
    closer = 0
    for name in names:
        shrunk = [_shrink(g[name]) for _, g in refs]
        anchor = c * _shrink(g0[name])
        w0 = base[f"{name}.weight"].double()
        expected = torch.linalg.solve(sum(shrunk) + anchor,
                                      sum(s @ w[name].T for (w, _), s in zip(refs, shrunk)) + anchor @ w0.T).T
        got = merged[f"{name}.weight"].double()
        assert torch.allclose(got, expected, rtol=0, atol=5e-5 * float(expected.abs().max())), name
        # on the anchor's inputs the anchored update moves the outputs less than RegMean's own
        plain_delta = a[f"{name}.weight"].double() - w0
        closer += float(((got - w0) @ g0[name] * (got - w0)).sum()) < float((plain_delta @ g0[name] * plain_delta).sum())
    assert closer == len(names)


def test_anchor_weight_is_checked_before_anything_loads(setup, tmp_path):
    from lorakit.merge import merge_adapters

    with pytest.raises(InputError, match="regmean anchor must be a finite weight >= 0"):
        merge_adapters(setup["adapters"], [1.0, 1.0], tmp_path / "bad", method="regmean", output_kind="model",
                       base=setup["base"], data=setup["preps"], regmean_anchor=-1.0, progress=False)
    assert not (tmp_path / "bad").exists()


def test_bad_input_is_refused_before_writing(setup, tmp_path):
    from lorakit.merge import merge_adapters

    kw = dict(method="regmean", output_kind="model", base=setup["base"], progress=False)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="needs the task data"):
        merge_adapters(setup["adapters"], [1.0, 1.0], out, **kw)
    with pytest.raises(InputError, match="1 data folder"):
        merge_adapters(setup["adapters"], [1.0, 1.0], out, data=setup["preps"][:1], **kw)
    with pytest.raises(InputError, match="not a prepared-data folder"):
        merge_adapters(setup["adapters"], [1.0, 1.0], out, data=[setup["preps"][0], tmp_path], **kw)
    with pytest.raises(InputError, match="--data applies to --method regmean"):
        merge_adapters(setup["adapters"], [1.0, 1.0], out, method="linear", data=setup["preps"], progress=False)
    with pytest.raises(InputError, match="takes no --regmean_alpha"):
        merge_adapters(setup["adapters"], [1.0, 1.0], out, method="linear", regmean_alpha=0.5, progress=False)
    assert_nothing_written(out)
    r = run_cli("merge", *map(str, setup["adapters"]), "--method", "regmean", "-o", str(out))
    assert r.returncode != 0 and "--data PREP" in r.stderr
    assert_nothing_written(out)


def test_memory_estimate_is_what_regmean_holds_and_a_shortfall_is_refused_before_loading(setup, tmp_path,
                                                                                       monkeypatch):
    from lorakit import runtime
    from lorakit.adapters import load_adapter
    from lorakit.merge import merge_adapters
    from lorakit.merge.regmean import collect_grams, gram_count, input_sharing, memory_bytes
    from lorakit.models.folder import linear_weight_shapes

    adapters = [load_adapter(a) for a in setup["adapters"]]
    # the shapes read from the base's weight headers are those of the modules PEFT's all-linear picked
    # (make_random_adapter), as its LoRA factors give them: out from B, in from A
    shapes = linear_weight_shapes(setup["base"], "all-linear")
    assert shapes == {n: (m.B.shape[0], m.A.shape[1]) for n, m in adapters[0].modules.items()}
    assert linear_weight_shapes(setup["base"], ["q_proj", "down_proj"]).keys() == {
        n for n in shapes if n.endswith((".q_proj", ".down_proj"))}
    grams, _, _ = collect_grams(setup["base"], adapters, setup["preps"], examples=2, progress=False)
    held = sum(g.numel() * g.element_size() for g in {id(g): g for gram in grams for g in gram.values()}.values())
    # q/k/v read one input and gate/up another (a Llama's structure, written out here): one Gram matrix each
    layers = {n.rsplit(".", 2)[0] for n in shapes}
    expected = {f"{layer}.{part}.{m}": f"{layer}.{part}.{first}" for layer in layers
                for part, first, rest in (("self_attn", "q_proj", ("k_proj", "v_proj")), ("mlp", "gate_proj", ("up_proj",)))
                for m in rest}
    shared = input_sharing(setup["base"], list(shapes))
    assert shared == expected
    assert all(gram[n] is gram[o] for gram in grams for n, o in shared.items())
    assert memory_bytes(shapes, gram_count(2, 0.0), 0, shared)["grams"] == held
    assert memory_bytes(shapes, gram_count(2, 0.0), 0)["grams"] > held  # without sharing: an upper bound
    odd = tmp_path / "odd"  # an architecture transformers cannot build: no sharing assumed (the upper bound)
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert input_sharing(odd, list(shapes)) == {}
    assert gram_count(2, 1.0) == 3 and gram_count(2, None) == 2

    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 1 << 20)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"method regmean needs about [\d.]+ MB at once and 1\.0 MB of memory is "
                                         r"available: .* Merge with method linear or ties"):
        merge_adapters(setup["adapters"], [1.0, 1.0], out, method="regmean", output_kind="model", base=setup["base"],
                       data=setup["preps"], progress=False)
    assert_nothing_written(out)


def test_cli_takes_named_data(setup, tmp_path):
    out = tmp_path / "cli"
    r = run_cli("merge", *map(str, setup["adapters"]), "--method", "regmean", "--regmean-examples", "4",
                *[x for k, p in enumerate(setup["preps"]) for x in ("--data", f"t{k}={p}")], "--base", str(setup["base"]),
                "--output-kind", "model", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "lorakit_merge.json").read_text())
    assert meta["regmean"]["data"] == [str(p) for p in setup["preps"]] and meta["regmean"]["examples"] == 4


def test_release_config_uses_the_preps_with_or_without_search():
    from flows.config import ReleaseConfig
    from flows.plan import ReleasePlan

    cfg = ReleaseConfig(merge={"method": "regmean", "search": None})
    assert cfg.merge_search() is None
    plan = ReleasePlan(cfg).merge(["a", "b"], {ds.name: f"/prep/{ds.name}" for ds in cfg.datasets})
    assert plan["params"]["data"] == [f"/prep/{ds.name}" for ds in cfg.datasets] and "search" not in plan["params"]
    searched = ReleaseConfig(merge={"method": "regmean", "search": {"max_trials": 4}})
    plan = ReleasePlan(searched).merge(["a", "b"], {ds.name: f"/prep/{ds.name}" for ds in cfg.datasets})
    # asked for, the search weighs RegMean's projected updates; it reads the same folders from its own data
    assert plan["params"]["search"]["methods"] == ["regmean"] and "data" not in plan["params"]
