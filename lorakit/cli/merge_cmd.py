"""``lorakit merge``: weighted combination of LoRA adapters."""

from __future__ import annotations

import click

from lorakit.cli.options import compute_dtype_option, stage_options, take_stage_options
from lorakit.errors import InputError
from lorakit.merge.options import MergeOptions, MergeSearchOptions, default_weights


@click.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (must not exist unless --force).")
@stage_options(MergeOptions)
@click.option("--output-kind", type=click.Choice(["adapter", "model"]), default="adapter", show_default=True,
              help="adapter: a PEFT adapter folder; model: the base with the merged update folded in (HF safetensors).")
@click.option("--rank", type=int, help="Re-factor the merged update to this rank by truncated SVD (adapter output); "
              "the approximation error is printed and recorded.")
@click.option("--base", help="Base model folder or hub id (default: the adapters' recorded base, else the embedded "
              "SmolLM2-135M-Instruct). Needed for --output-kind model; checks shapes and tied embeddings.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("--ignore-base-name", is_flag=True, help="Accept adapters whose recorded base names differ "
              "(use only when they name the same weights).")
@click.option("--search", is_flag=True, help="Choose the weights (and density for ties/dare without --density) by "
              "measurement: maximise the worst task's retention on val (needs --data per adapter; docs/merge.md). "
              "The options below apply to it.")
@click.option("--data", "data", multiple=True, metavar="NAME=PREP", help="--search and --method regmean: the task of "
              "each adapter, in adapter order: a name and its prepared-data folder (--search: val is searched, test "
              "only reported; regmean: the first --regmean-examples of train are read).")
@stage_options(MergeSearchOptions, prefix_help="--search: ")
@click.option("--seq-len", type=int, help="--search: evaluation window in tokens (default: lorakit eval's).")
@compute_dtype_option("merge")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the output path.")
def merge(adapters, output, output_kind, rank, base, force, ignore_base_name, search, data, seq_len, compute_dtype,
          quiet, **options):
    """Merge LoRA adapters: ΔW = Σ wᵢ·scalingᵢ·BᵢAᵢ (linear), TIES/DARE/pruning on the updates, or RegMean.

    \b
    ADAPTERS are PEFT LoRA adapter folders trained on the same base model with the same target modules;
    ranks, alphas and rsLoRA may differ (each adapter's own scaling is honoured). DoRA adapters are merged as
    their materialised updates W'ᵢ − W (model output exact; adapter output needs --rank). PiSSA/OLoRA adapters
    from lorakit train are already plain LoRA on the original base.

    \b
    Examples:
      lorakit merge a b -o merged                               1.0 each (task arithmetic), as the release
      lorakit merge a b --weights 0.5,0.5 -o merged            exact adapter, rank r_a + r_b
      lorakit merge a b -w 0.7,0.3 --rank 16 -o merged16       rank 16, error reported
      lorakit merge a b -w 1,-0.5 --output-kind model -o m     task negation, full HF model
      lorakit merge a b c --method ties --density 0.3 --output-kind model -o m
      lorakit merge a b --search --data rev=prep/rev --data num=prep/num -o m   weights chosen on val
      lorakit merge a b --method regmean --data rev=prep/rev --data num=prep/num --output-kind model -o m
                                      each adapter keeps its layer outputs on its own task (the release's default)
      lorakit merge a b --search --methods regmean --data rev=prep/rev --data num=prep/num --output-kind model -o m
                                      RegMean with each task's weight chosen on val

    Nothing is written when an input is unusable; output appears only when complete (lorakit_merge.json
    inside records inputs, digests, parameters and any approximation error).
    """
    from lorakit.merge import merge_adapters
    from lorakit.runtime import configure_threads

    configure_threads()
    if quiet:
        from lorakit import progress

        progress.configure(console=False)
    opts = take_stage_options(MergeOptions, options)
    search_opts = take_stage_options(MergeSearchOptions, options)
    if search:
        return _search(adapters, output, opts, search_opts, data, seq_len, output_kind, rank, base, force,
                       ignore_base_name, compute_dtype, quiet)
    regmean = opts.method == "regmean"
    if regmean:
        from lorakit.merge.search import parse_data
    given = [f"--{name.replace('_', '-')}" for name in search_opts.model_fields_set] + \
        [flag for flag, v in (("--data", None if regmean else data), ("--seq-len", seq_len)) if v not in (None, ())]
    if given:
        raise InputError(f"{given[0]} applies to --search; add --search, or leave {given[0]} out")
    w = list(opts.weights) if opts.weights is not None else default_weights(len(adapters))
    result = merge_adapters(
        adapters, w, output, method=opts.method, output_kind=output_kind, rank=rank, base=base, density=opts.density,
        seed=opts.seed, normalize=opts.normalize, force=force, ignore_base_name=ignore_base_name,
        loftq_base=opts.loftq_base, compute_dtype=compute_dtype, progress=not quiet,
        data=[prep for _, prep in parse_data(list(data))] if regmean and data else None,
        regmean_alpha=opts.regmean_alpha, regmean_examples=opts.regmean_examples,
        regmean_anchor=opts.regmean_anchor,
    )
    if quiet:
        click.echo(str(result.output))
        return
    meta = result.metadata
    for path in meta["negative_weights"]:
        click.echo(f"note: negative weight for {path}: its task is subtracted (task negation)")
    if result.relative_error is not None:
        click.echo(f"rank-{meta['rank']} approximation: relative Frobenius error {result.relative_error:.3e} overall "
                   f"(worst module {max(meta['per_module_relative_error'].values()):.3e})")
    exactness = "exact" if result.exact else "approximate"
    click.echo(f"merged {len(adapters)} adapters ({result.method}, weights {','.join(f'{x:g}' for x in w)}) -> "
               f"{result.output} [{result.output_kind}, {exactness}, {meta['wall_time_s']:.1f}s]")


def _search(adapters, output, opts, search_opts, data, seq_len, output_kind, rank, base, force, ignore_base_name,
            compute_dtype, quiet) -> None:
    """``--search``: the weights chosen on val; prints the choice beside the unsearched baseline."""
    from lorakit.merge.search import search_merge

    if opts.weights is not None:
        raise InputError("--weights and --search exclude each other: --search chooses the weights; leave one out")
    if "method" in opts.model_fields_set:
        raise InputError("--search takes the methods to try as --methods (e.g. --methods linear,ties), not --method")
    regmean = {k: getattr(opts, k) for k in ("regmean_alpha", "regmean_examples", "regmean_anchor")}
    if any(v is not None for v in regmean.values()) and "regmean" not in search_opts.methods:
        raise InputError("--regmean-alpha, --regmean-examples and --regmean-anchor apply to method regmean; with "
                         "--search, add it to the methods searched (--methods regmean), or leave them out")
    if opts.loftq_base is not None:
        raise InputError("--search merges plain LoRA adapters; --loftq-base does not apply")
    if not data:
        raise InputError("--search needs the task of each adapter: --data NAME=PREP once per adapter, in order")
    extra = {} if seq_len is None else {"seq_len": seq_len}
    result = search_merge(
        adapters, list(data), output, **search_opts.given(), density=opts.density, seed=opts.seed,
        normalize=opts.normalize, **regmean, output_kind=output_kind, rank=rank, base=base, force=force,
        ignore_base_name=ignore_base_name, compute_dtype=compute_dtype, progress=not quiet, **extra)
    if quiet:
        click.echo(str(result.output))
        return
    click.echo(search_summary(result.metadata))
    click.echo(f"merged {len(adapters)} adapters ({result.method}) -> {result.output} [{result.output_kind}, exact, "
               f"{result.metadata['search']['search_s']:.1f}s searching]")


def search_summary(meta: dict) -> str:
    """The chosen merge beside the unsearched baseline (linear 1/n, or RegMean 1.0 each): worst-task retention on val
    (searched) and test (held out)."""
    s = meta["search"]
    metric = s.get("metric", "nll")
    chosen, uniform = s["trials"][s["chosen"]], s["trials"][s["uniform"]]

    def params(t: dict) -> str:
        rest = "".join(f", {k} {v:g}" for k, v in t["params"].items() if k == "density")
        return f"{t['method']}, weights {','.join(f'{x:g}' for x in t['params']['weights'])}{rest}"

    def worst(split: str, label: str) -> str:
        if s["report"].get(split) is None:
            return "n/a (no test split)"
        value = s["report"][split][label]
        return f"undefined (an adapter does not gain on its test {metric})" if value is None else f"{value:.3f}"

    lines = [f"searched {s['n_trials']} trials on {s.get('objective_name', 'nll')} ({', '.join(f'{m}: {why}' for m, why in s['stopped'].items())}; "
             f"median trial {s['trial_s_median']:.1f}s, {s['trial_vs_eval_pass']:.2f}x its evaluation pass)",
             f"  chosen  ({params(chosen)}): worst-task retention val {worst('val', 'chosen')}, "
             f"test {worst('test', 'chosen')}",
             f"  uniform ({params(uniform)}): worst-task retention val {worst('val', 'uniform')}, "
             f"test {worst('test', 'uniform')}"]
    # retention divides by these: a tiny gain makes a task's retention large and noisy (docs/merge.md)
    lines.append(f"  each adapter's own val gain (base -> adapter {metric}): " + "; ".join(
        f"{name} {t[f'base_{metric}']:.4f} -> {t[f'adapter_{metric}']:.4f}" for name, t in s["tasks"].items()))
    if s["met_target"] is False:
        lines.append(f"  target retention {s['target_retention']:g} NOT reached within the bounds; the best trial "
                     "was written")
    return "\n".join(lines)


COMMANDS = [merge]
