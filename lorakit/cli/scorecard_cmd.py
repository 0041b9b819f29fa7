"""``lorakit scorecard``: does the release still do every task? (``lorakit.scorecard.build_scorecard``)"""

from __future__ import annotations

import click

from lorakit.cli.options import (compute_dtype_option, device_option, gen_batch_size_option, stage_options,
                                 take_stage_options)
from lorakit.gate.general import DEFAULT_GENERAL_MAX_TOKENS
from lorakit.evaluate.accuracy import DEFAULT_MARGIN
from lorakit.evaluate.core import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from lorakit.scorecard.options import ScorecardOptions


@click.command()
@click.option("--base", default="default", show_default=True,
              help="The base model the adapters were trained on (folder, or \"default\" = the embedded model).")
@click.option("--task", "tasks", multiple=True, required=True, nargs=3, metavar="NAME PREP ADAPTER",
              help="One task, repeatable: its name, its prepared-data folder (lorakit prep) and its adapter.")
@click.option("--merged", required=True, type=click.Path(), help="The merged full-precision model.")
@click.option("--quantized", type=click.Path(), help="The quantized release model (GPTQ/AWQ folder); omit to score "
              "base, adapters and merged only.")
@click.option("-o", "--output", required=True, type=click.Path(), help="New folder for scorecard.json, "
              "predictions.json, scorecard.md and scorecard.png.")
@stage_options(ScorecardOptions)
@click.option("--margin", type=int, default=DEFAULT_MARGIN, show_default=True,
              help="New tokens allowed beyond each reference answer's length.")
@gen_batch_size_option
@click.option("--case-insensitive", is_flag=True, help="Exact match and F1 ignore case.")
@click.option("--strip-punctuation", is_flag=True, help="Exact match and F1 ignore punctuation.")
@click.option("--seq-len", default=DEFAULT_SEQ_LEN, show_default=True, type=int,
              help="Perplexity: tokens per window.")
@click.option("--stride", type=int, help="Perplexity: tokens between window starts (default: --seq-len).")
@click.option("--max-tokens", type=int, help="Perplexity: cut each split's token stream to its first N tokens.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=int,
              help="Perplexity: windows per forward pass.")
@click.option("--quant-path", type=click.Choice(["auto", "dequantized", "kernel"]), default="auto", show_default=True,
              help="GPTQ/AWQ: dequantized = exact dense weights (fast on CPU); kernel = installed int4 kernels.")
@device_option
@compute_dtype_option("eval")
@click.option("--general-text", default="default", show_default=True, help="Also score every model's perplexity on "
              "this general text (\"default\" = the corpus shipped with lorakit; a .txt/.jsonl file; \"none\" = "
              "off): what each model keeps of its language.")
@click.option("--general-max-tokens", type=int, default=DEFAULT_GENERAL_MAX_TOKENS, show_default=True,
              help="Tokens of --general-text scored (0 = all), as the gate reads it.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines; print only the table.")
def scorecard(base, tasks, merged, quantized, output, margin, gen_batch_size, case_insensitive, strip_punctuation,
              seq_len, stride, max_tokens, batch_size, quant_path, device, compute_dtype, general_text,
              general_max_tokens, force, quiet, **options):
    """Score a release task by task: base, each task's adapter, merged and quantized model.

    \b
    For every --task and each of its splits val (the gate's selection split) and test (the held-out report;
    a folder without one is reported on val, and the scorecard says so), every model that applies is
    measured on:
      exact match and token F1   greedy answers to the split's prompts (as `lorakit eval --tasks`);
                                 text-format data has no answers: a labelled skip
      perplexity / mean NLL      the split's examples, the method of `lorakit eval` (one token stream,
                                 tokenized with the base's tokenizer)
    The models: the base, that task's adapter alone (PEFT on the base), the merged model, the quantized
    model. Each is loaded once and scores every task before the next loads, then the general text
    (--general-text): each model's perplexity on it and its change against the base.

    \b
    Derived per task and split:
      retention       (merged - base) / (adapter - base) on exact match, F1 and NLL: the share of the
                      adapter's gain the merge kept; "not learned" when the adapter gained nothing
      quantized drop  merged exact match - quantized exact match
    On val, both also over the first --judge-examples questions (default all, every model answers
    them), which is what the gate judges; the table shows the first --max-examples. The drop there
    comes with the answers behind it: how many the quantized model lost and gained against the merged
    one, and McNemar's exact p-value of that split (small: quantization broke answers; large: answers
    near the edge flipped both ways). It is reported; the gate's bar stays fixed.
    `lorakit gate --scorecard DIR` judges these on val (--min-retention, --max-accuracy-drop).

    \b
    Bad input (a model whose tokenizer differs from the base's or from the data's, a prep folder without
    a val split, an existing output) fails before any model loads; the output folder appears whole or not
    at all. Exit codes: 0 written, 2 bad input, 1 unexpected error.

    \b
    Example:
      lorakit scorecard --task reverse prep/reverse adapters/reverse --task numbers prep/numbers \\
          adapters/numbers --merged merged/ --quantized merged-gptq/ -o scorecard/
    """
    from lorakit.cli.eval_cmd import _start
    from lorakit.scorecard import ScorecardTask, build_scorecard
    from lorakit.scorecard.report import render_text

    _start(quiet)
    card = build_scorecard(base, [ScorecardTask(n, p, a) for n, p, a in tasks], merged, quantized, output=output,
                           seq_len=seq_len, stride=stride, max_tokens=max_tokens, ppl_batch_size=batch_size,
                           gen_batch_size=gen_batch_size, margin=margin,
                           **take_stage_options(ScorecardOptions, options).model_dump(),
                           case_insensitive=case_insensitive, strip_punctuation=strip_punctuation,
                           quant_path=quant_path, device=device, dtype=compute_dtype, general=general_text,
                           general_max_tokens=general_max_tokens or None, force=force,
                           progress=not quiet)
    click.echo(render_text(card.data))
    click.echo(f"scorecard written to {card.output}")


COMMANDS = [scorecard]
