"""``lorakit eval`` (perplexity) and ``lorakit gate`` (accept or reject a candidate against its baseline)."""

from __future__ import annotations

import sys

import click

from lorakit.cli.options import (compute_dtype_option, device_option, gen_batch_size_option, stage_options,
                                 take_stage_options)
from lorakit.errors import EXIT_REJECTED, InputError
from lorakit.evaluate.options import WindowOptions
from lorakit.gate.options import GateOptions


def _start(quiet: bool) -> None:
    """Threads, and third-party logs and bars kept out (GPTQModel's kernel choices, "Loading weights" per shard)."""
    from lorakit import progress
    from lorakit.runtime import configure_threads, quiet_third_party_logs

    configure_threads()
    quiet_third_party_logs()
    if quiet:
        progress.configure(console=False)


def _method_options(stage: str):
    """Options shared by eval and gate: they define the perplexity method and how models are loaded."""
    return lambda f: _apply_method_options(f, stage)


def _apply_method_options(f, stage: str):
    options = [
        click.option("--data", required=True, type=click.Path(),
                     help="A prepared-data folder (its --split is used), a .jsonl of {\"text\": ...} lines, or a "
                          "plain text file (one document)."),
        click.option("--split", type=click.Choice(["val", "train", "test"]),
                     help="Split of a prepared-data folder (default: val; eval --tasks: test, or val when the folder "
                          "has none, which the output then says)."),
        click.option("--batch-size", default=4, show_default=True, type=int,
                     help="Perplexity: windows per forward pass (does not change the result)."),
        click.option("--base", help="Base model for adapter folders (default: the adapter's recorded base)."),
        click.option("--quant-path", type=click.Choice(["auto", "dequantized", "kernel"]), default="auto",
                     show_default=True, help="GPTQ/AWQ: dequantized = exact dense weights (fast on CPU); kernel = the "
                     "installed int4 kernels; auto = dequantized on CPU, kernel on CUDA."),
        device_option,
        compute_dtype_option(stage),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the result."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command(name="eval")
@click.argument("models", nargs=-1, required=True)
@_method_options("eval")
@stage_options(WindowOptions)
@click.option("--json", "json_out", type=click.Path(), help="Write all results (numbers and method) to this JSON file.")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
@click.option("--kernel-check", type=int, metavar="N", help="For GPTQ/AWQ on the dequantized path: also score the "
              "first N tokens with the int4 kernels and report the relative difference (slow on CPU).")
@click.option("--tasks", is_flag=True, help="Task accuracy instead of perplexity: greedy answers to the prompts of a "
              "prepared-data folder (instruction/chat), scored by exact match and token F1; --json keeps every "
              "prediction.")
@click.option("--margin", type=int, default=8, show_default=True,
              help="--tasks: new tokens allowed beyond the reference answer's length.")
@click.option("--max-examples", type=int, help="--tasks: score only the first N examples of the split.")
@gen_batch_size_option
@click.option("--case-insensitive", is_flag=True, help="--tasks: exact match and F1 ignore case.")
@click.option("--strip-punctuation", is_flag=True, help="--tasks: exact match and F1 ignore punctuation.")
def eval_(models, data, split, batch_size, base, quant_path, device, compute_dtype, quiet, json_out, force, kernel_check,
          tasks, margin, max_examples, gen_batch_size, case_insensitive, strip_punctuation, **options):
    """Perplexity of one or more models on the same text, with one fixed method.

    \b
    MODELS are HF model folders, PEFT adapter folders (loaded onto their base), GPTQ or AWQ folders, GGUF
    files (read by transformers' GGUF loader), or "default" (the embedded SmolLM2-135M-Instruct). The first model is the baseline: the text is tokenized
    once with its tokenizer and every other model must have the same tokenizer, or it is refused.

    \b
    The method: each document is tokenized without special tokens; documents are joined with one EOS;
    windows of --seq-len tokens start every --stride tokens; a window scores the tokens no earlier window
    scored (never its first token); perplexity = exp(token-level mean NLL). Text digest, tokenizer digest,
    seq-len, stride, token count, dtype and the load path used are recorded with every result.

    \b
    With --tasks, each model instead answers the prompts of a prepared-data folder's test split (val when it
    has none, said in the output) greedily; each prompt is the example as training rendered it, up to its
    answer (the last assistant turn of a chat). Answers are scored against the reference: exact match after
    whitespace normalisation (--case-insensitive, --strip-punctuation) and token-level F1. Text-format data has
    no answers and is skipped with a message. Decoding: greedy, left-padded batches of --gen-batch-size, KV cache,
    at most reference length + --margin new tokens, stopping at EOS or end of turn.

    \b
    Examples:
      lorakit eval default --data notes.txt
      lorakit eval base/ merged/ quantized-gptq/ --data prep/ --seq-len 256 --stride 128 --json ppl.json
      lorakit eval default adapters/reverse/ merged-gptq/ --data prep/reverse --tasks --json answers.json
    """
    from pathlib import Path

    from lorakit.evaluate import evaluate_models
    from lorakit.io.atomic import check_output_free, write_json

    _start(quiet)
    window = take_stage_options(WindowOptions, options)
    if json_out is not None:
        if Path(json_out).is_dir():
            raise InputError(f"--json {json_out} is a folder; pass a file path")
        check_output_free(Path(json_out), force)
    if tasks:
        _eval_tasks(list(models), data, split=split, base=base, batch_size=gen_batch_size, margin=margin,
                    max_examples=max_examples, case_insensitive=case_insensitive, strip_punctuation=strip_punctuation,
                    quant_path=quant_path, device=device, dtype=compute_dtype, quiet=quiet, json_out=json_out)
        return
    results = evaluate_models(list(models), data, **window.given(), batch_size=batch_size, base=base, split=split or "val", quant_path=quant_path,
                              device=device, dtype=compute_dtype, progress=not quiet, kernel_check_tokens=kernel_check)
    method = results[0].method
    if not quiet:
        click.echo(f"method: seq_len {method['seq_len']}, stride {method['stride']}, {method['dtype']}, "
                   f"{method['tokens_scored']} tokens scored of {method['tokens_total']} "
                   f"(text {method['text_digest'][:12]}, tokenizer {method['tokenizer_digest'][:12]})")
    for r in results:
        click.echo(f"{r.ppl:10.4f}  {r.model['folder']}  [{r.path_used}, {r.tokens_per_s:.0f} tok/s]")
        kc = r.extra.get("kernel_check")
        if kc:
            click.echo(f"            kernel check on {kc['tokens']} tokens: dequantized {kc['ppl_dequantized']:.4f} vs "
                       f"{kc['kernel_path']} {kc['ppl_kernel']:.4f} (relative difference "
                       f"{kc['relative_difference']:.1e}, {'agrees' if kc['agrees'] else 'DISAGREES'})")
    if json_out is not None:
        import lorakit

        write_json(json_out, {"lorakit": lorakit.__version__, "method": method, "compute_dtype": method["dtype"],
                              "results": [r.to_dict() for r in results]})


def _eval_tasks(models, data, *, quiet, json_out, **kwargs) -> None:
    """``eval --tasks``: task accuracy of every model on one split; the JSON holds every prediction."""
    from lorakit.evaluate import task_accuracies
    from lorakit.io.atomic import write_json

    results = task_accuracies(models, data, progress=not quiet, **kwargs)
    first = results[0]
    if first.split_note:
        click.secho(f"note: {first.split_note}", fg="yellow", err=True)
    if first.skipped:
        click.echo(f"skipped: {first.data}: {first.skipped}")
    else:
        if not quiet:
            d = first.decoding
            click.echo(f"tasks: {first.data} split {first.split}, {first.n_examples} examples ({first.format}); greedy, "
                       f"max new tokens = reference + {d['margin']}, stop ids {d['stop_token_ids']}, {d['dtype']}")
        for r in results:
            click.echo(f"exact {r.exact_match:7.2%}  F1 {r.f1:.3f}  {r.model['folder']}  "
                       f"[{r.model['path_used']}, {r.examples_per_s:.2f} ex/s]")
    if json_out is not None:
        import lorakit

        write_json(json_out, {"lorakit": lorakit.__version__, "kind": "task_accuracy",
                              "results": [r.to_dict() for r in results]})


def _parse_check(text: str, default_max: float) -> tuple[str, str, float]:
    """``NAME=DATA`` or ``NAME=DATA:MAX`` -> (name, data, max_degradation)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise InputError(f"--check {text!r} is not NAME=DATA[:MAX_DEGRADATION], e.g. --check math=prep/math:0.08")
    data, colon, tail = rest.rpartition(":")
    if colon:
        try:
            return name, data, float(tail)
        except ValueError:
            pass  # a colon inside the path, not a threshold
    return name, rest, default_max


@click.command()
@click.option("--baseline", required=True, help="The model the candidate must not be worse than (folder or \"default\").")
@click.option("--candidate", required=True, help="The model under test (HF, adapter, GPTQ or AWQ folder, or a GGUF file).")
@_method_options("gate")
@stage_options(GateOptions)
@click.option("--check", "checks", multiple=True, metavar="NAME=DATA[:MAX]",
              help="Extra check, repeatable: a task's validation data (prep folder or text) with its own threshold "
                   "(default: --max-degradation).")
@click.option("--scorecard", "scorecard", type=click.Path(), help="A release scorecard (`lorakit scorecard`: its "
              "folder or scorecard.json) built for BASELINE as merged and CANDIDATE as quantized model: adds the "
              "checks --min-retention and --max-accuracy-drop, judged on its val split.")
@click.option("-o", "--output", type=click.Path(), help="Write gate.json, gate.md and gate.png into this new folder.")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
def gate(baseline, candidate, data, split, batch_size, base, quant_path, device, compute_dtype, quiet, checks,
         scorecard, output, force, **options):
    """Accept or reject CANDIDATE: its perplexity may be at most --max-degradation worse than BASELINE's.

    \b
    degradation = ppl(candidate) / ppl(baseline) - 1, both measured in this process with the method of
    `lorakit eval` on one token stream (tokenized with the baseline's tokenizer; a candidate with another
    tokenizer is refused). A check passes when degradation <= its threshold (the boundary passes); the gate
    passes when every check passes: --data, each --check, and --general-text (on by default: lorakit's
    general-English text; --general-text none turns it off). The thresholds' defaults are the release
    flow's gate (the run config's gate: section has the same keys and defaults, lorakit.gate.options).

    \b
    The same forward passes also compare the two models' next-token distributions on every scored token:
    KL(p_baseline || p_candidate) in nats (mean and p99) and top-1 agreement (share of tokens where both
    predict the same next token), reported for every check; a check whose mean KL is above --max-kl fails too
    (--max-kl none: reported, not judged). Both models are held in memory together.

    \b
    With --scorecard (from `lorakit scorecard`), two release checks are added per task, judged on the
    scorecard's val split (its test split is reported only): --min-retention (the merged model keeps that
    share of each adapter's exact-match gain over the base; an adapter with no gain fails with "the adapter
    for TASK did not learn it") and --max-accuracy-drop (quantized vs merged exact match). A rejection
    names the failing check and task in one line.

    \b
    Exit codes (for CI and schedulers):
      0  passed        3  rejected (a check over its threshold)
      2  bad input     1  unexpected error
    With -o, the verdict is written as gate.json (every number, method and threshold), gate.md and gate.png.

    \b
    Examples:
      lorakit gate --baseline merged/ --candidate merged-gptq/ --data prep/ -o gate-out
      lorakit gate --baseline default --candidate m/ --data prep/ --check math=prep-math:0.08 \\
                   --general-max-degradation 0.1 --max-kl none
      lorakit gate --baseline merged/ --candidate merged-gptq/ --data prep/ --scorecard card/ \\
                   --min-retention 0.9 --max-accuracy-drop 0.02 -o gate-out
    """
    from lorakit.gate import CheckSpec, check, general_check
    from lorakit.gate.report import render_text

    _start(quiet)
    opts = take_stage_options(GateOptions, options)
    split = split or "val"
    extra = [CheckSpec(n, d, m, "task", split) for n, d, m in (_parse_check(c, opts.max_degradation) for c in checks)]
    general = general_check(opts.general_text, opts.general_max_degradation, opts.general_max_tokens, split)
    if general is not None:
        extra.append(general)
    card_given = sorted({"min_retention", "max_accuracy_drop", "max_general_forgetting"} & opts.model_fields_set)
    if scorecard is None and card_given:
        raise InputError(f"--{card_given[0].replace('_', '-')} judges a release scorecard; pass --scorecard "
                         "(build one with `lorakit scorecard`)")
    card_kw = {} if scorecard is None else {
        "scorecard": scorecard, "min_retention": opts.min_retention, "max_accuracy_drop": opts.max_accuracy_drop,
        "max_general_forgetting": opts.max_general_forgetting}
    verdict = check(baseline, candidate, data, max_degradation=opts.max_degradation, max_kl=opts.max_kl,
                    extra_checks=extra, output=output, **card_kw, base=base, seq_len=opts.seq_len, stride=opts.stride,
                    max_tokens=opts.max_tokens, batch_size=batch_size, split=split, quant_path=quant_path,
                    device=device, dtype=compute_dtype, force=force, progress=not quiet)
    if quiet:
        click.echo("PASSED" if verdict.passed else "REJECTED")
    else:
        click.echo(render_text(verdict))
        if verdict.output is not None:
            click.echo(f"verdict written to {verdict.output}")
    if not verdict.passed:
        sys.exit(EXIT_REJECTED)


COMMANDS = [eval_, gate]
