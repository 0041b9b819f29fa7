"""``lorakit train``: QLoRA (or plain LoRA) training of one adapter on a prepared-data folder."""

from __future__ import annotations

import contextlib
import sys

import click

from lorakit.cli.options import compute_dtype_option, device_option


@click.command()
@click.argument("prep_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Adapter folder to write (PEFT format).")
@click.option("--base", help="Base model folder or hub id (default: the model whose tokenizer prep used).")
@click.option("--quant", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True,
              help="nf4: QLoRA (4-bit NF4, double quant, bitsandbytes; computes in --compute-dtype); none: plain LoRA.")
@click.option("--r", "r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=32, show_default=True, help="LoRA alpha (scaling alpha/r).")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="LoRA dropout.")
@click.option("--target", default="all-linear", show_default=True,
              help="Modules to adapt: all-linear (never the output head) or a list such as q,v or q_proj,v_proj.")
@click.option("--rslora", is_flag=True, help="Rank-stabilised scaling alpha/sqrt(r).")
@click.option("--variant", type=click.Choice(["lora", "dora"]), default="lora", show_default=True,
              help="dora: DoRA (learned magnitude x normalised direction, PEFT use_dora); merges materialise it.")
@click.option("--init", "init", type=click.Choice(["default", "loftq", "pissa", "olora"]), default="default",
              show_default=True, help="LoRA initialisation: loftq cancels the NF4 error (--quant nf4 only); pissa/olora "
              "start from the base's principal directions (--quant none only; saved converted to plain LoRA, rank 2r).")
@click.option("--lora-plus-ratio", type=float, help="LoRA+: B learns this many times faster than A (16 is usual).")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (linear warm-up and decay).")
@click.option("--epochs", type=float, help="Passes over the training rows (default 1).")
@click.option("--max-steps", type=int, help="Optimizer steps instead of --epochs.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows per microbatch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Microbatches per optimizer step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of LoRA init, data order and dropout.")
@device_option
@compute_dtype_option("train")
@click.option("--checkpoint-every", type=int, default=50, show_default=True,
              help="Steps between checkpoints (kept in OUTPUT.checkpoints until the run succeeds).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint; same result as an uninterrupted run.")
@click.option("--min-loss-drop", type=float, default=0.01, show_default=True,
              help="Sanity gate: required relative drop of the first batch's loss after training.")
@click.option("--no-loss-check", is_flag=True, help="Skip the loss-fell check (finite loss/gradient checks stay on).")
@click.option("--force", is_flag=True, help="Replace an existing output folder and any stale checkpoints.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the output path.")
def train(prep_dir, output, base, quant, r, alpha, dropout, target, rslora, variant, init, lora_plus_ratio, lr, epochs,
          max_steps, batch_size, grad_accum, seed, device, compute_dtype, checkpoint_every, resume, min_loss_drop,
          no_loss_check, force, quiet):
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
    with contextlib.redirect_stdout(sys.stderr):
        result = _train(
            prep_dir, output, base=base, quant=quant, r=r, alpha=alpha, dropout=dropout, target=target, rslora=rslora,
            lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
            variant=variant, init=init, lora_plus_ratio=lora_plus_ratio, resume=resume, device=device,
            compute_dtype=compute_dtype, checkpoint_every=checkpoint_every,
            min_loss_drop=None if no_loss_check else min_loss_drop, force=force, progress=not quiet,
        )
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
