"""Answer flips between two models and McNemar's exact p-value, checked against hand counts and scipy."""

import pytest
from scipy.stats import binomtest

from lorakit.evaluate.flips import answer_flips, describe_flips, mcnemar_exact_p


@pytest.mark.parametrize("lost,gained", [(8, 4), (4, 0), (0, 4), (5, 5), (16, 4), (1, 0), (30, 2)])
def test_p_value_is_the_exact_binomial_test_on_changed_answers(lost, gained):
    assert mcnemar_exact_p(lost, gained) == pytest.approx(binomtest(lost, lost + gained, 0.5).pvalue)


def test_hand_computed_values():
    assert mcnemar_exact_p(8, 4) == pytest.approx(2 * (1 + 12 + 66 + 220 + 495) / 4096)  # 0.388: noise
    assert mcnemar_exact_p(4, 0) == pytest.approx(2 / 16)
    assert mcnemar_exact_p(0, 0) == 1.0  # nothing changed


def test_flips_count_each_direction_on_the_same_questions():
    before = [True, True, False, False, True, True]
    after = [True, False, True, False, False, True]
    flips = answer_flips(before, after)
    assert (flips.lost, flips.gained) == (2, 1)
    assert flips.p_value == pytest.approx(binomtest(2, 3, 0.5).pvalue)
    assert describe_flips(flips.to_dict()) == "2 answers lost and 1 gained (McNemar p 1)"
    assert describe_flips({"lost": 2, "gained": 1}) == "2 answers lost and 1 gained"  # an older scorecard


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="different numbers of questions"):
        answer_flips([True], [True, False])
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact_p(-1, 2)
