"""``quantize_model``: a full-precision HF model folder -> a GPTQ or AWQ checkpoint folder.

Validation (method, bits, group size, model, calibration data) happens before any work; the output is written
to a temporary sibling and renamed into place; ``lorakit_quant.json`` records inputs, parameters and timings.
GPTQ runs in GPTQModel (``gptqmodel_backend``); AWQ runs in lorakit's own torch implementation (``awq``), which
was about 20x faster on CPU than GPTQModel's on SmolLM2-135M (bench/results/quantize.json ``runs``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lorakit
from lorakit.quantize.options import AWQ_GRID, AWQ_SCALE_FORMS, QUANTIZE, resolve_gptaq, resolve_grid
from lorakit.compute import dtype_name, resolve_compute_dtype
from lorakit.errors import InputError
from lorakit.runtime import resolve_device as runtime_resolve_device
from lorakit.io.atomic import atomic_dir, check_output_free
from lorakit.models.folder import resolve_model_dir, shard_names, weights_digest
from lorakit.quantize.calibration import build_calibration
from lorakit.quantize.checks import (QUANTIZED_LINEARS, check_method, check_model, check_rounding_memory,
                                     resolve_group_size)
from lorakit.quantize.metadata import QUANT_META, QuantMeta, QuantParams, write_quant_meta
from lorakit.quantize.awq import AWQ_COMPUTE_DTYPES
from lorakit.quantize.mixed import (UNQUANTIZED, check_module_bits, gptq_dynamic, how_to_load, loader_backend, loaders,
                                    modules_in_block_to_quantize)

HOW_TO_LOAD = ("transformers.AutoModelForCausalLM.from_pretrained(folder) with gptqmodel installed "
               "(and optimum for the GPTQ layout); vLLM/SGLang and GPTQModel.load read the same layout")


@dataclass
class QuantResult:
    output: Path
    method: str
    bits: int
    group_size: int
    metadata: dict[str, Any]


def resolve_device(device: str) -> str:
    """GPTQModel wants an indexed CUDA device."""
    return runtime_resolve_device(device, cuda="cuda:0")


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises OSError/ValueError/... for a missing or broken tokenizer
        raise InputError(f"{model_dir} has no usable tokenizer ({type(exc).__name__}); calibration tokenizes "
                         "with the model's own tokenizer, so save it into the model folder") from None


def _copy_side_files(src: Path, dst: Path, overwrite: bool) -> None:
    """Tokenizer, chat template, generation config: everything but weights, config and lorakit records."""
    for item in sorted(src.iterdir()):
        if (not item.is_file() or item.name.endswith((".safetensors", ".bin")) or item.name == "config.json"
                or item.name == "model.safetensors.index.json" or item.name.startswith("lorakit_")):
            continue
        if overwrite or not (dst / item.name).exists():
            shutil.copy2(item, dst / item.name)


def _update_quantization_config(config_path: Path, **keys: Any) -> None:
    """Add keys loaders read to the saved quantization_config (see lorakit.quantize.mixed): the kernel to use,
    the modules that hold packed weights."""
    config = json.loads(config_path.read_text())
    config["quantization_config"].update(keys)
    config_path.write_text(json.dumps(config, indent=2) + "\n")  # inside the atomic output folder


def _folder_bytes(folder: Path, names: list[str]) -> int:
    return sum((folder / n).stat().st_size for n in names)


def _run_awq(model_dir: Path, tmp: Path, config: dict, blocks, p, layout: str, device: str,
             progress: bool, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.quantize.awq import awq_quantize
    from lorakit.quantize.writer import write_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    quantized, report = awq_quantize(model, blocks, p, device=torch.device(device), progress=progress,
                                     keep=frozenset(keep))
    write_checkpoint(tmp, model, quantized, config, layout, bits=p.bits, group_size=p.group_size, sym=p.sym,
                     dtype=torch.float16, keep_fp=tuple(keep))
    alphas = [a for a in report.alphas.values() if a is not None]
    ratios = [report.loss_best[k] / report.loss_rtn[k] for k in report.alphas if report.loss_rtn[k] > 0]
    return {"alpha": report.alphas, "scale_form": report.forms, "output_mse_rtn": report.loss_rtn, "output_mse_best": report.loss_best,
            "mean_alpha": sum(alphas) / max(len(alphas), 1),
            "groups_kept_plain_rounding": len(report.alphas) - len(alphas),
            "mean_mse_ratio_vs_rtn": sum(ratios) / max(len(ratios), 1),
            "clipped_modules": report.clipped_modules, "search_tokens": report.tokens,
            "compute_dtype": report.compute_dtype}




def _tuning_blocks(calibration, calib, tokenizer, fraction: float, general, *, n_samples: int | None, seq_len: int,
                   seed: int, tune_samples: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Scale tuning's blocks, drawn like the calibration's (``tune_samples`` of them, or ``n_samples`` as requested)
    with ``fraction`` of them general text (the calibration's own blocks when the count and shares agree), their
    answer-token mask (None for data without answers), and the calibration's general blocks that tuning does not
    train on, whose KL it records."""
    share = (calibration.general or {}).get("fraction", 0.0)
    n_general = (calibration.general or {}).get("n_samples", 0)
    if abs(share - fraction) < 1e-9 and tune_samples in (None, n_samples):
        return calibration.blocks, calibration.answer_mask, None
    drawn = build_calibration(calib, tokenizer, n_samples=tune_samples or n_samples, seq_len=seq_len, seed=seed,
                              general=general if fraction else None, general_fraction=fraction)
    return drawn.blocks, drawn.answer_mask, (calibration.blocks[-n_general:] if n_general and not fraction else None)


def check_keep_sensitive(config: dict, bits: int, keep_sensitive: int) -> None:
    """Refuse a ``keep_sensitive`` the model or bit width cannot honour, before any calibration or rounding."""
    if not keep_sensitive:
        return
    n_linears = int(config["num_hidden_layers"]) * len(QUANTIZED_LINEARS)
    if keep_sensitive < 0 or keep_sensitive >= n_linears:
        raise InputError(f"--keep-sensitive {keep_sensitive}: this model has {n_linears} quantized linears; keep "
                         f"between 0 and {n_linears - 1} of them unquantized")
    if bits >= 8:
        raise InputError("--keep-sensitive leaves chosen linears above --bits; with --bits 8 there is nothing to "
                         "raise (use --bits 4, or --keep-sensitive 0)")


def _keep_most_sensitive(src: Path, blocks, k: int, module_bits: dict[str, int], *, config: dict, method: str,
                         bits: int, group_size: int, sym: bool, device: str, progress: bool
                         ) -> tuple[dict[str, int], dict[str, Any]]:
    """``module_bits`` with the ``k`` linears of the largest rounding error left unquantized, and the ranking.

    Why: on SmolLM2-135M three ``mlp.down_proj`` carry most of the output error of rounding; keeping them brings general text closer to the full-precision
    model for a few MB and nothing in loadability (:mod:`lorakit.quantize.mixed`), though on the bundled tasks it
    did not keep more answers (docs/quantize.md, ``bench/keep_sensitive.py``), so a release leaves it at 0. The
    ranking is :func:`lorakit.quantize.sensitivity.module_sensitivity` on this quantization's own calibration
    blocks and grid. A module ``module_bits`` also names gets the higher precision, i.e. stays unquantized."""
    from lorakit.progress import activity, emit
    from lorakit.quantize.sensitivity import module_sensitivity

    with activity("ranking linears by rounding error"):
        sens = module_sensitivity(src, blocks, bits=bits, group_size=group_size, sym=sym, device=device)
    kept = sens.ranking[:k]
    if progress:
        emit(f"keep-sensitive: {k} linear(s) left unquantized: {', '.join(kept)} ({sens.wall_s:.0f}s to rank)")
    record = {**sens.to_dict(top=max(k, 10)), "kept": kept}
    return check_module_bits(config, method, bits, {**module_bits, **{m: UNQUANTIZED for m in kept}}), record


def quantize_model(
    model_dir: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    method: str = QUANTIZE.method,
    bits: int = QUANTIZE.bits,
    group_size: int = QUANTIZE.group_size,
    sym: bool | None = QUANTIZE.sym,
    desc_act: bool | None = QUANTIZE.desc_act,
    gptaq_alpha: float | None = QUANTIZE.gptaq_alpha,
    calib: str | os.PathLike[str] | None = None,
    calib_general: str | os.PathLike[str] | None = QUANTIZE.calib_general,
    calib_general_fraction: float = QUANTIZE.calib_general_fraction,
    n_samples: int | None = QUANTIZE.n_samples,
    seq_len: int = QUANTIZE.seq_len,
    device: str = QUANTIZE.device,
    seed: int = QUANTIZE.seed,
    strict_group_size: bool = False,
    awq_grid: int = AWQ_GRID,
    clip_search: bool = QUANTIZE.clip_search,
    compute_dtype: str = "auto",
    awq_scale_form: str = QUANTIZE.awq_scale_form,
    module_bits: dict[str, int] | None = None,
    keep_sensitive: int = QUANTIZE.keep_sensitive,
    tune_steps: int = QUANTIZE.tune_steps,
    tune_lr: float = QUANTIZE.tune_lr,
    tune_general_fraction: float = QUANTIZE.tune_general_fraction,
    tune_tokens: str = QUANTIZE.tune_tokens,
    tune_answer_weight: float = QUANTIZE.tune_answer_weight,
    tune_samples: int | None = QUANTIZE.tune_samples,
    force: bool = False,
    progress: bool = True,
) -> QuantResult:
    """Quantize a full-precision Llama-style model folder with GPTQ or AWQ into a standard checkpoint folder.

    Defaults: :class:`lorakit.quantize.options.QuantizeOptions` (the measured release configuration, GPTQ 4-bit g16
    with a zero point, act-order, GPTAQ and the clipping search, calibrated on half general text), the same as ``lorakit quantize`` and the run
    config's ``quantize:``. ``sym``/``desc_act``/``gptaq_alpha`` None are each method's convention
    (:func:`lorakit.quantize.options.resolve_grid`, :func:`~lorakit.quantize.options.resolve_gptaq`). A ``group_size`` that does not divide
    every layer's input size is replaced by the largest valid one with a note (``strict_group_size`` makes
    that an error). AWQ at 8 bits is written in the GPTQ v1 layout, because the AWQ GEMM layout is 4-bit only;
    the record says so. Calibration: see :mod:`lorakit.quantize.calibration` (train split of a prep folder;
    ``n_samples=None``: 128 blocks, or every block the data gives when fewer, with a warning);
    ``calib_general`` ("default" = lorakit's general-English corpus, or a file) supplies ``calib_general_fraction``
    of the blocks, so that general language shapes the quantization too.
    ``module_bits`` ({"model.layers.3.mlp.down_proj": 8, ...}) keeps chosen modules at higher precision: 8 bits
    (GPTQModel ``dynamic``) or 16 (left unquantized, ``modules_in_block_to_quantize``) for GPTQ, fp16 for AWQ
    (``modules_to_not_convert``); see :mod:`lorakit.quantize.mixed`
    for which loaders read each kind. ``keep_sensitive`` K > 0 also leaves the K linears with the largest rounding
    error on the calibration blocks unquantized (:func:`_keep_most_sensitive`). ``tune_steps`` > 0 then tunes the written group scales and norms by
    distillation from ``model_dir`` (:mod:`lorakit.quantize.tune`; codes and layout unchanged) on blocks drawn
    like the calibration's, ``tune_general_fraction`` of them general text (0 = the tasks' data alone).
    ``compute_dtype``: see :mod:`lorakit.compute` (auto = bfloat16 only where it is fast); GPTQModel loads and runs
    the model in it, lorakit's AWQ runs its forwards and search matmuls in it, and scale tuning computes in it.
    """
    started = time.perf_counter()
    output = Path(output)
    check_method(method, bits, group_size)
    if awq_grid < 1:
        raise InputError(f"--awq-grid must be positive (got {awq_grid})")
    if awq_scale_form not in AWQ_SCALE_FORMS:
        raise InputError(f"--awq-scale-form must be one of {', '.join(AWQ_SCALE_FORMS)} (got {awq_scale_form!r})")
    if method == "awq" and compute_dtype not in AWQ_COMPUTE_DTYPES:
        raise InputError(f"--compute-dtype {compute_dtype} is not available for AWQ, whose search needs bfloat16's or "
                         f"float32's range; use one of {', '.join(AWQ_COMPUTE_DTYPES)}")
    sym, desc_act = resolve_grid(method, sym, desc_act)
    if desc_act and method != "gptq":
        raise InputError("--desc-act (act-order) is a GPTQ option; drop it for --method awq")
    if tune_steps < 0 or (tune_steps and tune_lr <= 0) or not 0 <= tune_general_fraction < 1:
        raise InputError(f"--tune-steps must be >= 0, --tune-lr positive and --tune-general-fraction in [0, 1) (got "
                         f"{tune_steps}, {tune_lr}, {tune_general_fraction}); 0 steps = no scale tuning")
    if tune_steps:
        from lorakit.quantize.tune import check_tokens

        check_tokens(tune_tokens, tune_answer_weight)
    if tune_steps and tune_general_fraction and calib_general is None:
        raise InputError("--tune-general-fraction needs general text: set --calib-general or tune on the tasks "
                         "alone (--tune-general-fraction 0)")
    gptaq_alpha = resolve_gptaq(method, gptaq_alpha)
    if not 0 <= gptaq_alpha <= 1:
        raise InputError(f"--gptaq-alpha must be in [0, 1] (got {gptaq_alpha}); 0 = plain GPTQ")
    if gptaq_alpha and method != "gptq":
        raise InputError("--gptaq-alpha (GPTAQ's input-error correction) is a GPTQ option; drop it for --method awq")
    check_output_free(output, force)
    src = resolve_model_dir(model_dir)
    if output.resolve() == src.resolve():
        raise InputError(f"output {output} is the input model folder; write the quantized model to a new folder")
    config = check_model(src)
    module_bits = check_module_bits(config, method, bits, module_bits)
    check_keep_sensitive(config, bits, keep_sensitive)
    used_group, note = resolve_group_size(config, group_size, strict_group_size)
    device = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, "quantize", device)
    notes: list[str] = []
    if note:
        notes.append(note)
        if progress:
            print(f"note: {note}", file=sys.stderr)
    layout = "gptq-v1" if (method == "gptq" or bits != 4) else "awq-gemm"
    backend_key = loader_backend(layout, bits, used_group)  # a kernel named in the file for CPU loaders, or None
    if method == "awq" and bits == 8:
        notes.append("AWQ at 8 bits is written in the GPTQ v1 layout (the AWQ GEMM layout is 4-bit only); "
                     "loaders see quant_method=gptq")
        if progress:
            print(f"note: {notes[-1]}", file=sys.stderr)
    tokenizer = _load_tokenizer(src)
    calibration = build_calibration(calib, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                    general=calib_general, general_fraction=calib_general_fraction)
    if calibration.note:
        notes.append(calibration.note)
        print(f"warning: {calibration.note}", file=sys.stderr)
    # scale tuning's blocks are drawn now, so data too short for them is refused before any rounding
    tune_blocks, answer_mask, general_watch = (
        _tuning_blocks(calibration, calib, tokenizer, tune_general_fraction, calib_general, n_samples=n_samples,
                       seq_len=seq_len, seed=seed, tune_samples=tune_samples) if tune_steps else (None, None, None))
    if tune_steps and device == "cpu":  # it holds two models at once: refused before rounding
        from lorakit.quantize.tune import check_memory

        check_memory(src, seq_len, blocks=int(tune_blocks.shape[0]))
    n_samples = int(calibration.blocks.shape[0])  # what was used; the request stays in calibration.summary()
    if device == "cpu":  # the model, its calibration states and Hessians in this machine's memory: refused now
        check_rounding_memory(src, method, str(dtype).removeprefix("torch."), n_samples=n_samples, seq_len=seq_len)
    sensitivity = None
    if keep_sensitive:
        module_bits, sensitivity = _keep_most_sensitive(src, calibration.blocks, keep_sensitive, module_bits,
                                                        config=config, method=method, bits=bits,
                                                        group_size=used_group, sym=sym, device=device,
                                                        progress=progress)
    source_shards = shard_names(src)
    input_digest = weights_digest(src)

    import torch

    threads = torch.get_num_threads()  # recorded: the float order of the rounding depends on it
    with atomic_dir(output, force=force) as tmp:
        if method == "gptq":
            from lorakit.quantize.gptqmodel_backend import backend_versions, gptq_quantize

            details = gptq_quantize(src, tmp, calibration.blocks, bits=bits, group_size=used_group, sym=sym,
                                    desc_act=desc_act, device=device, progress=progress,
                                    dynamic=gptq_dynamic(module_bits), dtype=dtype, gptaq_alpha=gptaq_alpha,
                                    clip_search=clip_search)
            quality = {"module_loss": details.pop("module_loss")}
            method_params = details
            backend = {"name": "gptqmodel", "versions": backend_versions()}
            _copy_side_files(src, tmp, overwrite=True)  # undo GPTQModel's generation_config rewrite
            if backend_key:
                _update_quantization_config(tmp / "config.json", backend=backend_key)
                notes.append(f"group size {used_group}: CPU's int4 kernel refuses it, so quantization_config.backend "
                             f"= {backend_key!r} (GPTQModel's portable kernel) for transformers")
            in_block = modules_in_block_to_quantize(int(config["num_hidden_layers"]), module_bits)
            if in_block:
                _update_quantization_config(tmp / "config.json", modules_in_block_to_quantize=in_block)
        else:
            from lorakit.quantize.awq import AwqParams
            from lorakit.quantize.gptqmodel_backend import backend_versions

            p = AwqParams(bits=bits, group_size=used_group, sym=sym, n_grid=awq_grid, clip=clip_search,
                          compute_dtype=dtype_name(dtype), scale_forms=AWQ_SCALE_FORMS[awq_scale_form],
                          min_zero=1 if layout == "gptq-v1" and not sym else 0)
            quality = _run_awq(src, tmp, config, calibration.blocks, p, layout, device, progress,
                               keep=tuple(sorted(module_bits)))
            method_params = {k: v for k, v in asdict(p).items() if k not in ("bits", "group_size", "sym")}
            backend = {"name": "lorakit-awq (plain torch)", "versions": backend_versions()}
            _copy_side_files(src, tmp, overwrite=True)
        if sensitivity:
            quality["sensitivity"] = sensitivity
        tuning = {}
        if tune_steps:
            from lorakit.quantize.tune import tune_scales

            tuning = tune_scales(src, tmp, tune_blocks, kind="gptq" if layout == "gptq-v1" else "awq",
                                 steps=tune_steps, lr=tune_lr, dtype=dtype, seed=seed, device=device,
                                 general_blocks=general_watch, tokens=tune_tokens, answer_mask=answer_mask,
                                 answer_weight=tune_answer_weight, progress=progress)
            tuning["general_fraction"] = tune_general_fraction
            if tuning.get("tokens_note"):
                notes.append(f"scale tuning: {tuning['tokens_note']}")
                if progress:
                    print(f"note: {notes[-1]}", file=sys.stderr)
            if not tuning["kept"]:
                notes.append(f"scale tuning did not lower the held-out KL ({tuning['held_out_kl_before']} -> "
                             f"{tuning['held_out_kl_after']}); the rounded scales were kept")
        out_shards = sorted(p.name for p in tmp.glob("*.safetensors"))
        meta = QuantMeta(
            lorakit_version=lorakit.__version__,
            params=QuantParams(method=method, bits=bits, group_size=used_group, group_size_requested=group_size,
                               sym=sym, desc_act=desc_act, n_samples=n_samples, seq_len=seq_len, seed=seed,
                               device=device, layout=layout, method_params=method_params,
                               module_bits=module_bits, compute_dtype=dtype_name(dtype), threads=threads,
                               tune_steps=int(tune_steps), tune_lr=float(tune_lr) if tune_steps else 0.0,
                               tune_general_fraction=float(tune_general_fraction) if tune_steps else 0.0,
                               tune_tokens=tune_tokens if tune_steps else "",
                               tune_answer_weight=float(tune_answer_weight) if tune_steps else 1.0,
                               tune_samples=int(tune_blocks.shape[0]) if tune_steps else 0,
                               keep_sensitive=int(keep_sensitive)),
            input={"path": str(src), "model_type": config.get("model_type"), "weights_digest": input_digest},
            calibration=calibration.summary(),
            backend=backend,
            wall_time_s=round(time.perf_counter() - started, 3),
            size_before_bytes=_folder_bytes(src, source_shards),
            size_after_bytes=_folder_bytes(tmp, out_shards),
            how_to_load=how_to_load(method, layout, module_bits, backend_key),
            loaders=loaders(method, layout, module_bits),
            notes=notes,
            quality=quality,
            tuning=tuning,
        )
        write_quant_meta(tmp, meta)
    return QuantResult(output, method, bits, used_group, meta.to_dict())


__all__ = ["QUANT_META", "QuantResult", "quantize_model", "resolve_device"]
