"""The evaluation's metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from radfusion.fusion.metrics import (
    auc,
    bootstrap,
    c_index,
    calibration_slope,
    expected_calibration_error,
)


def test_auc() -> None:
    label = np.array([0, 0, 1, 1], bool)
    assert auc(label, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(label, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(label, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties count half
    assert math.isnan(auc(np.array([1, 1], bool), np.array([0.1, 0.2])))


def test_c_index_counts_only_comparable_pairs() -> None:
    days = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([True, False, True, False])
    # comparable: (0,1) (0,2) (0,3) (2,3); risk orders all but (0,2) correctly
    risk = np.array([3.0, 1.0, 4.0, 0.0])
    assert c_index(days, event, risk) == pytest.approx(3 / 4)


def test_calibration() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 20000)
    y = rng.random(20000) < p
    assert expected_calibration_error(y, p) < 0.02
    assert calibration_slope(y, p) == pytest.approx(1.0, abs=0.08)
    extreme = 1 / (1 + np.exp(-3 * np.log(p / (1 - p))))
    assert calibration_slope(y, extreme) == pytest.approx(1 / 3, abs=0.05)
    assert expected_calibration_error(y, np.full_like(p, 0.9)) > 0.3


def test_bootstrap_interval_holds_the_point() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    point, low, high = bootstrap(lambda i: float(x[i].mean()), 200, rounds=300)
    assert low < point < high and high - low == pytest.approx(4 * 1 / math.sqrt(200), rel=0.3)
