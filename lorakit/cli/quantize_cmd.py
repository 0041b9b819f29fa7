"""``lorakit quantize``: GPTQ or AWQ post-training quantization into a standard checkpoint folder."""

from __future__ import annotations

import click

from lorakit.cli.options import compute_dtype_option, stage_options, take_stage_options
from lorakit.gate.general import DEFAULT_GENERAL_MAX_TOKENS
from lorakit.quantize.options import AWQ_GRID, TUNE_KEYS, QuantizeOptions


@click.command()
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (must not exist unless --force).")
@stage_options(QuantizeOptions)
@click.option("--strict-group-size", is_flag=True, help="Fail instead of choosing a smaller valid group size.")
@click.option("--calib", type=click.Path(), help="Calibration text: a `lorakit prep` folder (its train split is "
              "used) or a text file (blank-line separated paragraphs, or .jsonl with a 'text' field).")
@compute_dtype_option("quantize")
@click.option("--awq-grid", type=int, default=AWQ_GRID, show_default=True,
              help="awq: number of α values tried per group (time grows linearly with it).")
@click.option("--module-bits", multiple=True, metavar="MODULE=BITS",
              help="Keep one linear at higher precision, e.g. model.layers.3.mlp.down_proj=16: =16 leaves it unquantized "
                   "(gptq and awq; still loadable by plain transformers); =8 (gptq only, via GPTQModel `dynamic`; NOT "
                   "loadable by plain transformers). Repeatable.")
@click.option("--eval-data", type=click.Path(), help="search: validation data (default: the val split of --calib).")
@click.option("--eval-general", type=click.Path(), help="search: also meet the target on this general text "
              "(\"default\" = the shipped corpus, its first --eval-general-max-tokens tokens, as the release gate "
              "scores it); a trial's degradation is the worst of the texts.")
@click.option("--eval-general-max-tokens", type=int, default=DEFAULT_GENERAL_MAX_TOKENS, show_default=True,
              help="search: tokens of --eval-general scored (0 = all).")
@click.option("--search-methods", default="awq,gptq", show_default=True,
              help="search: methods, in order of preference at equal size.")
@click.option("--max-size-mb", type=float, default=None, help="search: the largest file to accept, in MB. Configurations predicted above it are "
              "skipped (with --keep-sensitive K, the prediction counts the K largest linears as kept), and a trial "
              "whose real file is over it does not pass.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the output path.")
def quantize(model_dir, output, strict_group_size, calib, compute_dtype, awq_grid,
             module_bits, eval_data, eval_general, eval_general_max_tokens, search_methods, max_size_mb, force, quiet,
             **options):
    """Quantize a full-precision model folder with GPTQ or AWQ (4 or 8 bits) on CPU or CUDA.

    \b
    MODEL_DIR is an HF safetensors folder of a Llama-style model (e.g. `lorakit merge --output-kind model`
    output), or `default` for the embedded SmolLM2-135M-Instruct.

    \b
    With no options this is the release flow's quantization (the run config's quantize: section has the
    same keys and defaults, lorakit.quantize.options): GPTQ 4-bit, group 16, zero point, act-order, GPTAQ
    (alpha 0.5) and the clipping search, 128 blocks of 256 tokens, half of them lorakit's general-English text
    (measured: the setting that keeps both the tasks' answers and general English within the release gate;
    group 16 runs on CPU through GPTQModel's slower portable kernel, --group-size 32 keeps the fast one;
    docs/quantize.md).

    \b
    Examples:
      lorakit quantize merged -o merged-gptq --calib prep/               as the release flow quantizes
      lorakit quantize merged -o merged-awq --method awq --calib prep/ --calib-general-fraction 0.5
      lorakit quantize default -o smol-w8 --bits 8 --calib corpus.txt --calib-general none
      lorakit quantize merged -o m-q --calib prep/ --target-degradation 0.05   search within 5% on val

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
    opts = take_stage_options(QuantizeOptions, options)
    if opts.target_degradation is not None:
        general = {"eval_general": eval_general, "eval_general_max_tokens": eval_general_max_tokens or None}
        _search(model_dir, output, calib, eval_data, opts, search_methods, compute_dtype, max_size_mb, force, quiet,
                general)
        return
    result = quantize_model(
        model_dir, output, calib=calib, strict_group_size=strict_group_size, awq_grid=awq_grid,
        compute_dtype=compute_dtype, force=force,
        progress=not quiet, module_bits=_parse_module_bits(module_bits), **opts.quantize_kwargs(),
    )
    if quiet:
        click.echo(str(result.output))
        return
    meta = result.metadata
    p = meta["params"]
    mib = 1 << 20
    click.echo(f"quantized {meta['input']['path']} with {opts.method} ({p['bits']}-bit, group {p['group_size']}, "
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


def _search(model_dir, output, calib, eval_data, opts, methods, compute_dtype, max_size_mb, force, quiet,
            general: dict) -> None:
    from lorakit.quantize.search import SearchBounds, SearchSpace, search_quantization

    space = SearchSpace(methods=tuple(m.strip() for m in methods.split(",") if m.strip()), n_samples=(opts.n_samples,))
    bounds = SearchBounds(max_trials=opts.max_trials, time_budget_s=opts.time_budget_s,
                          max_size_bytes=int(max_size_mb * 1e6) if max_size_mb else None)
    result = search_quantization(model_dir, output, calib=calib, eval_data=eval_data,
                                 target_degradation=opts.target_degradation, space=space, bounds=bounds,
                                 seq_len=opts.seq_len, seed=opts.seed, device=opts.device,
                                 calib_general=opts.calib_general, calib_general_fraction=opts.calib_general_fraction,
                                 awq_scale_form=opts.awq_scale_form, gptaq_alpha=opts.gptaq_alpha,
                                 clip_search=opts.clip_search, keep_sensitive=opts.keep_sensitive,
                                 **{key: getattr(opts, key) for key in TUNE_KEYS},
                                 compute_dtype=compute_dtype, force=force, progress=not quiet, **general)
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
