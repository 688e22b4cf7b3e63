"""Metrics for the fusion evaluation, numpy only: AUC, Harrell's C-index, calibration (ECE and
slope) and percentile bootstrap intervals."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["auc", "bootstrap", "c_index", "calibration_slope", "expected_calibration_error"]


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN with one class only."""
    label = np.asarray(label, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    positives, negatives = int(label.sum()), int((~label).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    # Average ranks of ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[label].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def c_index(days: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance: among pairs where the earlier time is an event, the share in
    which the earlier one has the higher risk (ties in risk count half)."""
    days = np.asarray(days, dtype=np.float64)
    event = np.asarray(event, dtype=bool)
    risk = np.asarray(risk, dtype=np.float64)
    concordant = comparable = 0.0
    for i in np.flatnonzero(event):
        later = days > days[i]
        n = int(later.sum())
        if n == 0:
            continue
        comparable += n
        concordant += float((risk[i] > risk[later]).sum()) + 0.5 * float(
            (risk[i] == risk[later]).sum()
        )
    return concordant / comparable if comparable else math.nan


def expected_calibration_error(label: np.ndarray, probability: np.ndarray, bins: int = 10) -> float:
    """ECE over ``bins`` equal-width probability bins, weighted by their size."""
    label = np.asarray(label, dtype=np.float64)
    probability = np.asarray(probability, dtype=np.float64)
    which = np.minimum((probability * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(label[inside].mean() - probability[inside].mean())
    return float(total)


def calibration_slope(label: np.ndarray, probability: np.ndarray) -> float:
    """The slope of a logistic regression of the label on logit(probability): 1 is ideal,
    below 1 predictions too extreme, above 1 too timid (Newton's method)."""
    y = np.asarray(label, dtype=np.float64)
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-6, 1 - 1e-6)
    z = np.log(p / (1 - p))
    design = np.stack([np.ones_like(z), z], axis=1)
    beta = np.zeros(2)
    for _ in range(50):
        mu = 1.0 / (1.0 + np.exp(-(design @ beta)))
        gradient = design.T @ (y - mu)
        hessian = (design * (mu * (1 - mu))[:, None]).T @ design + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    return float(beta[1])


def bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    rounds: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``statistic(index)`` on all ``n`` rows, and its 95 % percentile interval over
    ``rounds`` resamples of the rows (resamples where it is undefined are skipped)."""
    rng = np.random.default_rng(seed)
    point = statistic(np.arange(n))
    values = []
    for _ in range(rounds):
        value = statistic(rng.integers(0, n, size=n))
        if math.isfinite(value):
            values.append(value)
    if not values:
        return point, math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return point, float(low), float(high)
