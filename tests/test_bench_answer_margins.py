"""The answer-margins bench's bookkeeping: what counts as a lost answer, its kind, and its rank by margin."""

from bench.answer_margins import flip_kind, flips, summary


def _model(margins: list[float], exact: list[bool], refs: list[str], preds: list[str]) -> dict:
    return {"margins": [{"margin": m, "at": 0, "answer_tokens": 3, "end_at": 2, "end_of_turn_margin": 5.0}
                        for m in margins],
            "predictions": [{"reference": r, "prediction": p, "exact": e} for r, p, e in zip(refs, preds, exact)]}


def test_flip_kind_names_the_last_word_said_again():
    assert flip_kind("glove olive coffee hammer", "glove olive coffee hammer hammer") == "last_word_repeated"
    assert flip_kind("cabin pickle pizza parrot", "cabin pickle pizza parrot parrott") == "last_word_repeated"
    assert flip_kind("thorn pirate thread", "thorn pirate pirate thread") == "other"
    assert flip_kind("bitter fog market", "bitter market") == "other"
    assert flip_kind("a b", "") == "other"


def test_flips_counts_lost_and_gained_with_the_merged_margin_rank():
    refs = ["a b", "c d", "e f", "g h"]
    merged = _model([0.5, 3.0, -0.2, 1.0], [True, True, False, True], refs, ["a b", "c d", "e f f", "g h"])
    quantized = _model([-0.1, 2.0, 0.3, 1.5], [False, True, True, True], refs, ["a b b", "c d", "e f", "g h"])
    out = flips(merged, quantized)
    assert (out["lost"], out["gained"]) == (1, 1)
    lost = out["lost_answers"][0]
    assert lost["index"] == 0 and lost["kind"] == "last_word_repeated"
    assert lost["merged_margin_rank"] == round(1 / 3, 3)  # second smallest of four margins
    assert out["gained_answers"][0]["index"] == 2
    assert out["lost_kinds"] == {"last_word_repeated": 1, "other": 0}
    # shifts: -0.6, -1.0, +0.5, +0.5
    assert out["margin_shift"]["abs_max"] == 1.0


def test_summary_counts_answers_near_the_edge_and_where_the_smallest_margin_falls():
    rows = [{"margin": m, "at": at, "answer_tokens": 3, "end_at": 2, "end_of_turn_margin": e}
            for m, at, e in [(0.5, 2, 0.5), (1.5, 0, 4.0), (-1.0, 2, -1.0), (3.0, 1, 6.0)]]
    s = summary(rows, [True, True, False, True])
    assert s["exact_match"] == 0.75
    assert (s["below_1_nats"], s["below_2_nats"], s["negative"]) == (2, 3, 1)
    assert s["smallest_at_end_of_turn"] == 2
    assert s["end_of_turn_margin_min"] == -1.0
