"""The gate's verdict as data: what each check measured and the decision, serialised 1:1 to ``gate.json``.

Kept apart from the measuring code (core.py) so that readers and renderers (report.py, the registry) depend on
the data model only, and nothing imports in a circle.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import InputError
from lorakit.gate.options import GATE
from lorakit.io.atomic import read_json

GATE_JSON = "gate.json"
GATE_MD = "gate.md"
GATE_PNG = "gate.png"
DEFAULT_MAX_DEGRADATION = GATE.max_degradation  # declared in lorakit.gate.options (why the KL bar: there)
DEFAULT_MAX_KL = GATE.max_kl
CHECK_KINDS = ("primary", "task", "general")
# A candidate exactly at a threshold computes as e.g. 0.05000000000000004; differences below this count as the
# boundary (far below any perplexity's precision), so the boundary passes.
BOUNDARY_TOLERANCE = 1e-12


@dataclass
class CheckSpec:
    """One data set the gate measures, with its own threshold."""

    name: str
    data: str | os.PathLike[str] | list[str]
    max_degradation: float = DEFAULT_MAX_DEGRADATION
    kind: str = "task"  # "primary" | "task" | "general"
    split: str = "val"
    max_tokens: int | None = None  # this check's own token cap; None = the gate's max_tokens


@dataclass
class CheckResult:
    name: str
    kind: str
    data: str
    max_degradation: float
    baseline_ppl: float
    candidate_ppl: float
    degradation: float
    passed: bool
    tokens: int
    method: dict[str, Any]
    baseline: dict[str, Any]  # PerplexityResult.to_dict()
    candidate: dict[str, Any]
    distribution: dict[str, Any] = field(default_factory=dict)  # DistributionStats.to_dict(); {} in old gate.json
    max_kl: float | None = None  # threshold on distribution["kl_mean"]; None = reported, not judged
    measured_in: str | None = None  # "scorecard": this pass was the scorecard's (same models, tokens, method)


@dataclass
class Verdict:
    """The gate's decision: ``passed`` only when every check passed. Serialises 1:1 to ``gate.json``."""

    passed: bool
    degradation: float  # of the primary check
    max_degradation: float
    checks: list[CheckResult]
    baseline: dict[str, Any]
    candidate: dict[str, Any]
    params: dict[str, Any]
    versions: dict[str, str]
    wall_s: float
    output: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # The release scorecard's checks (lorakit.scorecard.judge: ScorecardCheck dicts) and the scorecard they judged;
    # empty / None when the gate ran without --scorecard (and in gate.json written before they existed).
    scorecard_checks: list[dict[str, Any]] = field(default_factory=list)
    scorecard: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("output")
        out.pop("metadata")
        out["failed_checks"] = [c.name for c in self.checks if not c.passed] + [
            f"{c['check']}:{c['task']}" for c in self.scorecard_checks if not c["passed"]]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], output: Path | None = None) -> Verdict:
        data = dict(data)
        data.pop("failed_checks", None)
        checks = [CheckResult(**c) for c in data.pop("checks")]
        verdict = cls(checks=checks, output=output, **data)
        verdict.metadata = verdict.to_dict()
        return verdict


def read_verdict(folder: str | os.PathLike[str]) -> Verdict:
    """The verdict stored in a gate output folder (``gate.json``)."""
    folder = Path(folder)
    data = read_json(folder / GATE_JSON, "gate verdict")
    try:
        return Verdict.from_dict(data, output=folder)
    except (TypeError, KeyError) as exc:
        raise InputError(f"{folder / GATE_JSON} is not a lorakit gate verdict ({exc})") from None
