"""Retention arithmetic, checked against hand-computed values."""

import math

import pytest

from lorakit.evaluate.retention import retention


def test_accuracy_retention_is_share_of_gain_kept():
    r = retention(0.1, 0.9, 0.7, higher_is_better=True)
    assert r.value == pytest.approx(0.6 / 0.8)
    assert r.learned and r.gain == pytest.approx(0.8)


def test_nll_retention_flips_direction():
    # base NLL 3.0, adapter 1.0 (gain 2.0), merged 1.5 keeps 1.5 of the 2.0 nats
    r = retention(3.0, 1.0, 1.5, higher_is_better=False)
    assert r.value == pytest.approx(0.75)


def test_merge_worse_than_base_is_negative_and_better_than_adapter_above_one():
    assert retention(0.2, 0.6, 0.1, higher_is_better=True).value == pytest.approx(-0.25)
    assert retention(0.2, 0.6, 0.8, higher_is_better=True).value == pytest.approx(1.5)


@pytest.mark.parametrize("adapter", [0.3, 0.2])
def test_adapter_without_gain_has_no_retention(adapter):
    r = retention(0.3, adapter, 0.5, higher_is_better=True)
    assert r.value is None and not r.learned


def test_min_gain_threshold():
    assert retention(0.0, 0.01, 0.01, higher_is_better=True, min_gain=0.02).value is None
    assert retention(0.0, 0.05, 0.05, higher_is_better=True, min_gain=0.02).value == pytest.approx(1.0)


def test_non_finite_scores_refused():
    with pytest.raises(ValueError, match="merged"):
        retention(1.0, 0.5, math.nan, higher_is_better=False)
