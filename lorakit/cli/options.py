"""Options that several sub-commands share, declared once so their meaning and help cannot drift apart."""

from __future__ import annotations

import click

from lorakit.compute import DTYPE_CHOICES

# Every stage resolves it with lorakit.runtime.resolve_device.
device_option = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA when present), cpu or cuda[:N].")

# What `auto` means per stage (lorakit.compute.POLICY), in the words --help shows.
_AUTO_MEANS = {
    "fastest": "bfloat16 where it is fast here (CUDA with bf16; a CPU whose bf16 matmul a short, cached probe "
               "finds faster than float32), else float32",
    "float32": "float32, so results compare across machines",
}


def compute_dtype_option(stage: str | None):
    """``--compute-dtype`` for ``stage``; every stage resolves it with lorakit.compute.resolve_compute_dtype.
    ``stage=None``: the whole pipeline (``lorakit run``), where it overrides the run config's key."""
    from lorakit.compute import EXACT_STAGES, POLICY

    if stage is None:
        return click.option("--compute-dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                            help="Overrides compute_dtype of the run config. auto: train and quantize in bfloat16 "
                                 "only where it is fast here, gate in float32; the merge always computes in float32.")
    if stage in EXACT_STAGES:  # every choice is accepted here so that the resolver's refusal explains why
        text = f"auto = float32, the only dtype of the {stage}: it is exact, so reduced precision is refused."
    else:
        text = f"Dtype the model computes in. auto = {_AUTO_MEANS[POLICY[stage]]}."
    return click.option("--compute-dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                        help=text)
