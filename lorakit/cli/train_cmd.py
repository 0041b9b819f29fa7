"""``lorakit train``: QLoRA (or plain LoRA) training of one adapter on a prepared-data folder."""

from __future__ import annotations

import contextlib
import sys

import click

from lorakit.cli.options import compute_dtype_option, stage_options, take_stage_options
from lorakit.train.options import TrainOptions


@click.command()
@click.argument("prep_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Adapter folder to write (PEFT format).")
@click.option("--base", help="Base model folder or hub id (default: the model whose tokenizer prep used).")
@stage_options(TrainOptions)
@compute_dtype_option("train")
@click.option("--no-loss-check", is_flag=True, help="Skip the loss-fell check (= --min-loss-drop none).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint; same result as an uninterrupted run.")
@click.option("--force", is_flag=True, help="Replace an existing output folder and any stale checkpoints.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the output path.")
def train(prep_dir, output, base, compute_dtype, no_loss_check, resume, force, quiet, **options):
    """Train one LoRA adapter (QLoRA by default) on PREP_DIR's training split.

    \b
    PREP_DIR is a folder written by `lorakit prep`; the base must use the same tokenizer. Runs on CUDA when
    available, else on CPU (4-bit NF4 works on CPU with bitsandbytes >= 0.50).

    \b
    The sanity gate fails the run (exit 3, nothing written) when the loss or a LoRA gradient norm is not finite,
    when the gradient norm is zero, or when the loss on the first batch has not fallen by --min-loss-drop.

    \b
    Output: a standard PEFT adapter folder, train_log.jsonl (loss, grad norm, lr, tokens/s per step) and
    lorakit_train.json (base id + weights digest, prep digest, every hyper-parameter, losses, time, versions).

    \b
    With no options this trains as the release flow does (the run config's lora: section has the same keys
    and defaults, lorakit.train.options): QLoRA rank 16 on every linear, learning rate 1e-3, 80 steps of
    2 x 2 packed rows.

    \b
    Examples:
      lorakit train prep/reverse -o adapters/reverse
      lorakit train prep/reverse -o adapters/reverse --quant none --r 8 --target q,v --max-steps 200
      lorakit train prep/reverse -o adapters/reverse --variant dora --lora-plus-ratio 16
      lorakit train prep/reverse -o adapters/reverse --resume          after an interruption
    """
    from lorakit.runtime import configure_threads, quiet_third_party_logs
    from lorakit.train import train_adapter as _train

    configure_threads()
    quiet_third_party_logs()
    if quiet:
        from lorakit import progress

        progress.configure(console=False)
    # PEFT imports GPTQModel while wrapping layers, and GPTQModel prints a banner on stdout; keep stdout for
    # lorakit's own result lines (scripts read the output path from --quiet).
    opts = take_stage_options(TrainOptions, options)
    kwargs = opts.given()
    if no_loss_check:
        kwargs["min_loss_drop"] = None
    with contextlib.redirect_stdout(sys.stderr):
        result = _train(prep_dir, output, base=base, resume=resume, compute_dtype=compute_dtype, force=force,
                        progress=not quiet, **kwargs)
    if quiet:
        click.echo(str(result.output))
        return
    m = result.metadata
    resumed = f", resumed from step {m['resumed_from_step']}" if m["resumed_from_step"] else ""
    click.echo(f"trained {m['steps']} steps on {m['device']} ({m['config']['quant']}, {m['compute_dtype']}{resumed}): loss "
               f"{m['first_loss']:.4f} -> {m['final_loss']:.4f}; first batch {m['first_batch_loss_before']:.4f} -> "
               f"{m['first_batch_loss_after']:.4f} ({m['loss_drop']:.1%} lower); {m['wall_time_s']:.1f}s")
    click.echo(f"-> {result.output}")


COMMANDS = [train]
