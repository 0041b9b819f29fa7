"""Parity with mergekit: lorakit's merges equal mergekit's on the same adapters folded into full models.

mergekit merges full models (task vectors τᵢ = Mᵢ − W); lorakit merges the adapters' updates ΔWᵢ directly.
Folding each adapter into the base by hand (W + scalingᵢ·BᵢAᵢ, float64, from the files) makes the two
comparable: mergekit's τᵢ is then ΔWᵢ up to float64 rounding, so magnitude trimming picks the same entries.
The densities are chosen so that density·n is never an integer for any target module: that is where a
rounding convention (round vs. floor) would show, one kept entry more or less per module.

mergekit equivalents: ``linear`` = ``task_arithmetic``; ``ties`` = ``ties`` (its ``normalize`` set explicitly,
both ways); ``magnitude_prune`` = ``breadcrumbs`` with ``gamma: 0`` (magnitude trim, no outlier removal, no
sign election) and, directly, mergekit's own generalised task arithmetic with magnitude sparsification and no
consensus (the TIES family member without the sign election).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.merge import merge_adapters
from lorakit.models.synthetic import make_random_adapter
from tests.merge_reference import hand_deltas

mergekit = pytest.importorskip("mergekit", reason="mergekit is a test dependency: pip install -e '.[dev]'")

TOL = 1e-6  # abs; lorakit folds in float32 (|W| < 1, so ulp < 1.2e-7) and mergekit runs in float64
WEIGHTS = [0.7, -0.4, 0.5]
DENSITIES = [0.3, 0.45]  # density·n is not an integer for n in {8192, 16384, 32768}


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> list[Path]:
    """Mixed ranks and alphas, rsLoRA, and a rank/alpha pattern, as in test_merge_exact."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mk-adapters")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    return [
        make_random_adapter(tiny_base, root / "a", r=4, alpha=8, seed=11, model=model),
        make_random_adapter(tiny_base, root / "b", r=8, alpha=32, use_rslora=True, seed=12, model=model),
        make_random_adapter(tiny_base, root / "c", r=6, alpha=6, seed=13, model=model,
                            rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 12}),
    ]


def _float64_model(base: Path, out: Path, deltas: dict[str, torch.Tensor]) -> Path:
    """A copy of the base folder whose weights are float64, with ``deltas`` added to the named modules."""
    shutil.copytree(base, out)
    tensors = {k: v.double() for k, v in load_file(base / "model.safetensors").items()}
    for module, delta in deltas.items():
        tensors[f"{module}.weight"] = tensors[f"{module}.weight"] + delta
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def folded(adapters, tiny_base, tmp_path_factory) -> tuple[Path, list[Path]]:
    """The base in float64 and one full model W + ΔWᵢ per adapter (ΔWᵢ by hand from the files)."""
    root = tmp_path_factory.mktemp("mk-models")
    per_module = hand_deltas(adapters)
    models = [_float64_model(tiny_base, root / f"m{i}", {m: ds[i] for m, ds in per_module.items()})
              for i in range(len(adapters))]
    return _float64_model(tiny_base, root / "base", {}), models


def _run_mergekit(method: str, base: Path, models: list[Path], out: Path, **params) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    per_model = {"weight": None, **{k: v for k, v in params.items() if k in ("density", "gamma")}}
    shared = {k: v for k, v in params.items() if k not in per_model}
    config = MergeConfiguration.model_validate({
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {**{k: v for k, v in per_model.items() if v is not None},
                                                      "weight": w}} for m, w in zip(models, WEIGHTS)],
        "parameters": shared,
        "dtype": "float64",
        "out_dtype": "float64",
    })
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged.update(load_file(shard))
    return merged


def _register_magnitude_task_arithmetic() -> str:
    """mergekit's generalised task arithmetic with magnitude sparsification and no consensus, by name."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    from mergekit.sparsify import SparsificationMethod

    name = "lorakit_test_magnitude_task_arithmetic"
    if name not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(GeneralizedTaskArithmeticMerge(
            consensus_method=None, sparsification_method=SparsificationMethod.magnitude, default_normalize=False,
            default_rescale=False, method_name=name, method_pretty_name=None, method_reference_url=None))
    return name


def _compare(lorakit_out: Path, peer: dict[str, torch.Tensor], modules: set[str]) -> float:
    ours = load_file(lorakit_out / "model.safetensors")
    assert {k for k in peer if k.endswith(".weight")} >= {f"{m}.weight" for m in modules}
    return max((ours[f"{m}.weight"].double() - peer[f"{m}.weight"]).abs().max().item() for m in modules)


def test_densities_make_floor_and_round_differ(adapters):
    """The chosen densities are where the trim convention matters: density·n is fractional, and for some
    modules its fraction is >= 0.5, where round(density·n) would keep one entry more than floor."""
    sizes = {d.numel() for ds in hand_deltas(adapters).values() for d in ds}
    for density in DENSITIES:
        assert all(density * n != int(density * n) for n in sizes)
        assert any(round(density * n) != int(density * n) for n in sizes)


CASES = [("linear", "task_arithmetic", {"normalize": False})] + [
    case for density in DENSITIES for case in (
        ("ties", "ties", {"density": density, "normalize": False}),
        ("ties", "ties", {"density": density, "normalize": True}),
        ("magnitude_prune", "breadcrumbs", {"density": density, "gamma": 0.0}),
        ("magnitude_prune", "magnitude_task_arithmetic", {"density": density}),
    )
]


@pytest.mark.parametrize("ours,theirs,params", CASES,
                         ids=[f"{o}={t}-{'-'.join(map(str, p.values()))}" for o, t, p in CASES])
def test_matches_mergekit(ours, theirs, params, adapters, folded, tiny_base, tmp_path):
    base64, models = folded
    if theirs == "magnitude_task_arithmetic":
        theirs = _register_magnitude_task_arithmetic()
    peer = _run_mergekit(theirs, base64, models, tmp_path / "mergekit", **params)
    lk_params = {k: v for k, v in params.items() if k in ("density", "normalize") and (k != "normalize" or v)}
    if ours != "ties":
        lk_params.pop("normalize", None)
    result = merge_adapters(adapters, WEIGHTS, tmp_path / "lorakit", method=ours, output_kind="model",
                            base=tiny_base, progress=False, **lk_params)
    modules = set(hand_deltas(adapters))
    worst = _compare(result.output, peer, modules)
    print(f"\nparity {ours} vs mergekit {theirs} {params}: max abs diff {worst:.3e}")
    assert worst <= TOL, f"lorakit {ours} vs mergekit {theirs} {params}: max abs diff {worst:.3e}"
    # Untargeted tensors are the base's in both.
    base = load_file(tiny_base / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(peer[name].float(), base[name])
