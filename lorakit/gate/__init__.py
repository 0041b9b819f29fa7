"""The validation gate: accept a candidate model only if its perplexity degradation stays within thresholds."""

from lorakit.gate.core import (
    DEFAULT_MAX_DEGRADATION, GATE_JSON, GATE_MD, GATE_PNG, CheckResult, CheckSpec, Verdict, check, degradation_of,
    judge, read_verdict,
)

__all__ = [
    "DEFAULT_MAX_DEGRADATION", "GATE_JSON", "GATE_MD", "GATE_PNG", "CheckResult", "CheckSpec", "Verdict", "check",
    "degradation_of", "judge", "read_verdict",
]
