"""The validation gate: accept a candidate model only if its perplexity degradation stays within thresholds.

Importing the package is light (the verdict's data model and the checks' defaults, which the CLI and the run
config read); the measuring code, which needs torch, loads on first use of ``check``, ``judge`` or
``degradation_of``.
"""

from typing import Any

from lorakit.gate.general import (
    DEFAULT_GENERAL_MAX_DEGRADATION, DEFAULT_GENERAL_MAX_TOKENS, GENERAL_CHECK_NAME, general_check,
    resolve_general_text,
)
from lorakit.gate.verdict import (
    DEFAULT_MAX_DEGRADATION, GATE_JSON, GATE_MD, GATE_PNG, CheckResult, CheckSpec, Verdict, read_verdict,
)

_CORE = ("check", "degradation_of", "judge")

__all__ = [
    *_CORE, "DEFAULT_GENERAL_MAX_DEGRADATION", "DEFAULT_GENERAL_MAX_TOKENS", "DEFAULT_MAX_DEGRADATION", "GATE_JSON",
    "GATE_MD", "GATE_PNG", "GENERAL_CHECK_NAME", "CheckResult", "CheckSpec", "Verdict", "general_check",
    "read_verdict", "resolve_general_text",
]


def __getattr__(name: str) -> Any:
    if name in _CORE:
        from lorakit.gate import core

        return getattr(core, name)
    raise AttributeError(f"module 'lorakit.gate' has no attribute {name!r}")
