"""Every merge method against a direct computation of its definition, on tiny random models.

The references below are written independently of lorakit's implementation (sorting instead of topk, explicit
loops for sign election, scalings from the adapter configs by hand), so a shared bug cannot hide.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.merge import merge_adapters
from lorakit.models.synthetic import make_random_adapter
from tests.merge_reference import hand_deltas

TOL = 1e-5
WEIGHTS = [0.7, -0.4, 0.5]


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> list[Path]:
    """Mixed ranks and alphas, rsLoRA, and a rank/alpha pattern: everything that changes the scaling."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    return [
        make_random_adapter(tiny_base, root / "a", r=4, alpha=8, seed=1, model=model),
        make_random_adapter(tiny_base, root / "b", r=8, alpha=32, use_rslora=True, seed=2, model=model),
        make_random_adapter(tiny_base, root / "c", r=6, alpha=6, seed=3, model=model,
                            rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 12}),
    ]


def keep_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, math.floor(density * delta.numel()))  # PEFT's and mergekit's convention
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def documented_mask(shape: torch.Size, density: float, seed: int, module: str, digest: str,
                    occurrence: int = 0) -> torch.Tensor:
    """DARE's keep-mask written from the README's seeding rule, not from lorakit's code."""
    key = f"{seed}/{module}/{digest}/{occurrence}".encode()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1)
    return torch.rand(tuple(shape), generator=g, dtype=torch.float32) < density


def dare(delta: torch.Tensor, density: float, seed: int, module: str, digest: str) -> torch.Tensor:
    keep = documented_mask(delta.shape, density, seed, module, digest)
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def ambiguous_sign(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Entries whose elected sign is undefined in float32: the weighted sum is zero within its rounding error
    (lorakit computes in float32, this reference in float64, so the two may elect differently there and only there)."""
    weighted = [d * w for d, w in zip(deltas, weights)]
    magnitude = sum(wd.abs() for wd in weighted)
    return (magnitude > 0) & (sum(weighted).abs() <= 1e-6 * magnitude)


def elect(deltas: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    weighted = [d * w for d, w in zip(deltas, weights)]
    total = sum(weighted)
    out = torch.zeros_like(total)
    div = torch.zeros_like(total)
    for wd, w in zip(weighted, weights):
        agree = (torch.sign(wd) == torch.sign(total)) & (wd != 0)
        out += torch.where(agree, wd, torch.zeros_like(wd))
        div += torch.where(agree, torch.full_like(wd, w), torch.zeros_like(wd))
    if normalize:
        out = torch.where(div.abs() > 1e-12, out / torch.where(div.abs() > 1e-12, div, torch.ones_like(div)), out)
    return out


def trimmed(method: str, deltas: list[torch.Tensor], module: str, density: float, seed: int,
            digests: list[str]) -> list[torch.Tensor]:
    """The updates a sign election sees: top-k trimmed (ties) or DARE-dropped and rescaled (dare_ties)."""
    if method == "ties":
        return [keep_top(d, density) for d in deltas]
    return [dare(d, density, seed, module, h) for d, h in zip(deltas, digests)]


def reference(method: str, deltas: list[torch.Tensor], module: str, density: float, seed: int,
              normalize: bool, digests: list[str] | None = None) -> torch.Tensor:
    if method == "linear":
        return sum(d * w for d, w in zip(deltas, WEIGHTS))
    if method == "magnitude_prune":
        return sum(keep_top(d, density) * w for d, w in zip(deltas, WEIGHTS))
    if method == "dare_linear":
        return sum(dare(d, density, seed, module, h) * w for d, w, h in zip(deltas, WEIGHTS, digests))
    if method == "ties":
        return elect([keep_top(d, density) for d in deltas], WEIGHTS, normalize)
    if method == "dare_ties":
        return elect([dare(d, density, seed, module, h) for d, h in zip(deltas, digests)], WEIGHTS, normalize)
    raise AssertionError(method)


CASES = [
    ("linear", {}),
    ("magnitude_prune", {"density": 0.3}),
    ("dare_linear", {"density": 0.5, "seed": 7}),
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "normalize": True}),
    ("dare_ties", {"density": 0.6, "seed": 3, "normalize": True}),
]


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p in CASES])
def test_model_output_matches_direct_computation(method, params, adapters, tiny_base, tmp_path):
    out = tmp_path / "merged"
    merge_adapters(adapters, WEIGHTS, out, method=method, output_kind="model", base=tiny_base, progress=False, **params)
    base = load_file(tiny_base / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    deltas = hand_deltas(adapters)
    meta = json.loads((out / "lorakit_merge.json").read_text())
    digests = [i["digest"] for i in meta["inputs"]]  # the seeding rule names the digests recorded here
    assert set(merged) == set(base)
    worst, ambiguous, entries = 0.0, 0, 0
    for name, w in base.items():
        module = name[: -len(".weight")]
        if module in deltas:
            args = (params.get("density", 1.0), params.get("seed", 0))
            want = w.double() + reference(method, deltas[module], module, *args, params.get("normalize", False),
                                          digests)
            error = (merged[name].double() - want).abs()
            if method in ("ties", "dare_ties"):  # a sign elected from a sum that is zero within rounding: skip it
                skip = ambiguous_sign(trimmed(method, deltas[module], module, *args, digests), WEIGHTS)
                error = torch.where(skip, torch.zeros_like(error), error)
                ambiguous += int(skip.sum())
            entries += error.numel()
            worst = max(worst, error.max().item())
        else:
            assert torch.equal(merged[name], w), f"{name} is not a target but changed"
    assert worst <= TOL, f"{method}: max abs error {worst:.2e}"
    assert ambiguous <= entries // 1000, f"{ambiguous} of {entries} entries have an ambiguous elected sign"
    assert meta["method"] == method and meta["weights"] == WEIGHTS and meta["compute_dtype"] == "float32"
    assert [i["digest"] for i in meta["inputs"]] and meta["negative_weights"] == [str(adapters[1])]
    assert meta["base"]["weights_digest"]


def test_exact_adapter_output_is_the_weighted_sum(adapters, tmp_path):
    out = tmp_path / "merged"
    result = merge_adapters(adapters, WEIGHTS, out, progress=False)
    assert result.exact and result.relative_error is None
    merged = hand_deltas([out])
    for module, deltas in hand_deltas(adapters).items():
        want = sum(d * w for d, w in zip(deltas, WEIGHTS))
        assert (merged[module][0] - want).abs().max().item() <= TOL
    cfg = json.loads((out / "adapter_config.json").read_text())
    # rank Σrᵢ (4 + 8 + 6), and q_proj where adapter c has rank 2: 4 + 8 + 2
    assert cfg["r"] == 18 and all(v == 14 for v in cfg["rank_pattern"].values())
    assert cfg["lora_alpha"] == cfg["r"] and not cfg["use_rslora"]


@pytest.mark.parametrize("method,params", [("linear", {}), ("ties", {"density": 0.5})])
def test_rank_k_reports_its_true_error(method, params, adapters, tmp_path):
    out = tmp_path / "merged"
    result = merge_adapters(adapters, WEIGHTS, out, method=method, rank=4, progress=False, **params)
    merged = hand_deltas([out])
    err_sq = norm_sq = 0.0
    for module, deltas in hand_deltas(adapters).items():
        want = reference(method, deltas, module, params.get("density", 1.0), 0, False)
        got = merged[module][0]
        err = (got - want).norm().item()
        assert result.metadata["per_module_relative_error"][module] == pytest.approx(err / want.norm().item(), rel=1e-4, abs=1e-7)
        err_sq += err**2
        norm_sq += want.norm().item() ** 2
        assert got.shape == want.shape
    assert result.relative_error == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-4)
    assert 0 < result.relative_error < 1 and not result.exact
    # The truncation is optimal: no rank-4 matrix is closer than the SVD's (Eckart–Young) -- check one module.
    module, deltas = next(iter(hand_deltas(adapters).items()))
    want = reference(method, deltas, module, params.get("density", 1.0), 0, False)
    s = torch.linalg.svdvals(want)
    assert result.metadata["per_module_relative_error"][module] == pytest.approx(
        (s[4:].square().sum().sqrt() / s.square().sum().sqrt()).item(), rel=1e-4)


def test_rank_at_least_total_rank_is_exact(adapters, tmp_path):
    result = merge_adapters(adapters, WEIGHTS, tmp_path / "m", rank=18, progress=False)
    assert result.relative_error < 1e-6


def test_dare_is_deterministic_and_keeps_density(adapters, tiny_base, tmp_path):
    a = merge_adapters(adapters[:1], [1.0], tmp_path / "a", method="dare_linear", density=0.3, seed=5,
                       output_kind="model", base=tiny_base, progress=False)
    b = merge_adapters(adapters[:1], [1.0], tmp_path / "b", method="dare_linear", density=0.3, seed=5,
                       output_kind="model", base=tiny_base, progress=False)
    ta, tb = load_file(a.output / "model.safetensors"), load_file(b.output / "model.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    base = load_file(tiny_base / "model.safetensors")
    changed = [(ta[k] != base[k]).double().mean().item() for k in ta if "q_proj" in k]
    assert all(abs(c - 0.3) < 0.02 for c in changed)


def test_sharded_base_stays_sharded_and_exact(adapters, tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(sharded, max_shard_size="300KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    out = merge_adapters(adapters, WEIGHTS, tmp_path / "m", output_kind="model", base=sharded, progress=False).output
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_text() == (sharded / "model.safetensors.index.json").read_text()
    merged = {k: v for s in shards for k, v in load_file(out / s).items()}
    deltas = hand_deltas(adapters)
    base = {k: v for s in shards for k, v in load_file(sharded / s).items()}
    for module, ds in deltas.items():
        want = base[f"{module}.weight"].double() + sum(d * w for d, w in zip(ds, WEIGHTS))
        assert (merged[f"{module}.weight"].double() - want).abs().max().item() <= TOL
    AutoModelForCausalLM.from_pretrained(out)  # loads as a normal sharded HF folder


def test_dare_masks_follow_the_adapter_not_its_position(adapters, tiny_base, tmp_path):
    """Permuting the adapters (weights with them) gives the same merge; an adapter merged alone gets the same
    mask as inside the trio, and that mask is the documented stream's; the same adapter twice gets two masks."""
    density, seed = 0.5, 11
    kw = dict(method="dare_linear", density=density, seed=seed, output_kind="model", base=tiny_base, progress=False)
    order = [2, 0, 1]
    a = merge_adapters(adapters, WEIGHTS, tmp_path / "abc", **kw)
    b = merge_adapters([adapters[i] for i in order], [WEIGHTS[i] for i in order], tmp_path / "cab", **kw)
    ta, tb = load_file(a.output / "model.safetensors"), load_file(b.output / "model.safetensors")
    assert max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta) <= TOL

    base = load_file(tiny_base / "model.safetensors")
    digest = a.metadata["inputs"][1]["digest"]
    alone = merge_adapters([adapters[1]], [1.0], tmp_path / "b-alone", **kw)
    twice = merge_adapters([adapters[1], adapters[1]], [1.0, 1.0], tmp_path / "b-twice", **kw)
    merged_alone = load_file(alone.output / "model.safetensors")
    merged_twice = load_file(twice.output / "model.safetensors")
    deltas = hand_deltas([adapters[1]])
    for module, (delta,) in deltas.items():
        key = f"{module}.weight"
        kept = merged_alone[key] != base[key]
        assert torch.equal(kept, documented_mask(delta.shape, density, seed, module, digest) & (delta != 0))
        want = delta / density * (documented_mask(delta.shape, density, seed, module, digest).double()
                                  + documented_mask(delta.shape, density, seed, module, digest, 1).double())
        assert (merged_twice[key].double() - base[key].double() - want).abs().max().item() <= TOL


def test_dare_combine_ignores_module_order_and_global_rng(adapters):
    """No state is shared between modules: any processing order and any global RNG state give the same deltas."""
    from lorakit.merge.method import ModuleContext
    from lorakit.merge.registry import get_method, resolve_params

    method = get_method("dare_ties")
    params = resolve_params(method, {"density": 0.4, "seed": 3, "normalize": True})
    digests = ("d-a", "d-b", "d-c")
    per_module = {m: [d.float() for d in ds] for m, ds in hand_deltas(adapters).items()}

    def run(names: list[str], rng_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(rng_seed)
        return {m: method.combine(per_module[m], WEIGHTS, ModuleContext(m, 3, digests), params) for m in names}

    names = sorted(per_module)
    forward, backward = run(names, 0), run(names[::-1], 123)
    assert all(torch.equal(forward[m], backward[m]) for m in names)
    permuted = [2, 0, 1]
    m = names[0]
    again = method.combine([per_module[m][i] for i in permuted], [WEIGHTS[i] for i in permuted],
                           ModuleContext(m, 3, tuple(digests[i] for i in permuted)), params)
    assert (again - forward[m]).abs().max().item() <= 1e-6
