"""Options that several sub-commands share, declared once so their meaning and help cannot drift apart."""

from __future__ import annotations

import click

# Every stage resolves it with lorakit.runtime.resolve_device.
device_option = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA when present), cpu or cuda[:N].")
