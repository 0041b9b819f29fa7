"""``lorakit merge``: weighted combination of LoRA adapters."""

from __future__ import annotations

import click

from lorakit.cli.options import compute_dtype_option
from lorakit.merge.objectives import DEFAULT_OBJECTIVE, OBJECTIVES
from lorakit.errors import InputError


def parse_weights(text: str | None, n: int) -> list[float]:
    """``0.5,0.5`` -> [0.5, 0.5]; without --weights every adapter gets 1/n."""
    if text is None:
        return [1.0 / n] * n
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--weights {text!r} is not a comma-separated list of numbers, e.g. --weights 0.5,0.5") from None


_METHODS = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


@click.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-w", "--weights", help="Comma-separated weight per adapter, in order (default: 1/n each). "
              "Any finite value; they need not sum to 1, and a negative weight subtracts a task.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (must not exist unless --force).")
@click.option("--method", type=click.Choice(_METHODS), default="linear", show_default=True,
              help="How updates are combined; every method works on the full updates ΔWᵢ = scalingᵢ·BᵢAᵢ.")
@click.option("--density", type=float, help="ties/dare_*/magnitude_prune: fraction of each update's entries kept.")
@click.option("--seed", type=int, help="dare_*: seed of the random drop masks (default 0; deterministic).")
@click.option("--normalize", is_flag=True, default=None, help="ties/dare_ties: divide by the sum of agreeing weights.")
@click.option("--output-kind", type=click.Choice(["adapter", "model"]), default="adapter", show_default=True,
              help="adapter: a PEFT adapter folder; model: the base with the merged update folded in (HF safetensors).")
@click.option("--rank", type=int, help="Re-factor the merged update to this rank by truncated SVD (adapter output); "
              "the approximation error is printed and recorded.")
@click.option("--base", help="Base model folder or hub id (default: the adapters' recorded base, else the embedded "
              "SmolLM2-135M-Instruct). Needed for --output-kind model; checks shapes and tied embeddings.")
@click.option("--loftq-base", type=click.Choice(["dequantized", "original"]),
              help="LoftQ adapters (lorakit train --init loftq) belong to the NF4-quantized base: dequantized merges into "
              "dequant(NF4(W)), exactly the model that was trained; original adds them to W anyway. Required for "
              "--output-kind model with a LoftQ adapter.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("--ignore-base-name", is_flag=True, help="Accept adapters whose recorded base names differ "
              "(use only when they name the same weights).")
@click.option("--search", is_flag=True, help="Choose the weights (and density for ties/dare without --density) by "
              "measurement: maximise the worst task's retention on val (needs --data per adapter; docs/merge.md).")
@click.option("--data", "data", multiple=True, metavar="NAME=PREP", help="--search: the task of each adapter, in "
              "adapter order: a name and its prepared-data folder (val is searched, test only reported).")
@click.option("--methods", default="linear", show_default=True,
              help="--search: comma-separated methods to search (the trial budget is split between them).")
@click.option("--objective", type=click.Choice(list(OBJECTIVES)), default=None,
              help=f"--search: the score retention is measured on: nll (val NLL, cheap, the default) or accuracy "
              f"(greedy exact match on the val examples: what the release promises, generation per trial; instruction "
              f"or chat data). [default: {DEFAULT_OBJECTIVE}]")
@click.option("--max-trials", type=int, help="--search: merges evaluated at most (default in docs/merge.md; the uniform "
              "1/n baseline is the first).")
@click.option("--time-budget", type=float, help="--search: seconds; no trial starts after it (default in docs/merge.md).")
@click.option("--target-retention", type=float, help="--search: say whether the best worst-task retention reaches "
              "this (the best trial is written either way).")
@click.option("--max-tokens", type=int, help="--search: score at most this many tokens of each split.")
@click.option("--seq-len", type=int, help="--search: evaluation window in tokens (default: lorakit eval's).")
@compute_dtype_option("merge")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the output path.")
def merge(adapters, weights, output, method, density, seed, normalize, output_kind, rank, base, loftq_base, force,
          ignore_base_name, search, data, methods, objective, max_trials, time_budget, target_retention, max_tokens, seq_len,
          compute_dtype, quiet):
    """Merge LoRA adapters: ΔW = Σ wᵢ·scalingᵢ·BᵢAᵢ (linear), or TIES/DARE/pruning on the updates.

    \b
    ADAPTERS are PEFT LoRA adapter folders trained on the same base model with the same target modules;
    ranks, alphas and rsLoRA may differ (each adapter's own scaling is honoured). DoRA adapters are merged as
    their materialised updates W'ᵢ − W (model output exact; adapter output needs --rank). PiSSA/OLoRA adapters
    from lorakit train are already plain LoRA on the original base.

    \b
    Examples:
      lorakit merge a b --weights 0.5,0.5 -o merged            exact adapter, rank r_a + r_b
      lorakit merge a b -w 0.7,0.3 --rank 16 -o merged16       rank 16, error reported
      lorakit merge a b -w 1,-0.5 --output-kind model -o m     task negation, full HF model
      lorakit merge a b c --method ties --density 0.3 --output-kind model -o m
      lorakit merge a b --search --data rev=prep/rev --data num=prep/num -o m   weights chosen on val

    Nothing is written when an input is unusable; output appears only when complete (lorakit_merge.json
    inside records inputs, digests, parameters and any approximation error).
    """
    from lorakit.merge import merge_adapters
    from lorakit.runtime import configure_threads

    configure_threads()
    if quiet:
        from lorakit import progress

        progress.configure(console=False)
    search_options = {"--data": data, "--objective": objective, "--max-trials": max_trials, "--time-budget": time_budget,
                      "--target-retention": target_retention, "--max-tokens": max_tokens, "--seq-len": seq_len}
    if search:
        return _search(adapters, output, method, weights, data, methods, objective, max_trials, time_budget, target_retention,
                       max_tokens, seq_len, density, seed, normalize, output_kind, rank, base, loftq_base, force,
                       ignore_base_name, compute_dtype, quiet)
    given = [name for name, v in search_options.items() if v not in (None, ())]
    if given:
        raise InputError(f"{given[0]} applies to --search; add --search, or leave {given[0]} out")
    w = parse_weights(weights, len(adapters))
    result = merge_adapters(
        adapters, w, output, method=method, output_kind=output_kind, rank=rank, base=base, density=density,
        seed=seed, normalize=normalize, force=force, ignore_base_name=ignore_base_name, loftq_base=loftq_base,
        compute_dtype=compute_dtype,
        progress=not quiet,
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


def _search(adapters, output, method, weights, data, methods, objective, max_trials, time_budget, target_retention, max_tokens,
            seq_len, density, seed, normalize, output_kind, rank, base, loftq_base, force, ignore_base_name,
            compute_dtype, quiet) -> None:
    """``--search``: the weights chosen on val; prints the choice beside the uniform 1/n baseline."""
    from lorakit.merge.search import search_merge

    if weights is not None:
        raise InputError("--weights and --search exclude each other: --search chooses the weights; leave one out")
    if method != "linear":
        raise InputError("--search takes the methods to try as --methods (e.g. --methods linear,ties), not --method")
    if loftq_base is not None:
        raise InputError("--search merges plain LoRA adapters; --loftq-base does not apply")
    if not data:
        raise InputError("--search needs the task of each adapter: --data NAME=PREP once per adapter, in order")
    extra = {} if seq_len is None else {"seq_len": seq_len}
    result = search_merge(
        adapters, list(data), output, methods=[m.strip() for m in methods.split(",") if m.strip()],
        objective=objective or DEFAULT_OBJECTIVE, max_trials=max_trials, time_budget_s=time_budget, target_retention=target_retention, density=density,
        seed=seed, normalize=normalize, output_kind=output_kind, rank=rank, base=base, max_tokens=max_tokens,
        force=force, ignore_base_name=ignore_base_name, compute_dtype=compute_dtype, progress=not quiet, **extra)
    if quiet:
        click.echo(str(result.output))
        return
    click.echo(search_summary(result.metadata))
    click.echo(f"merged {len(adapters)} adapters ({result.method}) -> {result.output} [{result.output_kind}, exact, "
               f"{result.metadata['search']['search_s']:.1f}s searching]")


def search_summary(meta: dict) -> str:
    """The chosen merge beside the uniform 1/n one: worst-task retention on val (searched) and test (held out)."""
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
