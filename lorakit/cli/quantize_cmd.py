"""``lorakit quantize``: GPTQ or AWQ post-training quantization into a standard checkpoint folder."""

from __future__ import annotations

import click

from lorakit.cli.options import compute_dtype_option, device_option
from lorakit.gate.general import DEFAULT_GENERAL_MAX_TOKENS


@click.command()
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (must not exist unless --force).")
@click.option("--method", type=click.Choice(["gptq", "awq"]), default="gptq", show_default=True,
              help="gptq: GPTQModel's GPTQ (Hessian-based rounding). awq: lorakit's activation-aware scaling.")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits: 4 or 8.")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Input channels sharing one scale/zero (16..1024, power of two). If it does not divide every "
                   "layer's input size, the largest valid one below it is used (see --strict-group-size).")
@click.option("--strict-group-size", is_flag=True, help="Fail instead of choosing a smaller valid group size.")
@click.option("--sym/--asym", default=None, help="Symmetric grid (no zero point) or asymmetric with a zero point "
              "[default: --sym for gptq, --asym for awq].")
@click.option("--desc-act", is_flag=True, help="GPTQ act-order: quantize columns by decreasing activation size.")
@click.option("--calib", type=click.Path(), help="Calibration text: a `lorakit prep` folder (its train split is "
              "used) or a text file (blank-line separated paragraphs, or .jsonl with a 'text' field).")
@click.option("--n-samples", type=int, default=None,
              help="Calibration sequences. Default: 128, or every one the data gives when fewer (at least 16; a "
                   "warning says so and lorakit_quant.json records it). A number given here the data cannot fill "
                   "is an error.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--calib-general", type=click.Path(), help="General text mixed into calibration: \"default\" = the "
              "general-English corpus shipped with lorakit (cut from its last documents), or a .txt/.jsonl file. "
              "The release flow mixes it in by default (quantize.calib_general).")
@click.option("--calib-general-fraction", type=float, default=0.0, show_default=True,
              help="Share of the calibration blocks taken from --calib-general (the release uses 0.5).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration text shuffle.")
@device_option
@compute_dtype_option("quantize")
@click.option("--awq-grid", type=int, default=20, show_default=True,
              help="awq: number of α values tried per group (time grows linearly with it).")
@click.option("--no-awq-clip", is_flag=True, help="awq: skip the per-group clipping search.")
@click.option("--awq-scale-form", type=click.Choice(["duo", "activation", "both"]), default="duo", show_default=True,
              help="awq: scale form on the α grid: duo = x̄^α/w̄^(1−α) (AutoAWQ's default), activation = x̄^α (the "
              "paper's), both = let the output error pick per group (twice the search time). See bench/README.md.")
@click.option("--module-bits", multiple=True, metavar="MODULE=BITS",
              help="Keep one linear at higher precision, e.g. model.layers.3.mlp.down_proj=8 (gptq: 8, via GPTQModel "
                   "`dynamic`; NOT loadable by plain transformers) or =16 (awq: kept in fp16, still loadable). Repeatable.")
@click.option("--target-degradation", type=float, default=None,
              help="Search instead of using the options above: the smallest configuration (group size, sym/asym, "
                   "act-order, per-module precision; GPTQ and AWQ) whose perplexity on the validation data is at most "
                   "this fraction worse than the model's (e.g. 0.05). Every trial is recorded in lorakit_quant.json.")
@click.option("--eval-data", type=click.Path(), help="search: validation data (default: the val split of --calib).")
@click.option("--eval-general", type=click.Path(), help="search: also meet the target on this general text "
              "(\"default\" = the shipped corpus, its first --eval-general-max-tokens tokens, as the release gate "
              "scores it); a trial's degradation is the worst of the texts.")
@click.option("--eval-general-max-tokens", type=int, default=DEFAULT_GENERAL_MAX_TOKENS, show_default=True,
              help="search: tokens of --eval-general scored (0 = all).")
@click.option("--search-methods", default="awq,gptq", show_default=True,
              help="search: methods, in order of preference at equal size.")
@click.option("--max-trials", type=int, default=12, show_default=True, help="search: at most this many quantizations.")
@click.option("--time-budget", type=float, default=3 * 3600, show_default=True,
              help="search: seconds; no trial starts that would likely end past it.")
@click.option("--max-size-mb", type=float, default=None, help="search: skip configurations predicted above this size.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the output path.")
def quantize(model_dir, output, method, bits, group_size, strict_group_size, sym, desc_act, calib, n_samples,
             seq_len, calib_general, calib_general_fraction, seed, device, compute_dtype, awq_grid, no_awq_clip,
             awq_scale_form, module_bits, target_degradation, eval_data, eval_general, eval_general_max_tokens,
             search_methods, max_trials, time_budget, max_size_mb, force, quiet):
    """Quantize a full-precision model folder with GPTQ or AWQ (4 or 8 bits) on CPU or CUDA.

    \b
    MODEL_DIR is an HF safetensors folder of a Llama-style model (e.g. `lorakit merge --output-kind model`
    output), or `default` for the embedded SmolLM2-135M-Instruct.

    \b
    Examples:
      lorakit quantize merged -o merged-gptq --calib prep/ --group-size 32 --asym
      lorakit quantize merged -o merged-awq --method awq --calib prep/ --group-size 64
      lorakit quantize default -o smol-w8 --bits 8 --calib corpus.txt --n-samples 32
      lorakit quantize merged -o merged-awq --method awq --calib prep/ --calib-general default \\
                       --calib-general-fraction 0.5          (as the release flow calibrates)

    \b
    Output: the standard GPTQ (v1) or AWQ (GEMM) layout; AWQ at 8 bits uses the GPTQ layout (AWQ GEMM is
    4-bit only). transformers.AutoModelForCausalLM.from_pretrained(OUT) loads it with gptqmodel installed
    (plus optimum for GPTQ). lorakit_quant.json inside records inputs, digests, parameters, versions, timings.
    Nothing is written when an input is unusable; the folder appears only when complete.
    """
    from lorakit.quantize import quantize_model
    from lorakit.runtime import configure_threads, quiet_third_party_logs

    configure_threads()
    quiet_third_party_logs()
    if quiet:
        from lorakit import progress

        progress.configure(console=False)
    from lorakit.errors import InputError

    if calib_general_fraction and calib_general is None:
        raise InputError("--calib-general-fraction needs --calib-general (e.g. --calib-general default)")
    mix = {"calib_general": calib_general, "calib_general_fraction": calib_general_fraction if calib_general else 0.0}
    if target_degradation is not None:
        general = {"eval_general": eval_general, "eval_general_max_tokens": eval_general_max_tokens or None}
        _search(model_dir, output, calib, eval_data, target_degradation, search_methods, n_samples, seq_len, seed,
                device, compute_dtype, max_trials, time_budget, max_size_mb, force, quiet, {**mix, **general})
        return
    result = quantize_model(
        model_dir, output, method=method, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, calib=calib,
        n_samples=n_samples, seq_len=seq_len, device=device, seed=seed, strict_group_size=strict_group_size,
        awq_grid=awq_grid, awq_clip=not no_awq_clip, compute_dtype=compute_dtype,
        awq_scale_form=awq_scale_form, force=force, progress=not quiet,
        module_bits=_parse_module_bits(module_bits), **mix,
    )
    if quiet:
        click.echo(str(result.output))
        return
    meta = result.metadata
    p = meta["params"]
    mib = 1 << 20
    click.echo(f"quantized {meta['input']['path']} with {method} ({p['bits']}-bit, group {p['group_size']}, "
               f"{'sym' if p['sym'] else 'asym'}, {p['layout']} layout) on {p['n_samples']}x{p['seq_len']} calibration "
               f"tokens -> {result.output} [{meta['size_before_bytes'] / mib:.0f} MiB -> "
               f"{meta['size_after_bytes'] / mib:.0f} MiB, {meta['wall_time_s']:.1f}s]")


def _parse_module_bits(items: tuple[str, ...]) -> dict[str, int]:
    from lorakit.errors import InputError

    out = {}
    for item in items:
        name, _, bits = item.partition("=")
        if not name or not bits.isdigit():
            raise InputError(f"--module-bits {item!r} is not MODULE=BITS (e.g. model.layers.3.mlp.down_proj=8)")
        out[name] = int(bits)
    return out


def _search(model_dir, output, calib, eval_data, target, methods, n_samples, seq_len, seed, device, compute_dtype, max_trials,
            time_budget, max_size_mb, force, quiet, general: dict) -> None:
    from lorakit.quantize.search import SearchBounds, SearchSpace, search_quantization

    space = SearchSpace(methods=tuple(m.strip() for m in methods.split(",") if m.strip()), n_samples=(n_samples,))
    bounds = SearchBounds(max_trials=max_trials, time_budget_s=time_budget,
                          max_size_bytes=int(max_size_mb * 1e6) if max_size_mb else None)
    result = search_quantization(model_dir, output, calib=calib, eval_data=eval_data, target_degradation=target,
                                 space=space, bounds=bounds, seq_len=seq_len, seed=seed, device=device,
                                 compute_dtype=compute_dtype, force=force,
                                 progress=not quiet, **general)
    search = result.metadata["search"]
    if quiet:
        click.echo(str(result.output))
        return
    click.echo(f"{'| #' :<4}| config | MB | ppl | degradation | s |")
    for t in search["trials"]:
        p = t["params"]
        kept = f" +{len(p['module_bits'])}@{next(iter(p['module_bits'].values()))}b" if p["module_bits"] else ""
        cfg = f"{p['method']} g{p['group_size']} {'sym' if p['sym'] else 'asym'}{' act' if p['desc_act'] else ''}{kept}"
        if t["error"]:
            click.echo(f"| {t['index']:<2}| {cfg} | error: {t['error']} |")
        else:
            click.echo(f"| {t['index']:<2}| {cfg} | {t['size_bytes'] / 1e6:.1f} | {t['ppl']:.4f} | "
                       f"{t['degradation']:+.2%} | {t['quantize_s']:.0f} |{' <- chosen' if t['index'] == search['chosen_trial'] else ''}")
    click.echo(search["message"])
    click.echo(f"how to load {result.output}: {result.metadata['how_to_load']}")


COMMANDS = [quantize]
