"""``merge_adapters``: combine LoRA adapters into one adapter or into the base model's weights.

Everything is validated before anything is written (weights, method parameters, adapter compatibility, the base
model's shapes), output goes to a temporary sibling that is renamed into place, and the output folder's
``lorakit_merge.json`` records the inputs' digests and every number that defines the result.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lorakit.merge.options import MERGE
from lorakit.progress import bar as progress_bar

import lorakit
from lorakit.adapters import CONFIG_FILE, WEIGHTS_FILE, Adapter, check_compatible, check_tied_targets, load_adapter
from lorakit.errors import IncompatibleAdaptersError, InputError
from lorakit.io.atomic import atomic_dir, check_output_free, write_json
from lorakit.io.digests import manifest_digest
from lorakit.io.safetensors_stream import copy_with_digest, overwrite_tensor, read_tensor, save_file
from lorakit.merge.base_weights import Nf4Dequantized, check_loftq_base
from lorakit.merge.linear import concat_factors
from lorakit.merge.method import MergeMethod, ModuleContext
from lorakit.merge.registry import get_method, resolve_params
from lorakit.merge.svd import Truncation, truncate_dense, truncate_factors
from lorakit.models.embedded import MODEL_ID
from lorakit.models.folder import read_model_config, resolve_model_dir, shard_names, tensor_index, ties_embeddings

MERGE_META = "lorakit_merge.json"
OUTPUT_KINDS = ("adapter", "model")
_PREFIX = "base_model.model."


@dataclass
class MergeResult:
    output: Path
    output_kind: str
    method: str
    exact: bool
    relative_error: float | None
    metadata: dict[str, Any]


def check_weights(weights: Sequence[float], n_adapters: int) -> list[float]:
    """One finite weight per adapter; any sign (a negative weight subtracts a task)."""
    if len(weights) != n_adapters:
        raise InputError(
            f"got {len(weights)} weight(s) for {n_adapters} adapter(s); pass one weight per adapter, "
            f"e.g. --weights {','.join(['0.5'] * max(n_adapters, 1))}"
        )
    out = []
    for i, w in enumerate(weights, 1):
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise InputError(f"weight {i} ({w!r}) is not a number") from None
        if not math.isfinite(w):
            raise InputError(f"weight {i} is {w}; weights must be finite numbers")
        out.append(w)
    return out


def _check_plan(method: MergeMethod, output_kind: str, rank: int | None) -> None:
    if output_kind not in OUTPUT_KINDS:
        raise InputError(f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}, got {output_kind!r}")
    if rank is not None:
        if output_kind != "adapter":
            raise InputError("--rank re-factors an adapter output; it does not apply to --output-kind model")
        if int(rank) < 1:
            raise InputError(f"--rank must be a positive integer, got {rank}")
    if output_kind == "adapter" and not method.factorable and rank is None:
        raise InputError(
            f"method {method.name} produces full-rank updates; pass --rank K to re-factor them into an adapter "
            "(the error is reported), or --output-kind model"
        )


def _base_dir(adapters: list[Adapter], base: str | os.PathLike[str] | None, required: bool) -> Path | None:
    """The base model folder: --base, else the adapters' recorded base when it is reachable locally."""
    if base is not None:
        return resolve_model_dir(base)
    name = adapters[0].base_name
    if name and Path(name).is_dir():
        return Path(name)
    if name == MODEL_ID:
        return resolve_model_dir(None)
    if required:
        if not name:
            raise InputError("the adapters do not record their base model; pass --base with the model folder")
        return resolve_model_dir(name)
    return None


def _check_base_fits(adapters: list[Adapter], base_dir: Path, index: dict[str, tuple[str, Any]]) -> None:
    for name, module in adapters[0].modules.items():
        entry = index.get(f"{name}.weight")
        if entry is None:
            raise IncompatibleAdaptersError(
                f"adapter {adapters[0].label} targets {name}, which base model {base_dir} does not have; "
                "pass --base with the model the adapters were trained on"
            )
        if tuple(entry[1].shape) != module.weight_shape:
            raise IncompatibleAdaptersError(
                f"adapter {adapters[0].label} expects a {list(module.weight_shape)} weight at {name} but base model "
                f"{base_dir} has {list(entry[1].shape)}; pass --base with the model the adapters were trained on"
            )


def _merged_delta(method: MergeMethod, adapters: list[Adapter], name: str, weights: list[float],
                  params: dict[str, Any], base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The method applied to the updates, in [out, in] layout; DoRA updates are materialised on ``base_weight``
    (stored layout), so methods combine W'ᵢ − W like any other update."""
    modules = [a.modules[name] for a in adapters]
    base = modules[0].to_weight_layout(base_weight) if base_weight is not None else None
    deltas = [m.delta(base=base) for m in modules]
    ctx = ModuleContext(name, int(params.get("seed") or 0), tuple(a.digest for a in adapters))
    return method.combine(deltas, weights, ctx, params)


def _adapter_config(first: Adapter, ranks: dict[str, int], base_name: str | None) -> dict[str, Any]:
    """The first adapter's config with scaling 1 (scales live in B) and the merged ranks."""
    common, _ = Counter(ranks.values()).most_common(1)[0]
    pattern = {name: r for name, r in ranks.items() if r != common}
    cfg = dict(first.config)
    cfg.update(
        r=common, lora_alpha=common, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
        use_dora=False, lora_bias=False, inference_mode=True, base_model_name_or_path=base_name,
    )
    return cfg


def _read_base(base_dir: Path | None, index: dict[str, tuple[str, Any]] | None,
               dequantized: Nf4Dequantized | None):
    """name -> the float32 base weight (stored layout) that updates are added to."""
    def read(name: str) -> torch.Tensor:
        if dequantized is not None and name in dequantized.names:
            return dequantized.weight(name)
        shard, info = index[f"{name}.weight"]
        with open(base_dir / shard, "rb") as fh:
            return read_tensor(fh, info).float()
    return read


def _write_adapter(tmp: Path, method: MergeMethod, adapters: list[Adapter], weights: list[float],
                   params: dict[str, Any], rank: int | None, base_name: str | None,
                   progress: bool, read_base=None) -> dict[str, Any]:
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    err_sq = norm_sq = 0.0
    for name in progress_bar(sorted(adapters[0].modules), desc="merging modules", unit="module", disable=not progress):
        modules = [a.modules[name] for a in adapters]
        dora = any(m.dora for m in modules)
        if method.factorable and rank is None and not dora:
            A, B = concat_factors(modules, weights)
        else:
            if dora:
                delta = _merged_delta(method, adapters, name, weights, params, read_base(name))
                cut = truncate_dense(delta, rank)
            elif method.factorable:
                A_cat, B_cat = concat_factors(modules, weights)
                cut: Truncation = truncate_factors(B_cat, A_cat, rank)
            else:
                cut = truncate_dense(_merged_delta(method, adapters, name, weights, params), rank)
            A, B = cut.A, cut.B
            errors[name] = cut.relative_error
            err_sq += cut.error**2
            norm_sq += cut.norm**2
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B.contiguous()
        ranks[name] = A.shape[0]
    save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    write_json(tmp / CONFIG_FILE, _adapter_config(adapters[0], ranks, base_name))
    if rank is None:
        return {"exact": True, "relative_error": None, "per_module_relative_error": None, "rank": None}
    overall = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    return {"exact": overall == 0.0, "relative_error": overall, "per_module_relative_error": errors, "rank": rank}


def _write_model(tmp: Path, method: MergeMethod, adapters: list[Adapter], weights: list[float],
                 params: dict[str, Any], base_dir: Path, index: dict[str, tuple[str, Any]],
                 progress: bool, dequantized: Nf4Dequantized | None = None) -> dict[str, Any]:
    """Copy the base folder shard by shard and patch only the adapted weights in place (and, merging into the
    dequantized NF4 base, every 4-bit layer's weight)."""
    for item in sorted(base_dir.iterdir()):
        if item.is_file() and not item.name.endswith(".safetensors") and not item.name.startswith("lorakit_"):
            shutil.copy2(item, tmp / item.name)
    by_shard: dict[str, list[str]] = {}
    patched = set(adapters[0].modules) | (dequantized.names if dequantized is not None else set())
    for name in patched:
        by_shard.setdefault(index[f"{name}.weight"][0], []).append(name)
    shard_digests: dict[str, str] = {}
    bar = progress_bar(total=len(patched), desc="merging into base", unit="module", disable=not progress)
    for shard in shard_names(base_dir):
        shard_digests[shard] = copy_with_digest(base_dir / shard, tmp / shard)
        with open(tmp / shard, "r+b") as fh:
            for name in sorted(by_shard.get(shard, [])):
                info = index[f"{name}.weight"][1]
                weight = read_tensor(fh, info)
                merged = weight.float()  # no copy for fp32 weights: the buffer was just read and is ours
                if dequantized is not None and name in dequantized.names:
                    dq = dequantized.weight(name)
                    merged = dq if dq.shape == merged.shape else dq.T.contiguous()  # Conv1D stores [in, out]
                module = adapters[0].modules.get(name)
                if module is None:
                    pass
                elif any(a.modules[name].dora for a in adapters):
                    merged += module.to_weight_layout(_merged_delta(method, adapters, name, weights, params, merged))
                elif method.factorable:
                    # One GEMM with the concatenated factors, accumulated straight into the weight:
                    # several times faster than forming each ΔWᵢ and summing them.
                    A, B = concat_factors([a.modules[name] for a in adapters], weights)
                    if module.fan_in_fan_out:
                        merged.addmm_(A.T, B.T)
                    else:
                        merged.addmm_(B, A)
                else:
                    merged += module.to_weight_layout(_merged_delta(method, adapters, name, weights, params))
                overwrite_tensor(fh, info, merged.to(weight.dtype))
                bar.update(1)
    bar.close()
    return {"exact": True, "relative_error": None, "per_module_relative_error": None, "rank": None,
            "base_weights_digest": manifest_digest(shard_digests, "weights"), "base_shards": shard_digests}


def merge_adapters(
    adapters: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
    output: str | os.PathLike[str],
    *,
    method: str = MERGE.method,
    output_kind: str = "adapter",
    rank: int | None = None,
    base: str | os.PathLike[str] | None = None,
    density: float | None = MERGE.density,
    seed: int | None = MERGE.seed,
    normalize: bool | None = MERGE.normalize,
    data: Sequence[str | os.PathLike[str]] | None = None,
    regmean_alpha: float | None = MERGE.regmean_alpha,
    regmean_examples: int | None = MERGE.regmean_examples,
    regmean_anchor: float | None = MERGE.regmean_anchor,
    force: bool = False,
    ignore_base_name: bool = False,
    compute_dtype: str = "auto",
    loftq_base: str | None = MERGE.loftq_base,
    progress: bool = True,
    record: dict[str, Any] | None = None,
    fitted: tuple[list[Adapter], dict[str, Any]] | None = None,
    started: float | None = None,
) -> MergeResult:
    """Merge PEFT LoRA adapters: ΔW = method(w₁·ΔW₁, …) with ΔWᵢ = scalingᵢ·BᵢAᵢ per target module.

    Returns what was written and how exact it is; raises :class:`lorakit.errors.InputError` (nothing written)
    for every input it cannot merge correctly. ``compute_dtype`` is accepted for symmetry with the other stages
    and must resolve to float32 (lorakit.compute.POLICY: the merge is exact; SVD rank reduction runs in float64).
    DoRA updates are materialised on the base (W'ᵢ − W); LoftQ adapters need ``loftq_base`` for model output (see
    :mod:`lorakit.merge.base_weights`). ``record``: extra top-level entries for ``lorakit_merge.json`` (the merge
    search's ``search``), written inside the same atomic output. ``started``: the ``time.perf_counter()`` at which the
    stage began when work before this call belongs to it (the merge search), so ``wall_time_s`` is the stage's time.
    ``data``: method regmean's prepared-data folders, one per adapter (:mod:`lorakit.merge.regmean`).
    ``fitted``: what :func:`lorakit.merge.regmean.regmean_adapters` returned for these adapters, data and parameters
    (the merge search projects once for all its trials), so the output is written from the adapters it measured
    without reading the data again; checked to be projections of the same adapters.
    """
    from lorakit.compute import dtype_name, resolve_compute_dtype

    started = time.perf_counter() if started is None else started
    compute = dtype_name(resolve_compute_dtype(compute_dtype, "merge", "cpu"))
    output = Path(output)
    weights = check_weights(weights, len(adapters))
    merge_method = get_method(method)
    params = resolve_params(merge_method, {"density": density, "seed": seed, "normalize": normalize,
                                           "regmean_alpha": regmean_alpha, "regmean_examples": regmean_examples,
                                           "regmean_anchor": regmean_anchor})
    if data and merge_method.name != "regmean":
        raise InputError(f"method {merge_method.name} reads no task data; --data applies to --method regmean "
                         "(and to --search)")
    _check_plan(merge_method, output_kind, rank)
    check_output_free(output, force)
    resolved_inputs = [Path(a).resolve() for a in adapters]
    if output.resolve() in resolved_inputs or (base is not None and Path(base).resolve() == output.resolve()):
        raise InputError(f"output {output} is one of the inputs; write the merge to a new folder")

    loaded = [load_adapter(a) for a in adapters]
    check_compatible(loaded, ignore_base_name=ignore_base_name)
    loftq_base = check_loftq_base(loaded, output_kind, loftq_base)
    regmean_data, regmean_record = None, None
    if merge_method.name == "regmean":
        from lorakit.merge.regmean import check_data

        if len(loaded) > 1 or data:  # data given is checked, even where it goes unused
            regmean_data = check_data(loaded, data, params["regmean_alpha"], params["regmean_examples"],
                                      params["regmean_anchor"])
        if len(loaded) == 1:  # the fit of one update is that update: nothing to read
            regmean_data, regmean_record = None, {"note": "one adapter: RegMean of a single update is the update "
                                                          "itself; no task data was read"}
    dora = [a for a in loaded if a.dora]
    if dora and output_kind == "adapter" and rank is None:
        raise InputError(
            f"adapter {dora[0].label} is a DoRA adapter: its update m·(W + sBA)/‖W + sBA‖ − W is full rank, so an "
            "adapter output needs --rank K (truncated SVD, the error is reported); or pass --output-kind model (exact)"
        )
    # DoRA updates and the dequantized LoftQ base are computed from the base weights, whatever the output kind.
    needs_base = output_kind == "model" or bool(dora) or loftq_base == "dequantized" or regmean_data is not None
    base_dir = _base_dir(loaded, base, required=needs_base)
    index = None
    if base_dir is not None:
        check_tied_targets(loaded, ties_embeddings(read_model_config(base_dir)), str(base_dir))
        index = tensor_index(base_dir)
        _check_base_fits(loaded, base_dir, index)
    base_name = str(base) if base is not None else loaded[0].base_name
    dequantized = Nf4Dequantized(base_dir) if loftq_base == "dequantized" else None
    inputs = [a.summary() for a in loaded]
    if regmean_data is not None:  # each adapter's A re-projected; the rest is the exact linear path
        from lorakit.merge.regmean import regmean_adapters

        if fitted is not None:
            projected, regmean_record = fitted
            fit = (regmean_record["alpha"], regmean_record["examples"], (regmean_record["anchor"] or {}).get("weight", 0.0))
            asked = (float(params["regmean_alpha"]), int(params["regmean_examples"]), float(params["regmean_anchor"] or 0.0))
            if ([a.digest for a in projected] != [a.digest for a in loaded] or fit != asked
                    or regmean_record["data"] != [str(d) for d in regmean_data]):
                raise ValueError("fitted: a RegMean projection of other adapters, data or parameters")
            loaded = projected
        else:
            loaded, regmean_record = regmean_adapters(loaded, base_dir, regmean_data, alpha=params["regmean_alpha"],
                                                      examples=params["regmean_examples"],
                                                      anchor=params["regmean_anchor"], progress=progress)

    with atomic_dir(output, force=force) as tmp:
        if output_kind == "adapter":
            result = _write_adapter(tmp, merge_method, loaded, weights, params, rank, base_name, progress,
                                    _read_base(base_dir, index, dequantized))
        else:
            result = _write_model(tmp, merge_method, loaded, weights, params, base_dir, index, progress, dequantized)
            digests = [a.base_digest for a in loaded if a.base_digest]
            if digests and any(d != result["base_weights_digest"] for d in digests):
                raise IncompatibleAdaptersError(
                    f"the adapters were trained on a base with weights digest {digests[0][:12]}, but {base_dir} has "
                    f"{result['base_weights_digest'][:12]}; pass --base with the model the adapters were trained on"
                )
        metadata = {
            "lorakit_version": lorakit.__version__,
            "method": merge_method.name,
            "params": params,
            "weights": weights,
            "negative_weights": [str(a.path) for a, w in zip(loaded, weights) if w < 0],
            "output_kind": output_kind,
            "compute_dtype": compute,
            "loftq_base": loftq_base,
            "inputs": inputs,
            "base": {"path": str(base_dir) if base_dir else None, "name": base_name,
                     "weights_digest": result.pop("base_weights_digest", None),
                     "shards": result.pop("base_shards", None)},
            **result,
            **({"regmean": regmean_record} if regmean_record is not None else {}),
            "wall_time_s": round(time.perf_counter() - started, 3),
            **(record or {}),
        }
        write_json(tmp / MERGE_META, metadata)
    return MergeResult(output, output_kind, merge_method.name, metadata["exact"], metadata["relative_error"], metadata)
