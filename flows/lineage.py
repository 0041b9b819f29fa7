"""Registering a release's artifacts with their lineage, and moving its aliases.

Lineage follows the chain: prepared data -> adapter -> merged model -> quantized model -> gate verdict, each edge
carrying the parameters of the step that made it. Every artifact is registered whether the gate passed or not,
so a rejected candidate stays inspectable, marked with its failed verdict (and therefore not promotable).
"""

from __future__ import annotations

from typing import Any

from flows.config import ReleaseConfig
from tasks.stages import register, set_alias


def artifact_names(cfg: ReleaseConfig) -> dict[str, str]:
    """Registry names: the release itself is ``<name>``; its ingredients carry a suffix."""
    n = cfg.registry.name
    names = {"merged": f"{n}-merged", "quantized": n, "verdict": f"{n}-gate"}
    for ds in cfg.datasets:
        names[f"prep:{ds.name}"] = f"{n}-data-{ds.name}"
        names[f"adapter:{ds.name}"] = f"{n}-adapter-{ds.name}"
    return names


def _params(meta: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: meta[k] for k in keys if k in meta}


def register_release(cfg: ReleaseConfig, preps: dict[str, dict], adapters: dict[str, dict], merged: dict,
                     quantized: dict, verdict: dict) -> dict[str, str]:
    """Register every artifact of one run, parents first; returns ``{role: "name@version"}``."""
    names = artifact_names(cfg)
    root = cfg.registry.root
    v = verdict["metadata"]
    status = "gate:passed" if v["passed"] else "gate:failed"
    gate_metrics = {"passed": v["passed"], "degradation": v["degradation"],
                    "baseline_ppl": v.get("baseline_ppl"), "candidate_ppl": v.get("candidate_ppl"),
                    "max_degradation": cfg.gate.max_degradation}
    refs: dict[str, str] = {}

    def reg(role: str, out: dict, kind: str, parents: list[str], metrics: dict | None = None,
            params: dict | None = None, tags: tuple[str, ...] = ()) -> str:
        refs[role] = register(out["path"], root, names[role], kind, metrics or {}, params or {}, parents,
                              [f"release:{cfg.registry.name}", *tags])["ref"]
        return refs[role]

    for ds in cfg.datasets:
        data_ref = reg(f"prep:{ds.name}", preps[ds.name], "dataset", [], params=ds.model_dump())
        reg(f"adapter:{ds.name}", adapters[ds.name], "adapter", [data_ref], params=cfg.lora.model_dump())
    merged_ref = reg("merged", merged, "merged", [refs[f"adapter:{ds.name}"] for ds in cfg.datasets],
                     params={**cfg.merge.model_dump(), "weights": cfg.merge_weights()})
    quant_ref = reg("quantized", quantized, "quantized", [merged_ref], metrics=gate_metrics,
                    params=cfg.quantize.model_dump(), tags=(status,))
    reg("verdict", verdict, "verdict", [quant_ref, merged_ref], metrics=gate_metrics,
        params=cfg.gate.model_dump(), tags=(status,))
    return refs


def move_aliases(cfg: ReleaseConfig, release_ref: str) -> list[str]:
    """``candidate`` after every passed gate; ``production`` only when the config says so (else a human does)."""
    aliases = ["candidate"] + (["production"] if cfg.auto_promote else [])
    return [set_alias(cfg.registry.root, release_ref, alias) for alias in aliases]
