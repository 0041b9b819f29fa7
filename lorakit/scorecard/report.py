"""Human-readable forms of a scorecard: a plain table (CLI, ``lorakit registry show``), Markdown (gate.md, the
Prefect report) and a PNG (per task, grouped bars base / adapter / merged / quantized: exact match, and
perplexity relative to the base). They read only the scorecard.json content, so any stored scorecard renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.evaluate.flips import describe_flips
from lorakit.scorecard.judge import JUDGED_SPLIT, split_names, task_names

MODELS = ("base", "adapter", "merged", "quantized")


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.1%}"


def _ret(r: dict | None) -> str:
    if r is None:
        return "-"
    return "not learned" if r["value"] is None else f"{r['value']:.0%}"


def rows(card: dict[str, Any]) -> list[dict[str, str]]:
    """One row per task and split: exact match and perplexity of each model, retention, quantized drop."""
    out = []
    for task in task_names(card):
        entry = card["tasks"][task]
        for split in split_names(entry):
            s = entry["splits"][split]
            models = s["models"]
            row = {"task": task, "split": split + (" (no test)" if s.get("note") else "")}
            skipped = s["accuracy_skipped"] is not None
            for m in MODELS:
                row[f"{m} EM"] = "skip" if skipped else (_pct(models[m]["exact_match"]) if m in models else "-")
            for m in MODELS:
                row[f"{m} ppl"] = f"{models[m]['ppl']:.4g}" if m in models else "-"
            row["retention EM"] = "skip" if skipped else _ret(s["retention"]["exact_match"])
            row["retention NLL"] = _ret(s["retention"]["nll"])
            drop = s.get("accuracy_drop")
            row["quant. drop"] = "-" if drop is None else f"{drop * 100:+.1f} pt"
            out.append(row)
    return out


def summary_line(card: dict[str, Any]) -> str:
    """``merged EM reverse-words 85% (test), number-words 90% (test)``: the merged model's exact match per task."""
    parts = []
    for task in task_names(card):
        entry = card["tasks"][task]
        em = entry["splits"][entry["report_split"]]["models"]["merged"]["exact_match"]
        parts.append(f"{task} {'skip' if em is None else f'{em:.0%}'} ({entry['report_split']})")
    return "merged EM " + ", ".join(parts)


def general_line(card: dict[str, Any]) -> str | None:
    """``general text (8192 tokens): base 26.1, adapter:x 31.0 (+18.8%), merged 43.4 (+66%), quantized ... (+14.5%
    vs merged)``: what each model keeps of its language; None for a scorecard without general text."""
    g = card.get("general_text")
    if not g or not g.get("models"):
        return None
    models = g["models"]
    tokens = next(iter(models.values()))["tokens"]
    parts = []
    for key, m in models.items():
        ref = g["vs_base"].get(key)
        if key == "quantized" and g.get("quantized_vs_merged") is not None:
            parts.append(f"{key} {m['ppl']:.4g} ({g['quantized_vs_merged']:+.1%} vs merged)")
        else:
            parts.append(f"{key} {m['ppl']:.4g}" + ("" if ref is None else f" ({ref:+.1%})"))
    return f"general text perplexity ({tokens} tokens; change vs base): " + ", ".join(parts)


def render_text(card: dict[str, Any]) -> str:
    """The scorecard as an aligned plain-text table."""
    table = rows(card)
    if not table:
        return "(empty scorecard)"
    cols = list(table[0])
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in table]
    notes = [f"note: {e['report_note']}" for e in card["tasks"].values() if e.get("report_note")]
    notes += [f"{t}: {s['accuracy_skipped']}" for t, e in card["tasks"].items() for s in list(e["splits"].values())[:1]
              if s["accuracy_skipped"]]
    general = general_line(card)
    return "\n".join(lines + notes + judged_lines(card) + ([general] if general else []))


def judged_sample(card: dict[str, Any], task: str) -> dict[str, Any]:
    """The gate's larger sample of ``task`` (its val split's ``judged``), or {} when the scorecard has none."""
    return card["tasks"][task]["splits"].get(JUDGED_SPLIT, {}).get("judged") or {}


def judged_lines(card: dict[str, Any]) -> list[str]:
    """The gate's larger sample per task (``judged``: scorecard.judge_examples), where there is one: each model's
    exact match, retention and the quantized drop with the answers it lost and gained."""
    out = []
    for task in task_names(card):
        j = judged_sample(card, task)
        if j:
            ems = ", ".join(f"{r} {j[r]:.1%}" for r in MODELS if r in j)
            ret = (j.get("retention") or {}).get("value")
            tail = "" if ret is None else f", retention {ret:.3f}"
            tail += f", drop {100 * j['accuracy_drop']:+.1f} points" if "accuracy_drop" in j else ""
            changed = j.get("answers_changed")
            tail += f": {describe_flips(changed)}" if changed else ""
            out.append(f"{task}, the gate's sample (val, {j['n_examples']} questions): EM {ems}{tail}")
    return out


def _inline(text: str, width: int = 80) -> str:
    """An answer as one Markdown code span: whitespace (newlines of chat answers) collapsed, backticks replaced,
    cut at ``width`` characters."""
    one = " ".join(str(text).split()).replace("`", "'")
    return f"`{one if len(one) <= width else one[:width - 1] + '…'}`"


def lost_answer_lines(card: dict[str, Any], limit: int = 5) -> list[str]:
    """Markdown lines naming the first ``limit`` answers the quantized model lost on the gate's sample, per task
    (``answers_lost``; none for a scorecard without answers): a drop the gate judges can be read, not only
    counted."""
    out = []
    for task in task_names(card):
        j = judged_sample(card, task)
        lost = j.get("answers_lost") or []
        if not lost:
            continue
        total = (j.get("answers_changed") or {}).get("lost", len(lost))
        out.append(f"- {task}: answers the quantized model lost ({JUDGED_SPLIT}, first {min(limit, len(lost))} of "
                   f"{total}; predictions.json has every answer):")
        out += [f"  - example {a['index']}: reference {_inline(a['reference'])}, quantized {_inline(a['quantized'])}"
                for a in lost[:limit]]
    return out


def render_markdown(card: dict[str, Any], heading: str = "# Release scorecard") -> str:
    table = rows(card)
    cols = list(table[0]) if table else []
    d = card.get("decoding") or {}
    m = card["perplexity_method"]
    lines = [heading, "",
             "Exact match (EM) of greedy answers and perplexity of each task's examples; retention = share of the "
             "adapter's gain over the base that the merged model keeps (on EM and on NLL); quantized drop = merged "
             "EM − quantized EM. The gate judges the val split; test is reported only.", "",
             f"- decoding: {d.get('strategy', 'greedy')}, max new tokens = reference + {d.get('margin', '-')}, "
             f"dtype {d.get('dtype', m['dtype'])}; perplexity: {m['name']}, seq_len {m['seq_len']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in table]
    notes = [e["report_note"] for e in card["tasks"].values() if e.get("report_note")]
    notes += [f"{t}: {s['accuracy_skipped']}" for t, e in card["tasks"].items() for s in list(e["splits"].values())[:1]
              if s["accuracy_skipped"]]
    lines += [""] + [f"- note: {n}" for n in notes]
    lines += [f"- {line}" for line in judged_lines(card)]
    lines += lost_answer_lines(card)
    general = general_line(card)
    if general:
        lines += [f"- {general}"]
    return "\n".join(lines) + "\n"


def render_png(card: dict[str, Any], path: Path) -> bool:
    """Per task (report split): EM bars, and perplexity / base perplexity bars. False when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:  # an optional extra: the JSON and Markdown carry every number anyway
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = task_names(card)
    colors = {"base": "#8C8C8C", "adapter": "#4C72B0", "merged": "#55A868", "quantized": "#DD8452"}
    fig, axes = plt.subplots(2, len(tasks), figsize=(max(4.0, 3.2 * len(tasks)), 5.6), dpi=100, squeeze=False)
    try:
        for j, task in enumerate(tasks):
            entry = card["tasks"][task]
            split = entry["report_split"]
            s = entry["splits"][split]
            models = [m for m in MODELS if m in s["models"]]
            em_ax, ppl_ax = axes[0][j], axes[1][j]
            if s["accuracy_skipped"] is None:
                em = [s["models"][m]["exact_match"] for m in models]
                em_ax.bar(models, em, color=[colors[m] for m in models])
                for i, v in enumerate(em):
                    em_ax.annotate(f"{v:.0%}", (i, v), ha="center", va="bottom", fontsize=8)
                em_ax.set_ylim(0, 1.15)
            else:
                em_ax.text(0.5, 0.5, "no answers (text data)", ha="center", va="center", transform=em_ax.transAxes)
            em_ax.set_title(f"{task} ({split})", fontsize=9)
            base_ppl = s["models"]["base"]["ppl"]
            ratio = [s["models"][m]["ppl"] / base_ppl for m in models]
            ppl_ax.bar(models, ratio, color=[colors[m] for m in models])
            ppl_ax.axhline(1.0, color="black", lw=0.6)
            for i, v in enumerate(ratio):
                ppl_ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
            ppl_ax.set_ylim(0, max(ratio) * 1.2)
            for ax in (em_ax, ppl_ax):
                ax.tick_params(axis="x", labelsize=8)
        axes[0][0].set_ylabel("exact match")
        axes[1][0].set_ylabel("perplexity / base")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return True
