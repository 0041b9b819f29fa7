"""The options of the release gate, declared once (:mod:`lorakit.options`): ``lorakit gate``, the run config's
``gate:`` section and the gate's library defaults (:mod:`lorakit.gate.verdict`, :mod:`lorakit.gate.general`,
:mod:`lorakit.scorecard.judge`) come from :class:`GateOptions`.

The KL bar, ``max_kl``: the 5% perplexity bar in KL terms. Were the scored text the baseline's own samples,
mean KL(p_baseline || p_candidate) = ln(ppl_candidate / ppl_baseline), so ln(1.05) nats is "5% worse" measured on
the baseline's beliefs instead of the data's. On the default release, 4-bit g64 quantizations measure mean KL
0.03-0.10 on the tasks and 0.14-0.46 on general text (bench/results/calibration_mix.json,
variants.*.checks.*.kl_mean): the bar binds where perplexity alone passes (GPTQ calibrated on the tasks:
reverse-words +1.6% perplexity at KL 0.051, variants.gptq-general0.checks.reverse-words).

The language bar, ``max_general_forgetting`` (merged vs base on general text, 10%): the default release's merged
model is +1.7% (bench/results/release_scorecard_bf16_anchor.json, ``release.general_text.vs_base.merged``: RegMean's
general-text anchor; +7.8% before it, with weights 1, release_scorecard_bf16_perlr.json; at weights 1.2 without it
+13.3%, regmean_weights.json); the same release trained with LoRA+ 8 answered more
of its tasks and was +60.6%
(release_scorecard_bf16_loraplus8.json), a loss every other check let through.
"""

from __future__ import annotations

import math

from pydantic import Field

from lorakit.evaluate.options import WindowOptions

_MAX_DEGRADATION = 0.05
GENERAL_DEFAULT = "default"  # the shipped corpus, as the config and the CLI spell it


class GateOptions(WindowOptions):
    """The release gate: a candidate (the quantized model) against its baseline (the merged model), on every task's
    val split, on general text, and on the release scorecard."""

    max_degradation: float = Field(_MAX_DEGRADATION, ge=0, description="Largest accepted ppl(candidate) / "
                                   "ppl(baseline) - 1 on every task (0.05 = 5% worse).")
    general_text: str | None = Field(
        GENERAL_DEFAULT, description="General text the candidate must keep (lorakit.gate.general): 'default' = the "
        "general-English corpus shipped with lorakit (ten public-domain State of the Union addresses, ~50k words), "
        "a .txt/.jsonl file or prep folder; none = no check.")
    general_max_degradation: float = Field(_MAX_DEGRADATION, ge=0, description="Largest accepted perplexity loss on "
                                           "general_text, candidate vs baseline.")
    # A cap, not a measured optimum: 16 windows of 512 tokens, the order of magnitude of the tasks' own val
    # streams, so the check costs about as much as one task check (the corpus has ~62k tokens).
    general_max_tokens: int | None = Field(8192, gt=0, description="Score the first this many tokens of general_text "
                                           "(none = all of it): a fixed, small cost per gate whatever the corpus.")
    max_kl: float | None = Field(round(math.log(1 + _MAX_DEGRADATION), 4), ge=0, description="Largest accepted mean "
                                 "KL(p_baseline || p_candidate) per token, nats, on every check (ln 1.05: the 5% bar "
                                 "in KL terms); none = KL and top-1 agreement are reported, not judged.")
    min_retention: float | None = Field(
        0.9, ge=0, description="Scorecard (val): the merged model keeps at least this share of each adapter's "
        "exact-match gain over the base; an adapter with no gain fails as not learned; none = report only.")
    max_accuracy_drop: float | None = Field(
        0.02, ge=0, description="Scorecard (val): largest exact-match drop, quantized vs merged, per task, absolute "
        "(0.02 = 2 points); none = report only.")
    max_general_forgetting: float | None = Field(
        0.1, ge=0, description="Scorecard: largest general-text perplexity loss of the merged model against the base "
        "(0.1 = 10% worse): what training and merging cost the model's language, which the quantized-vs-merged "
        "checks cannot see; needs general_text; none = report only.")


GATE = GateOptions()
