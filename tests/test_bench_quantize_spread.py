"""The quantize-spread bench's bookkeeping: a roll's drops and flips against the merged model, its two verdicts
(the page's goals on test and fresh questions, the gate's on val) and what choosing a roll by val would pick."""

import math

from bench.quantize_spread import spread, summarize

TASKS = ("reverse-words", "number-words")


def _merged(n: int = 200) -> dict:
    """Every split right on the first 190 questions of each task, wrong on the last 10."""
    return {split: {t: [i < n - 10 for i in range(n)] for t in TASKS} for split in ("val", "test", "fresh")}


def _roll(label: str, flips: dict[tuple[str, str], tuple[int, int]], general: float = 0.03) -> dict:
    """The merged answers with ``lost`` of the right ones made wrong and ``gained`` of the wrong ones made right."""
    answers = _merged()
    for (split, task), (lost, gained) in flips.items():
        row = answers[split][task]
        for i in range(lost):
            row[i] = False
        for i in range(gained):
            row[-1 - i] = True
    return {"label": label, "seed": 0, "threads": 1, "answers": answers,
            "checks": {"reverse-words": {"kind": "primary", "degradation": 0.01},
                       "general-text": {"kind": "general", "degradation": general}}}


def _summary(roll: dict) -> dict:
    return {**{k: v for k, v in roll.items() if k != "answers"}, **summarize(roll, _merged())}


def test_a_roll_meets_the_goals_at_exactly_two_points_and_not_past_them():
    at_bar = summarize(_roll("a", {("test", "reverse-words"): (5, 1)}), _merged())  # 4 of 200: 2.0 points
    s = at_bar["scores"]["test"]["reverse-words"]
    assert (s["lost"], s["gained"]) == (5, 1) and abs(s["drop"] - 0.02) < 1e-12
    assert at_bar["meets_goals"] and at_bar["gate_passes"]
    past = summarize(_roll("b", {("fresh", "number-words"): (5, 0)}), _merged())  # 2.5 points on fresh questions
    assert not past["meets_goals"] and past["gate_passes"]  # the gate judges val, which lost nothing
    on_val = summarize(_roll("c", {("val", "reverse-words"): (5, 0)}), _merged())
    assert on_val["meets_goals"] and not on_val["gate_passes"]
    general = summarize(_roll("d", {}, general=0.051), _merged())
    assert not general["meets_goals"] and not general["gate_passes"]


def test_choosing_on_val_picks_the_smallest_worst_task_val_drop_and_reports_its_test_drop():
    rolls = {"release": _summary(_roll("release", {("val", "reverse-words"): (2, 0), ("test", "reverse-words"): (5, 0)})),
             "seed1": _summary(_roll("seed1", {("val", "reverse-words"): (1, 0), ("test", "reverse-words"): (1, 0)})),
             "seed2": _summary(_roll("seed2", {("val", "number-words"): (1, 0), ("test", "number-words"): (2, 0)}))}
    out = spread(rolls)
    assert (out["rolls"], out["meet_goals"], out["gate_passes"], out["gate_passes_missing_goals"]) == (3, 2, 3, 1)
    chosen = out["chosen_on_val"]
    assert chosen["roll"] == "seed1" and chosen["tied"] == 2  # seed2 drops as much on val, on the other task
    assert abs(chosen["worst_test_drop"] - 0.005) < 1e-12
    assert abs(out["median_worst_test_drop"] - 0.01) < 1e-12
    assert abs(out["drops"]["reverse-words"]["test"]["max"] - 0.025) < 1e-12


def test_the_chance_of_a_split_past_the_bar_matches_every_outcome_enumerated():
    import itertools

    from bench.quantize_spread import p_drop_past

    n, p_lost, p_gained, bar = 8, 0.2, 0.1, 0.25  # past the bar: a net loss of 3 or more of 8
    probs = {1: p_lost, -1: p_gained, 0: 1 - p_lost - p_gained}
    reference = sum(math.prod(probs[o] for o in outcome)
                    for outcome in itertools.product((1, -1, 0), repeat=n) if sum(outcome) > bar * n)
    assert abs(p_drop_past(n, p_lost, p_gained, bar) - reference) < 1e-12
    assert p_drop_past(200, 0.0, 0.01) == 0.0


def test_the_chance_at_the_test_split_size_matches_a_simulation():
    import numpy as np

    from bench.quantize_spread import p_drop_past

    draws = np.random.default_rng(0).multinomial(200, [0.0125, 0.003, 1 - 0.0155], size=400_000)
    simulated = float(np.mean(draws[:, 0] - draws[:, 1] > 4))  # 4 of 200 is the 2-point bar, still within it
    assert abs(p_drop_past(200, 0.0125, 0.003) - simulated) < 0.003


def test_rolls_that_lose_alike_share_one_rate_and_a_roll_that_loses_far_more_does_not():
    from bench.quantize_spread import lost_homogeneity_p

    assert lost_homogeneity_p([5, 5, 5], 190) > 0.99
    assert lost_homogeneity_p([1, 2, 25], 190) < 1e-4
    assert lost_homogeneity_p([4], 190) is None and lost_homogeneity_p([0, 0], 190) is None


def test_the_spread_pools_every_rolls_flips_per_task_and_split():
    rolls = {k: _summary(_roll(k, {("test", "reverse-words"): flips, ("fresh", "reverse-words"): (1, 0)}))
             for k, flips in {"a": (3, 1), "b": (5, 0), "c": (1, 0)}.items()}
    pooled = spread(rolls)["pooled"]["reverse-words"]
    test = pooled["test"]
    assert (test["questions"], test["rolls"], test["lost"], test["gained"]) == (200, 3, 9, 1)
    assert abs(test["p_lost"] - 9 / 600) < 1e-12 and abs(test["drop"] - 8 / 600) < 1e-12
    assert test["p_past_bar"] > pooled["fresh"]["p_past_bar"]  # more lost per question: more often past the bar
    out = spread(rolls)
    number_words = out["pooled"]["number-words"]["test"]
    assert number_words["lost"] == 0 and number_words["p_past_bar"] == 0
    # meeting the goals needs test and fresh within the bar on every task: the chances multiply
    expected = (1 - test["p_past_bar"]) * (1 - pooled["fresh"]["p_past_bar"])
    assert abs(out["noise_only_meet_rate"]["own_sizes"] - expected) < 1e-12


def test_the_pooled_interval_is_over_the_shared_questions_not_every_rolls_answers():
    import statistics

    from bench.quantize_spread import Z95, question_diffs

    flips = {("test", "reverse-words"): (4, 0)}  # every roll loses the same four questions
    raw = [_roll(k, flips) for k in "abc"]
    rolls = {r["label"]: _summary(r) for r in raw}
    diffs = question_diffs([r["answers"] for r in raw], _merged())
    assert diffs[("test", "reverse-words")][:5] == [1.0, 1.0, 1.0, 1.0, 0.0]
    over_questions = spread(rolls, diffs)["pooled"]["reverse-words"]["test"]
    over_answers = spread(rolls)["pooled"]["reverse-words"]["test"]
    per_question = [1.0] * 4 + [0.0] * 196
    half = Z95 * statistics.pstdev(per_question) / math.sqrt(200)
    assert over_questions["interval_over"] == "questions" and over_answers["interval_over"] == "answers"
    assert abs(over_questions["drop_ci95"][1] - (0.02 + half)) < 1e-12
    assert over_questions["drop_ci95"][1] > over_answers["drop_ci95"][1]  # three rolls are not 600 questions


def test_the_readme_section_shows_every_roll_and_the_pooled_rates():
    from bench.quantize_spread import readme

    raw = [_roll(k, {("test", "reverse-words"): (3, 1), ("val", "number-words"): (1, 0)}) for k in ("release", "seed1")]
    rolls = {r["label"]: _summary(r) for r in raw}
    data = {"threads": 1, "release": "OUT", "fresh_questions": 200, "existing": {}, "compute_dtype": "float32",
            "rolls": rolls, "spread": spread(rolls)}
    text = readme(data, "quantize_spread_x")
    assert text.startswith("## quantize_spread_x") and "| release | 0 | 1 |" in text and "| seed1 |" in text
    assert "| reverse-words | test | 200 x 2 | 6 / 2 | 1.00 |" in text and "rolls would meet the goals" in text
