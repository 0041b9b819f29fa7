"""Human-readable forms of a gate verdict: a one-screen text summary, a Markdown report and a PNG bar chart.

The Markdown and PNG become a Prefect artifact and registry metadata, so they are self-contained: they name
the models, the method and every threshold, not just pass/fail.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.gate.verdict import BOUNDARY_TOLERANCE, Verdict


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def _kl(c) -> str:
    """Mean / p99 KL and top-1 agreement of a check, or "-" for a verdict written before they were measured."""
    d = c.distribution
    return f"{d['kl_mean']:.4f} / {d['kl_p99']:.4f}  {d['top1_agreement']:6.1%}" if d else "-"


def _why(c) -> str:
    reasons = []
    if c.degradation > c.max_degradation + BOUNDARY_TOLERANCE:
        reasons.append("perplexity")
    if c.max_kl is not None and c.distribution and c.distribution["kl_mean"] > c.max_kl + BOUNDARY_TOLERANCE:
        reasons.append("KL")
    return f"{c.name} ({', '.join(reasons) or 'failed'})"


def render_text(verdict: Verdict) -> str:
    """The verdict as printed by ``lorakit gate``: one line per check and the decision."""
    m = verdict.checks[0].method
    lines = [
        f"baseline  {verdict.baseline['folder']}  [{verdict.baseline['path_used']}]",
        f"candidate {verdict.candidate['folder']}  [{verdict.candidate['path_used']}]",
        f"method    seq_len {m['seq_len']}, stride {m['stride']}, {m['dtype']}, token-level mean NLL",
        "",
        f"{'check':<16} {'tokens':>8} {'baseline':>10} {'candidate':>10} {'degr.':>9} {'max':>8}  result  "
        f"{'KL mean / p99':>17} {'top-1':>6}",
    ]
    for c in verdict.checks:
        lines.append(f"{c.name:<16} {c.tokens:>8} {c.baseline_ppl:>10.4f} {c.candidate_ppl:>10.4f} "
                     f"{_pct(c.degradation):>9} {_pct(c.max_degradation):>8}  {'pass' if c.passed else 'FAIL':<6}  "
                     f"{_kl(c):>24}")
    max_kl = verdict.checks[0].max_kl
    lines.append(f"KL = KL(p_baseline || p_candidate), nats per token; max mean KL: "
                 f"{'none (reported only)' if max_kl is None else max_kl}")
    if verdict.scorecard is not None:
        from lorakit.scorecard.report import render_text as scorecard_table

        lines += ["", "scorecard (the gate judges val; test is reported only)", scorecard_table(verdict.scorecard)]
        lines += [f"{c['check']:<18} {c['task']:<16} {'pass' if c['passed'] else 'FAIL':<5} {c['message']}"
                  for c in verdict.scorecard_checks]
    lines.append("")
    lines.append("PASSED: candidate accepted" if verdict.passed else f"REJECTED: {rejection(verdict)}")
    return "\n".join(lines)


def rejection(verdict: Verdict) -> str:
    """Why a verdict failed, in one line naming each failing check (and task, for scorecard checks)."""
    from lorakit.scorecard.judge import ScorecardCheck, failure_line

    parts = []
    failed = [_why(c) for c in verdict.checks if not c.passed]
    if failed:
        parts.append(f"{', '.join(failed)} over threshold")
    card_line = failure_line([ScorecardCheck(**c) for c in verdict.scorecard_checks])
    if card_line:
        parts.append(card_line)
    return "; ".join(parts) or "failed"


def render_markdown(verdict: Verdict) -> str:
    m = verdict.checks[0].method
    status = "PASSED" if verdict.passed else "REJECTED"
    lines = [
        f"# Gate verdict: {status}",
        "",
        f"- baseline: `{verdict.baseline['folder']}` ({verdict.baseline['kind']}, {verdict.baseline['path_used']})",
        f"- candidate: `{verdict.candidate['folder']}` ({verdict.candidate['kind']}, {verdict.candidate['path_used']})",
        f"- rule: degradation = ppl(candidate)/ppl(baseline) − 1; a check passes when degradation ≤ its threshold",
        f"- method: {m['name']}; seq_len {m['seq_len']}, stride {m['stride']}, dtype {m['dtype']}; "
        f"documents joined with EOS; tokenizer `{m['tokenizer_digest'][:12]}`",
        "",
        f"- distribution: KL(p_baseline ‖ p_candidate) per token in nats (mean / p99) and top-1 agreement, from "
        f"the same forward passes; max mean KL: {'none (reported only)' if verdict.checks[0].max_kl is None else verdict.checks[0].max_kl}",
        "",
        "| check | kind | tokens | baseline ppl | candidate ppl | degradation | threshold | KL mean / p99 | top-1 | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in verdict.checks:
        d = c.distribution
        kl = f"{d['kl_mean']:.4f} / {d['kl_p99']:.4f} | {d['top1_agreement']:.1%}" if d else "- | -"
        lines.append(f"| {c.name} | {c.kind} | {c.tokens} | {c.baseline_ppl:.4f} | {c.candidate_ppl:.4f} | "
                     f"{_pct(c.degradation)} | {_pct(c.max_degradation)} | {kl} | "
                     f"{'pass' if c.passed else '**FAIL**'} |")
    reused = [c.name for c in verdict.checks if c.measured_in == "scorecard"]
    if reused:
        lines += ["", f"Measured in the scorecard's pass (same weights, tokens, windows and dtype; not measured "
                  f"again): {', '.join(reused)}."]
    lines += ["", "![baseline vs candidate perplexity per check](gate.png)", ""]
    if verdict.scorecard is not None:
        from lorakit.scorecard.report import render_markdown as scorecard_markdown

        lines += [scorecard_markdown(verdict.scorecard, heading="## Scorecard"),
                  "| check | task | metric | value | threshold | result | why |", "|---|---|---|---:|---:|---|---|"]
        for c in verdict.scorecard_checks:
            value = "-" if c["value"] is None else f"{c['value']:.4g}"
            lines.append(f"| {c['check']} | {c['task']} | {c['metric']} | {value} | {c['threshold']:g} | "
                         f"{'pass' if c['passed'] else '**FAIL**'} | {c['message']} |")
        lines += ["", "![per task: exact match and perplexity / base](scorecard.png)", ""]
    if not verdict.passed:
        lines += [f"**Rejected:** {rejection(verdict)}", ""]
    return "\n".join(lines)


def render_png(verdict: Verdict, path: Path) -> None:
    """Grouped bars, baseline vs candidate perplexity per check, failed checks marked in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name + ("" if c.passed else "\n(FAIL)") for c in verdict.checks]
    x = list(range(len(names)))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 1.5), 3.6), dpi=100)
    try:
        ax.bar([i - width / 2 for i in x], [c.baseline_ppl for c in verdict.checks], width, label="baseline",
               color="#4C72B0")
        ax.bar([i + width / 2 for i in x], [c.candidate_ppl for c in verdict.checks], width, label="candidate",
               color=["#55A868" if c.passed else "#C44E52" for c in verdict.checks])
        for i, c in enumerate(verdict.checks):
            ax.annotate(_pct(c.degradation), (i + width / 2, c.candidate_ppl), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, names)
        ax.set_ylabel("perplexity")
        ax.set_title(f"gate {'PASSED' if verdict.passed else 'REJECTED'}")
        top = max(max(c.baseline_ppl, c.candidate_ppl) for c in verdict.checks)
        ax.set_ylim(0, top * 1.25)  # room for the labels and the legend above the bars
        ax.legend(loc="upper right", ncol=2, fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
