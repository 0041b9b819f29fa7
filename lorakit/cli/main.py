"""Entry point of the ``lorakit`` command: the group, error handling and exit codes.

Exit codes: 0 success, 2 bad input (nothing written), 3 a release rejected by the gate, 1 an unexpected crash.
"""

from __future__ import annotations

import sys

import click

from lorakit import __version__
from lorakit.errors import LorakitError


class LorakitGroup(click.Group):
    """Turns :class:`LorakitError` into one ``error:`` line and its exit code instead of a traceback, and keeps
    every command from staying silent on long work (:func:`lorakit.progress.activity`)."""

    def invoke(self, ctx: click.Context):
        from lorakit.progress import activity

        try:
            # any long step a command does not report itself still gets a "still working" line (heartbeat)
            words = getattr(ctx, "_protected_args", None) or ctx.args[:1]  # the subcommand's name, once parsed
            with activity(" ".join(["lorakit", *words[:1]])):
                return super().invoke(ctx)
        except LorakitError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=LorakitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lorakit")
@click.option("-v", "--verbose", is_flag=True,
              help="Also show third-party banners, INFO logs and progress bars (GPTQModel, Prefect, transformers, "
                   "bitsandbytes, torchao); without it only lorakit's own progress lines and warnings appear.")
def main(verbose: bool) -> None:
    """lorakit turns a base LLM plus task data into a quantized release model you can trust.

    \b
    The release chain:  prep -> train (QLoRA, one adapter per task) -> merge -> quantize -> scorecard -> gate
                        -> registry
    Every command writes a folder in a standard format (PEFT adapters, HF safetensors models) with a
    lorakit_*.json beside the files that says how it was made, from which inputs (by digest).

    \b
    Exit codes: 0 ok, 2 bad input (nothing was written), 3 rejected by the gate, 1 unexpected error.
    Environment: LORAKIT_HOME (cache, default ~/.cache/lorakit), LORAKIT_THREADS (torch threads),
    LORAKIT_HEARTBEAT_S (longest silence on long work, default 15 s), LORAKIT_KERNEL_BACKEND (GPTQ/AWQ kernels
    for --quant-path kernel: auto, torch or triton; docs/evaluate-and-gate.md).

    \b
    Progress goes to stderr: bars on a terminal, else `[mm:ss] ...` lines at least every LORAKIT_HEARTBEAT_S.
    """
    from lorakit.runtime import set_verbose

    set_verbose(verbose)


def register_commands() -> None:
    """Add every ``lorakit/cli/*_cmd.py`` module's ``COMMANDS``; heavy imports stay inside the commands."""
    import importlib
    import pkgutil

    import lorakit.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.endswith("_cmd"):
            module = importlib.import_module(f"lorakit.cli.{info.name}")
            for command in getattr(module, "COMMANDS", ()):
                main.add_command(command)


register_commands()
