"""``lorakit export``: a model as a llama.cpp GGUF file, or an adapter in a form every runtime applies the same."""

from __future__ import annotations

import click

from lorakit.export.types import DEFAULT_GGUF_TYPE, GGUF_TYPES


@click.command()
@click.argument("source", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["gguf", "peft"]), required=True,
              help="gguf: one llama.cpp GGUF file of a full-precision model. peft: a PEFT adapter folder (with --portable).")
@click.option("--type", "qtype", type=click.Choice(GGUF_TYPES), default=DEFAULT_GGUF_TYPE, show_default=True,
              help="gguf: tensor type. f16 = half precision; q8_0 = 8-bit blocks of 32 (near lossless); q4_0, q5_0, "
                   "q5_1 = 4/5-bit blocks (smaller, lossier; the embedding stays q8_0). Sizes and perplexities: "
                   "bench/README.md (## export).")
@click.option("--portable", is_flag=True, help="peft: fold rsLoRA and per-module rank/alpha patterns into B, so the "
              "adapter has scaling 1 under every runtime's convention (required with --format peft).")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="gguf: the output file (e.g. model.q8_0.gguf); peft: the output folder. Must not exist unless --force.")
@click.option("--tokenizer-pre", default=None, metavar="NAME",
              help="gguf: llama.cpp pre-tokenizer name (tokenizer.ggml.pre) when lorakit cannot recognise the "
                   "tokenizer's own (it recognises gpt2 and smollm).")
@click.option("--force", is_flag=True, help="Replace an existing output (atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the output path.")
def export(source, fmt, qtype, portable, output, tokenizer_pre, force, quiet):
    """Export a model to GGUF for CPU runtimes, or an adapter to a runtime-independent PEFT form.

    \b
    SOURCE: for gguf a full-precision Llama-architecture HF folder (e.g. `lorakit merge --output-kind model`
    output), a registry reference (release-merged@3) or `default`; for peft a PEFT LoRA adapter folder or reference.

    \b
    Examples:
      lorakit export merged --format gguf --type q8_0 -o release.q8_0.gguf    # llama.cpp / Ollama / LM Studio
      lorakit export default --format gguf --type q4_0 -o smollm2.q4_0.gguf
      lorakit export adapters/support --format peft --portable -o support-portable

    \b
    GGUF: llama.cpp tensor names and metadata (tokenizer with merges and special ids, chat template, rope,
    norm eps, context length; a tied embedding is stored once), read back by transformers' GGUF loader and
    `lorakit eval`/`gate`. How the file was made (source weights digest, type, lorakit version) is stored in
    its metadata under lorakit.* keys. Quantized (GPTQ/AWQ) sources and non-Llama architectures are refused.
    Portable PEFT: scaling folded into B, ranks padded to one r, lora_alpha = r, use_rslora false;
    lorakit_export.json inside says what was folded. Nothing is written unless the export completes.
    """
    from lorakit.errors import InputError
    from lorakit.runtime import configure_threads, quiet_third_party_logs

    configure_threads()
    quiet_third_party_logs()
    if fmt == "peft":
        if not portable:
            raise InputError("--format peft needs --portable (an adapter is already PEFT; --portable is the conversion)")
        from lorakit.export import export_portable_adapter

        result = export_portable_adapter(source, output, force=force)
        m = result.metadata
        summary = (f"portable adapter {result.output}: r = lora_alpha = {m['rank']}, use_rslora false; folded scalings "
                   f"{m['folded_scaling']['min']:g}..{m['folded_scaling']['max']:g}, {m['padded_modules']} module(s) "
                   "zero-padded")
    else:
        if portable:
            raise InputError("--portable applies to --format peft; a GGUF model has no adapter scaling to fold")
        from lorakit.export import export_gguf

        result = export_gguf(source, output, qtype=qtype, force=force, progress=not quiet, tokenizer_pre=tokenizer_pre)
        m = result.metadata
        types = ", ".join(f"{n} {k}" for k, n in sorted(m["tensor_types"].items()))
        summary = (f"wrote {result.output} ({qtype}, {m['size_bytes'] / (1 << 20):.1f} MiB; tensors: {types}) from "
                   f"{m['source_path']} in {m['wall_time_s']:.1f}s")
    click.echo(str(result.output) if quiet else summary)


COMMANDS = [export]
