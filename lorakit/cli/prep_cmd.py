"""``lorakit prep``: raw task data -> a prepared-data folder (tokenized, masked, split, packed)."""

from __future__ import annotations

import click

from lorakit.cli.options import stage_options, take_stage_options
from lorakit.data.bundled import BUNDLED_NAMES, BUNDLED_PREFIX
from lorakit.data.options import PrepOptions


@click.command()
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (must not exist unless --force).")
@click.option("--base", help="Model whose tokenizer (and chat template) to use: a folder or hub id "
              "(default: the embedded SmolLM2-135M-Instruct). Train on the same base.")
@stage_options(PrepOptions)
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the output path.")
def prep(data, output, base, force, quiet, **options):
    """Prepare task data for training: render, tokenize, mask prompts, split, pack.

    \b
    DATA are local files (.jsonl, .json, .csv, .parquet, .txt), bundled datasets
    (BUNDLED), or `datasets` hub names (org/name[:split]) when a hub is reachable.

    \b
    Formats:
      text         a 'text' field (plain .txt: one example per paragraph); loss on every token
      instruction  instruction [+ input/context] + output/response (Alpaca, Dolly); loss on the response only
      chat         'messages' [{role, content}, ...] via the tokenizer's chat template; loss on assistant turns

    \b
    Splits are disjoint by example input (duplicates of one prompt share a split). Training and calibration
    read train, the gate and searches read val, the final scorecard reports test.

    \b
    Output folder: train/val/test .parquet (input_ids, labels with -100 on prompts, position_ids per document),
    train/val/test .texts.jsonl (the rendered examples, with prompt end and reference answer), prep.json (sources + sha256, tokenizer id + digest, counts:
    examples, tokens, padding fraction, truncated/dropped examples).

    \b
    Examples:
      lorakit prep bundled:reverse-words -o prep/reverse
      lorakit prep chats.jsonl --format chat --max-length 1024 -o prep/chat
      lorakit prep notes.txt --no-pack --val-fraction 0.05 --seed 1 -o prep/notes
    """
    from lorakit.data.prep import prepare_dataset
    from lorakit.runtime import configure_threads, quiet_third_party_logs

    configure_threads()
    quiet_third_party_logs()
    if quiet:
        from lorakit import progress

        progress.configure(console=False)
    opts = take_stage_options(PrepOptions, options)
    result = prepare_dataset(list(data), output, base=base, force=force, progress=not quiet, **opts.given())
    for warning in result.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    if quiet:
        click.echo(str(result.output))
        return
    meta = result.metadata
    how = "detected" if meta["format_detected"] else "given"
    click.echo(f"format: {result.format} ({how}); template: {meta['template']}; tokenizer: {meta['tokenizer']['id']}")
    for split, c in result.counts.items():
        click.echo(f"{split}: {c.examples} examples, {c.rows} rows of {meta['row_length']}, {c.tokens} tokens "
                   f"({c.loss_tokens} with loss), padding {c.padding_fraction:.1%}, truncated {c.truncated}, "
                   f"dropped {c.dropped_long}")
    click.echo(f"-> {result.output}")


# The bundled datasets, as their owner lists them.
prep.help = prep.help.replace("BUNDLED", ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_NAMES))

COMMANDS = [prep]
