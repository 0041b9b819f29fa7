"""What a registered folder says about itself: lorakit's stage JSONs and gate verdicts.

Every lorakit stage writes a JSON beside its output saying how it was made. The registry copies whichever of
them it finds into the version's metadata verbatim, so ``lorakit registry show`` answers "how was this made"
without the folder. It depends on no field inside them except a gate verdict's ``passed``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorakit.errors import InputError

STAGE_FILES = ("prep.json", "lorakit_train.json", "lorakit_merge.json", "lorakit_quant.json", "gate.json",
               "lorakit_model.json", "lorakit_export.json", "scorecard.json")
GATE_FILE = "gate.json"
KINDS = ("base", "dataset", "adapter", "merged", "quantized", "verdict", "gguf")

# The file each kind must contain, so that registering the wrong folder fails at once with a clear message.
_KIND_MARKERS = {
    "base": ("config.json", "an HF model folder"),
    "merged": ("config.json", "an HF model folder (merge with --output-kind model) or a PEFT adapter folder"),
    "quantized": ("config.json", "an HF model folder"),
    "adapter": ("adapter_config.json", "a PEFT adapter folder"),
    "dataset": ("prep.json", "a prepared-data folder (lorakit prep)"),
    "verdict": (GATE_FILE, "a gate output folder (lorakit gate)"),
    "gguf": ("*.gguf", "a folder holding a GGUF file (lorakit export --format gguf)"),
}


def validate_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InputError(f"kind {kind!r} is not one of {', '.join(KINDS)}; pass --kind with one of them")
    return kind


def check_folder_kind(folder: Path, kind: str) -> None:
    marker, what = _KIND_MARKERS[kind]
    if kind == "merged" and (folder / "adapter_config.json").exists():
        return  # a merge may also output an adapter (output_kind="adapter")
    if "*" in marker:
        if not any(p.is_file() for p in folder.glob(marker)):
            raise InputError(f"{folder} has no {marker} file, so it is not {what}; register the right folder or fix --kind")
        return
    if not (folder / marker).is_file():
        raise InputError(f"{folder} has no {marker}, so it is not {what}; register the right folder or fix --kind")


def read_stage_metadata(folder: Path) -> dict[str, Any]:
    """Every stage JSON found at the top of ``folder``; an unreadable one is noted, not fatal."""
    out: dict[str, Any] = {}
    for name in STAGE_FILES:
        path = folder / name
        if path.is_file():
            try:
                out[name] = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                out[name] = {"unreadable": f"{type(exc).__name__}: {exc}"}
    return out


def verdict_from_gate(gate: Any, where: str) -> tuple[bool, dict]:
    """``(passed, details)`` from the content of a gate.json (or a dict shaped like one)."""
    if not isinstance(gate, Mapping) or not isinstance(gate.get("passed"), bool):
        raise InputError(f"{where} has no boolean 'passed' field, so it is not a gate verdict; pass the gate output folder")
    details = {k: v for k, v in gate.items() if k in ("passed", "degradation", "max_degradation", "baseline", "candidate")}
    return bool(gate["passed"]), details


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics are finite numbers keyed by short names (ppl, degradation, size_mb, seconds ...)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str) or not key or len(key) > 64:
            raise InputError(f"metric name {key!r} is not allowed; use a short name such as ppl or degradation")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise InputError(f"metric {key}={value!r} is not a finite number; metrics are numbers (e.g. ppl=14.8)")
        out[key] = float(value)
    return out


def to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj if obj is not None else {}, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} is not JSON-serialisable ({exc}); pass plain numbers, strings, lists and dicts") from None
