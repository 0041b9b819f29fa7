"""Registering a release's artifacts with their lineage, and moving its aliases.

Lineage follows the chain: base model -> prepared data (its tokenizer) -> adapter -> merged model -> quantized
model <- gate verdict (and merged model -> GGUF <- its own verdict, when exported), each edge carrying the parameters of the step that made it. The verdict is registered with
the quantized model as its ``candidate`` parent, which attaches the verdict to it in the registry (the registry
refuses ``production`` to an artifact whose verdict failed). Every artifact is registered whether the gate passed or not,
so a rejected candidate stays inspectable, marked with its failed verdict (and therefore not promotable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.config import ReleaseConfig
from flows.names import artifact_names, release_tag
from tasks.stages import register, set_alias


def gate_metrics(verdict_meta: dict[str, Any]) -> dict[str, float]:
    """The primary check's numbers (registry metrics are plain numbers)."""
    primary = verdict_meta["checks"][0]
    return {"degradation": verdict_meta["degradation"], "max_degradation": verdict_meta["max_degradation"],
            "baseline_ppl": primary["baseline_ppl"], "ppl": primary["candidate_ppl"]}


def merge_params(cfg: ReleaseConfig, merge_meta: dict[str, Any]) -> dict[str, Any]:
    """The merge edge: the configuration, the weights the merge used, and with ``merge.search`` what it chose."""
    # "search" is what ran (None: fixed weights), not the setting ("auto" may or may not search)
    out = {**cfg.merge.model_dump(exclude={"search"}), "weights": merge_meta.get("weights", cfg.merge_weights()),
           "search": None}
    search = merge_meta.get("search")
    if search is not None:
        chosen = search["trials"][search["chosen"]]
        out["search"] = {"chosen": {"method": chosen["method"], **chosen["params"]},
                         "worst_retention": search["report"], "n_trials": search["n_trials"],
                         "stopped": search["stopped"], "met_target": search["met_target"],
                         "objective": search["objective"]}
    return out


def register_release(cfg: ReleaseConfig, preps: dict[str, dict], adapters: dict[str, dict], merged: dict,
                     quantized: dict, verdict: dict, gguf: dict | None = None,
                     gguf_verdict: dict | None = None, scorecard: dict | None = None) -> dict[str, str]:
    """Register every artifact of one run, parents first; returns ``{role: "name@version"}``.

    The quantized model (the release) carries its scorecard in its registry metadata (``scorecard.json``), so
    ``lorakit registry show`` prints it; the verdict carries the copy the gate judged (in its folder).
    """
    from lorakit.models.folder import resolve_model_dir

    base_dir = str(resolve_model_dir(cfg.base).absolute())
    names = artifact_names(cfg, base_dir)
    root = registry_root(cfg)
    status = "gate:passed" if verdict["metadata"]["passed"] else "gate:failed"
    metrics = gate_metrics(verdict["metadata"])
    refs: dict[str, str] = {}

    def reg(role: str, out: dict, kind: str, parents: list, metrics: dict | None = None,
            params: dict | None = None, tags: tuple[str, ...] = (), metadata: dict | None = None) -> str:
        refs[role] = register(out["path"], root, names[role], kind, metrics or {}, params or {}, parents,
                              [release_tag(cfg), *tags], metadata)["ref"]
        return refs[role]

    base_ref = reg("base", {"path": base_dir}, "base", [], params={"base": cfg.base})
    for ds in cfg.datasets:
        data_ref = reg(f"prep:{ds.name}", preps[ds.name], "dataset", [base_ref], params=ds.model_dump(exclude={"lora", "merge_weight"}))
        reg(f"adapter:{ds.name}", adapters[ds.name], "adapter", [data_ref, base_ref], params=cfg.lora_for(ds).model_dump())
    merge = merge_params(cfg, merged["metadata"])
    # each adapter -> merged edge carries that adapter's weight (chosen by the search when it ran)
    chosen = (merge.get("search") or {}).get("chosen")
    edges = [[refs[f"adapter:{ds.name}"], {"weight": w, "method": chosen["method"] if chosen else merge["method"],
                                           "searched": chosen is not None}]
             for ds, w in zip(cfg.datasets, merge["weights"])]
    merged_ref = reg("merged", merged, "merged", edges, params=merge)
    # The settings the stage used (its lorakit_quant.json), with the configuration it was given beside them.
    from lorakit.quantize.metadata import read_quant_meta

    quant_params = {**read_quant_meta(quantized["path"]).used_settings(), "requested": cfg.quantize.model_dump()}
    quant_ref = reg("quantized", quantized, "quantized", [merged_ref], metrics=metrics, params=quant_params,
                    tags=(status,), metadata={"scorecard.json": scorecard["metadata"]} if scorecard else None)
    reg("verdict", verdict, "verdict", [[quant_ref, {"role": "candidate"}], [merged_ref, {"role": "baseline"}]],
        metrics=metrics, params=cfg.gate.model_dump(), tags=(status,))
    if gguf is not None and gguf_verdict is not None:
        g_status = "gate:passed" if gguf_verdict["metadata"]["passed"] else "gate:failed"
        g_metrics = gate_metrics(gguf_verdict["metadata"])
        gguf_ref = reg("gguf", gguf, "gguf", [merged_ref], metrics=g_metrics, params=cfg.export.model_dump(),
                       tags=(g_status,))
        reg("gguf-verdict", gguf_verdict, "verdict",
            [[gguf_ref, {"role": "candidate"}], [merged_ref, {"role": "baseline"}]],
            metrics=g_metrics, params=cfg.gate.model_dump(), tags=(g_status,))
    return refs


def move_aliases(cfg: ReleaseConfig, release_ref: str) -> list[str]:
    """``candidate`` after every passed gate; ``production`` only when the config says so (else a human does)."""
    aliases = ["candidate"] + (["production"] if cfg.auto_promote else [])
    return [set_alias(registry_root(cfg), release_ref, alias) for alias in aliases]


def registry_root(cfg: ReleaseConfig) -> str:
    """The registry folder, always explicit (a task's cache key must say which registry it wrote to)."""
    from registry import Registry, default_root

    root = Path(cfg.registry.root).absolute() if cfg.registry.root else default_root()
    Registry(root)  # creates the registry on first use, so its folder has an identity before anything registers
    return str(root)
