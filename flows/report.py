"""The run report: a Markdown summary and a table, published as Prefect artifacts of the release flow run.

Everything in it comes from the stages' own metadata (the ``lorakit_*.json`` beside each output), so the report
says the same thing as the files. The gate's bar chart is embedded (a data URI, readable in the Prefect UI
without file access) and linked by path.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from flows.config import ReleaseConfig
from lorakit.scorecard.report import summary_line

ARTIFACT_KEY = "release-report"


def _seconds(meta: dict[str, Any]) -> float | None:
    for key in ("wall_time_s", "wall_s", "seconds"):
        if isinstance(meta.get(key), (int, float)):
            return float(meta[key])
    timings = meta.get("timings")
    if isinstance(timings, dict):
        for key in ("total_s", "wall_time_s", "total"):
            if isinstance(timings.get(key), (int, float)):
                return float(timings[key])
    return None


def _fmt(x: Any, spec: str = ".4g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else ("-" if x is None else str(x))


def _merge_result(meta: dict[str, Any]) -> str:
    """Exactness, and with a weight search what it chose and the worst task's retention it measured."""
    out = "exact" if meta.get("exact") else "approximate"
    search = meta.get("search")
    if search:
        worst = search["report"]["val"]["chosen"]
        of = " of exact match" if search.get("metric") == "exact_match" else ""
        out += (f"; searched weights {','.join(f'{w:g}' for w in meta['weights'])} (worst-task retention{of} val "
                f"{worst:.3f})")
    return out


def stage_rows(cfg: ReleaseConfig, preps: dict, adapters: dict, merged: dict, quantized: dict, verdict: dict,
               refs: dict[str, str], gguf: dict | None = None, gguf_verdict: dict | None = None,
               scorecard: dict | None = None) -> list[dict[str, Any]]:
    """One row per stage output: stage, item, seconds, key number, output folder, registry ref."""
    rows = []
    for ds in cfg.datasets:
        rows.append({"stage": "prep", "item": ds.name, "seconds": _seconds(preps[ds.name]["metadata"]),
                     "result": "", "path": preps[ds.name]["path"], "ref": refs.get(f"prep:{ds.name}", "")})
        meta = adapters[ds.name]["metadata"]
        loss = meta.get("final_loss", meta.get("loss"))
        rows.append({"stage": "train", "item": ds.name, "seconds": _seconds(meta),
                     "result": f"final loss {_fmt(loss)}", "path": adapters[ds.name]["path"],
                     "ref": refs.get(f"adapter:{ds.name}", "")})
    rows.append({"stage": "merge", "item": merged["metadata"].get("method", cfg.merge.method),
                 "seconds": _seconds(merged["metadata"]), "result": _merge_result(merged["metadata"]),
                 "path": merged["path"], "ref": refs.get("merged", "")})
    rows.append({"stage": "quantize", "item": quantize_label(used_quantize_settings(quantized["path"])),
                 "seconds": _seconds(quantized["metadata"]), "result": "", "path": quantized["path"],
                 "ref": refs.get("quantized", "")})
    if scorecard is not None:
        rows.append({"stage": "scorecard", "item": f"{len(cfg.datasets)} task(s) x 4 models",
                     "seconds": _seconds(scorecard["metadata"]), "result": summary_line(scorecard["metadata"]),
                     "path": scorecard["path"], "ref": ""})
    v = verdict["metadata"]
    rows.append({"stage": "gate", "item": f"max {cfg.gate.max_degradation:.1%}", "seconds": _seconds(v),
                 "result": f"{'PASS' if v['passed'] else 'REJECT'} degradation {v['degradation']:+.2%}",
                 "path": verdict["path"], "ref": refs.get("verdict", "")})
    if gguf is not None and gguf_verdict is not None:
        g = gguf_verdict["metadata"]
        rows.append({"stage": "export", "item": f"gguf {cfg.export.gguf}", "seconds": _seconds(gguf["metadata"]),
                     "result": f"{gguf['metadata']['size_bytes'] / 1e6:.1f} MB", "path": gguf["path"],
                     "ref": refs.get("gguf", "")})
        rows.append({"stage": "gate", "item": f"gguf, max {cfg.gate.max_degradation:.1%}", "seconds": _seconds(g),
                     "result": f"{'PASS' if g['passed'] else 'REJECT'} degradation {g['degradation']:+.2%}",
                     "path": gguf_verdict["path"], "ref": refs.get("gguf-verdict", "")})
    return rows


def used_quantize_settings(folder: str) -> dict[str, Any]:
    """What the quantize stage used, read from its ``lorakit_quant.json`` (not the configuration it was asked for)."""
    from lorakit.quantize.metadata import read_quant_meta

    return read_quant_meta(folder).used_settings()


def quantize_label(used: dict[str, Any]) -> str:
    """``gptq 4-bit g128 sym`` plus what differs from the request: a lowered group size, kept modules, a search,
    and whether scale tuning's result was kept (a tuning that raised the held-out KL leaves the rounded scales)."""
    label = f"{used['method']} {used['bits']}-bit g{used['group_size']} {'sym' if used['sym'] else 'asym'}"
    if "group_size_requested" in used:
        label += f" (g{used['group_size_requested']} requested)"
    if used.get("desc_act"):
        label += " act-order"
    if used.get("gptaq_alpha"):
        label += f" GPTAQ {used['gptaq_alpha']:g}"
    if used.get("module_bits"):
        label += f" +{len(used['module_bits'])} modules kept"
    label += f", {used['n_samples']}x{used['seq_len']} calibration"
    if used.get("tune_steps"):
        on = " on answers" if used.get("tune_tokens") == "answers" else ""
        if used.get("tune_answer_weight"):
            on = f" with answers weighed x{used['tune_answer_weight']:g}"
        label += (f", scales tuned{on} ({used['tune_steps']} steps)" if used["tune_kept"]
                  else f", scale tuning{on} not kept ({used['tune_steps']} steps raised the held-out KL)")
    if used.get("search"):
        label += f", search pick (trial {used['search']['chosen_trial']})"
    return label


def verdict_line(verdict_meta: dict[str, Any], max_degradation: float) -> str:
    """One line: the deciding check (the worst failed one, else the worst passing one) and its numbers; a failed
    scorecard check (retention, accuracy drop) is named with its task."""
    from lorakit.gate.verdict import BOUNDARY_TOLERANCE
    from lorakit.scorecard.judge import ScorecardCheck, failure_line

    checks = verdict_meta["checks"]
    failed = [c for c in checks if not c["passed"]]
    card_failure = failure_line([ScorecardCheck(**c) for c in verdict_meta.get("scorecard_checks") or []])
    worst = max(failed or checks, key=lambda c: c["degradation"])
    word, cmp = ("passed", "<=") if verdict_meta["passed"] else ("rejected", ">")
    if card_failure and not failed:
        cmp = "<="  # perplexity passed; the scorecard rejected
    kl, max_kl = (worst.get("distribution") or {}).get("kl_mean"), worst.get("max_kl")
    kl_failed = (not worst["passed"] and worst["degradation"] <= worst["max_degradation"] + BOUNDARY_TOLERANCE
                 and kl is not None and max_kl is not None)
    if kl_failed:  # perplexity within its threshold: the distribution check decided
        line = (f"gate {word}: mean KL {kl:.4f} > {max_kl:.4f} on {worst['name']} (perplexity "
                f"{worst['degradation']:+.2%}, within {worst['max_degradation']:.2%})")
    else:
        line = (f"gate {word}: degradation {worst['degradation']:+.2%} {cmp} {worst['max_degradation']:.2%} on "
                f"{worst['name']} (perplexity {worst['baseline_ppl']:.4g} -> {worst['candidate_ppl']:.4g})")
    if len(checks) > 1:
        line += f"; {len(checks) - len(failed)}/{len(checks)} checks passed"
    if card_failure:
        line = f"gate rejected: {card_failure}; " + line.split(": ", 1)[1]
    elif verdict_meta.get("scorecard_checks"):
        line += f"; scorecard: {len(verdict_meta['scorecard_checks'])} checks passed"
    return line


def _png(folder: str, name: str = "gate.png", title: str = "gate chart") -> str:
    png = Path(folder) / name
    if not png.exists():
        return ""
    data = base64.b64encode(png.read_bytes()).decode()
    return f"\n![{title}](data:image/png;base64,{data})\n\nChart file: `{png}`\n"


def markdown(cfg: ReleaseConfig, rows: list[dict[str, Any]], verdict: dict, aliases: list[str],
             wall_s: float, scorecard: dict | None = None) -> str:
    v = verdict["metadata"]
    lines = [
        f"# Release `{cfg.registry.name}`: {'PASSED' if v['passed'] else 'REJECTED'}",
        "",
        f"**{verdict_line(v, cfg.gate.max_degradation)}**",
        "",
        f"Base `{cfg.base}`; {len(cfg.datasets)} task(s); merge "
        f"{'weights searched on val' if cfg.merge_search() else cfg.merge.method + ' weights ' + ', '.join(f'{w:g}' for w in cfg.merge_weights())}; GPU stages "
        f"{'on pool `' + cfg.pools.cuda + '`' if cfg.route_gpu else 'in-process'}; run wall time {wall_s:.1f} s.",
        "",
        "| stage | item | seconds | result | registry | output |",
        "|---|---|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['item']} | {_fmt(r['seconds'], '.1f')} | {r['result']} | "
                     f"`{r['ref']}` | `{r['path']}` |")
    lines += ["", f"Aliases moved: {', '.join(aliases) if aliases else 'none (rejected release)'}.",
              "Production stays a human decision unless `auto_promote: true`.", _png(verdict["path"])]
    if scorecard is not None:
        from lorakit.scorecard.report import render_markdown

        lines += [render_markdown(scorecard["metadata"], heading="## Scorecard"),
                  _png(scorecard["path"], "scorecard.png", "scorecard chart")]
    return "\n".join(lines)


def publish(cfg: ReleaseConfig, rows: list[dict[str, Any]], verdict: dict, aliases: list[str], wall_s: float,
            scorecard: dict | None = None) -> str:
    """Create the Markdown and table artifacts on the current flow run; returns the Markdown."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    text = markdown(cfg, rows, verdict, aliases, wall_s, scorecard)
    create_markdown_artifact(text, key=ARTIFACT_KEY, description=verdict_line(verdict["metadata"], cfg.gate.max_degradation))
    create_table_artifact([{k: ("" if val is None else val) for k, val in r.items()} for r in rows],
                          key=f"{ARTIFACT_KEY}-stages", description="Release stages")
    if scorecard is not None:
        from lorakit.scorecard.report import rows as scorecard_rows

        create_table_artifact(scorecard_rows(scorecard["metadata"]), key=f"{ARTIFACT_KEY}-scorecard",
                              description="Release scorecard: every task, every model (the gate judges val)")
    return text
