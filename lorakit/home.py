"""Where lorakit keeps its caches: ``$LORAKIT_HOME`` (default ``~/.cache/lorakit``)."""

from __future__ import annotations

import os
from pathlib import Path


def lorakit_home() -> Path:
    """The cache root; created on first use so callers can write into it straight away."""
    home = Path(os.environ.get("LORAKIT_HOME") or Path.home() / ".cache" / "lorakit").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
