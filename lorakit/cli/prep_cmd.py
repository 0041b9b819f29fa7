"""``lorakit prep``: raw task data -> a prepared-data folder (tokenized, masked, split, packed)."""

from __future__ import annotations

import click


@click.command()
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (must not exist unless --force).")
@click.option("--format", "fmt", type=click.Choice(["auto", "text", "instruction", "chat"]), default="auto",
              show_default=True, help="How examples are read; auto detects it from the fields and says which.")
@click.option("--base", help="Model whose tokenizer (and chat template) to use: a folder or hub id "
              "(default: the embedded SmolLM2-135M-Instruct). Train on the same base.")
@click.option("--max-length", type=int, default=512, show_default=True,
              help="Tokens per example and per packed row; longer examples are truncated and counted.")
@click.option("--pack/--no-pack", default=True, show_default=True,
              help="Pack several examples per row (no attention across them) or pad one example per row.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of example inputs held out as the validation split (read by the gate and any search).")
@click.option("--test-fraction", type=float, default=0.1, show_default=True,
              help="Share of example inputs held out as the test split, which only the final scorecard reads "
                   "(0: none; reports then fall back to val and say so).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/validation/test split.")
@click.option("--drop-long", is_flag=True, help="Leave out examples longer than --max-length instead of truncating.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the output path.")
def prep(data, output, fmt, base, max_length, pack, val_fraction, test_fraction, seed, drop_long, force, quiet):
    """Prepare task data for training: render, tokenize, mask prompts, split, pack.

    \b
    DATA are local files (.jsonl, .json, .csv, .parquet, .txt), bundled datasets (bundled:reverse-words,
    bundled:number-words), or `datasets` hub names (org/name[:split]) when a hub is reachable.

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
    result = prepare_dataset(list(data), output, format=fmt, base=base, max_length=max_length, pack=pack,
                             val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, drop_long=drop_long, force=force,
                             progress=not quiet)
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


COMMANDS = [prep]
