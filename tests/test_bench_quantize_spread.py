"""The quantize-spread bench's bookkeeping: a roll's drops and flips against the merged model, its two verdicts
(the page's goals on test and fresh questions, the gate's on val) and what choosing a roll by val would pick."""

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
