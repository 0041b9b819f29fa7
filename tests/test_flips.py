"""Answer flips between two models and McNemar's exact p-value, checked against hand counts and scipy."""

import pytest
from scipy.stats import binomtest

from lorakit.evaluate.flips import answer_flips, describe_flips, drop_interval, mcnemar_exact_p


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
    assert flips.to_dict()["questions"] == 6
    assert describe_flips({k: v for k, v in flips.to_dict().items() if k != "drop_ci95"}) == \
        "2 answers lost and 1 gained (McNemar p 1)"  # a scorecard written before the interval
    assert describe_flips({"lost": 2, "gained": 1}) == "2 answers lost and 1 gained"  # an older scorecard


@pytest.mark.parametrize("lost,gained,n", [(7, 2, 200), (5, 0, 200), (0, 3, 50), (36, 8, 2000)])
def test_the_drop_interval_is_the_normal_interval_of_the_per_question_differences(lost, gained, n):
    import statistics

    diffs = [1] * lost + [-1] * gained + [0] * (n - lost - gained)
    half = 1.959964 * statistics.pstdev(diffs) / n**0.5
    lo, hi = drop_interval(lost, gained, n)
    assert lo == pytest.approx(statistics.fmean(diffs) - half) and hi == pytest.approx(statistics.fmean(diffs) + half)
    assert drop_interval(0, 0, n) == (0.0, 0.0)


def test_a_flip_description_says_how_precisely_the_split_measured_the_drop():
    before, after = [True] * 200, [True] * 200
    for i in range(5):
        after[i] = False  # 5 of 200 lost: a 2.5-point drop
    text = describe_flips(answer_flips(before, after).to_dict())
    lo, hi = drop_interval(5, 0, 200)
    assert text == ("5 answers lost and 0 gained (McNemar p 0.062; the drop's 95% interval "
                    f"+{100 * lo:.1f} to +{100 * hi:.1f} points)")
    assert lo < 0.02 < hi  # 200 questions cannot tell a 2.5-point drop from one within the 2-point bar


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="lost \\+ gained <= questions"):
        drop_interval(3, 2, 4)
    with pytest.raises(ValueError, match="different numbers of questions"):
        answer_flips([True], [True, False])
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact_p(-1, 2)
