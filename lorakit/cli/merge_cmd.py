"""``lorakit merge``: weighted combination of LoRA adapters."""

from __future__ import annotations

import click

from lorakit.cli.options import compute_dtype_option
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
@compute_dtype_option("merge")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the output path.")
def merge(adapters, weights, output, method, density, seed, normalize, output_kind, rank, base, loftq_base, force,
          ignore_base_name, compute_dtype, quiet):
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

    Nothing is written when an input is unusable; output appears only when complete (lorakit_merge.json
    inside records inputs, digests, parameters and any approximation error).
    """
    from lorakit.merge import merge_adapters
    from lorakit.runtime import configure_threads

    configure_threads()
    if quiet:
        from lorakit import progress

        progress.configure(console=False)
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


COMMANDS = [merge]
