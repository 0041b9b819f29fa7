"""The registry names a release run creates, a pure function of its config (Prefect-free).

:mod:`flows.lineage` registers under these names; :mod:`flows.preflight` validates every one of them before a
stage runs, because a ``registry.name`` that is itself valid can make a suffixed name (``<name>-adapter-<task>``)
that the registry refuses, which would otherwise surface only at registration, after the whole run.
"""

from __future__ import annotations

import re
from pathlib import Path

from flows.config import ReleaseConfig


def base_name(base_dir: str) -> str:
    """``base-<folder name>``: one registry name per base model, shared by every release built on it."""
    return "base-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(base_dir).name).strip("-.")[:59]


def artifact_names(cfg: ReleaseConfig, base_dir: str) -> dict[str, str]:
    """Registry names: the release itself is ``<name>``; its ingredients carry a suffix. The GGUF export's two
    names only when ``export.gguf`` is on (``lorakit run --check`` lists what the run will register)."""
    n = cfg.registry.name
    names = {"base": base_name(base_dir), "merged": f"{n}-merged", "quantized": n, "verdict": f"{n}-gate"}
    if cfg.export.gguf:
        names.update({"gguf": f"{n}-gguf", "gguf-verdict": f"{n}-gguf-gate"})
    for ds in cfg.datasets:
        names[f"prep:{ds.name}"] = f"{n}-data-{ds.name}"
        names[f"adapter:{ds.name}"] = f"{n}-adapter-{ds.name}"
    return names


def release_tag(cfg: ReleaseConfig) -> str:
    """The tag every artifact of the run carries."""
    return f"release:{cfg.registry.name}"
