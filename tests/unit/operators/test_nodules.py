"""The nodule false-positive stage as a file: what it computes, that the shipped one and any
written by the training script read back identically, and that a broken file is refused with
a clear :class:`ScorerError` rather than scoring nonsense. The detector on thin slices (which
it averages onto its working grid): a nodule and a mass come back whole on the source grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from radfusion.operators.lungs import LungFields, grow_in_plane
from radfusion.operators.nodules import (
    FEATURES,
    NoduleScorer,
    ScorerError,
    default_scorer_path,
    find_nodules,
)

N = len(FEATURES)


def logistic(weights: list[float], bias: float = 0.0) -> NoduleScorer:
    return NoduleScorer(
        features=FEATURES,
        mean=tuple([1.0] * N),
        scale=tuple([2.0] * N),
        weights=tuple(weights),
        bias=bias,
    )


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_without_hidden_layers_the_score_is_a_logistic_regression() -> None:
    weights = [0.1 * (i + 1) for i in range(N)]
    scorer = logistic(weights, bias=-0.5)
    values = [float(i) for i in range(N)]
    z = -0.5 + sum(w * (v - 1.0) / 2.0 for w, v in zip(weights, values, strict=True))
    assert scorer(values) == pytest.approx(sigmoid(z))


def test_a_hidden_layer_is_tanh_then_the_output_weights() -> None:
    rows = ((1.0,) + (0.0,) * (N - 1), (0.0, -1.0) + (0.0,) * (N - 2))
    scorer = NoduleScorer(
        features=FEATURES,
        mean=tuple([0.0] * N),
        scale=tuple([1.0] * N),
        weights=(2.0, 3.0),
        bias=0.25,
        hidden=((rows, (0.5, 0.0)),),
    )
    values = [0.3, 0.7] + [9.0] * (N - 2)  # the other features have no weight
    z = 0.25 + 2.0 * math.tanh(0.3 + 0.5) + 3.0 * math.tanh(-0.7)
    assert scorer.logit(values) == pytest.approx(z)
    assert scorer(values) == pytest.approx(sigmoid(z))


def test_the_shipped_scorer_reads_back_from_what_it_writes(tmp_path: Path) -> None:
    shipped = NoduleScorer.from_json(default_scorer_path())
    path = tmp_path / "scorer.json"
    path.write_text(json.dumps(shipped.to_json()))
    again = NoduleScorer.from_json(path)
    assert again == shipped
    rng = np.random.default_rng(0)
    for values in rng.normal(shipped.mean, shipped.scale, size=(20, N)):
        assert again(values) == shipped(values)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"features": ["blobness"]}, "scorer features"),
        ({"mean": [0.0]}, "mean and scale"),
        ({"weights": [0.0] * (N + 1)}, f"needs {N} weights"),
        ({"hidden": [{"weights": [[0.0] * (N - 1)], "biases": [0.0]}]}, "hidden layer 1"),
        ({"hidden": [{"weights": [[0.0] * N] * 2, "biases": [0.0]}]}, "hidden layer 1"),
        ({"hidden": [{"weights": [[0.0] * N] * 2, "biases": [0.0, 0.0]}]}, "needs 2 weights"),
        ({"bias": float("nan")}, "finite"),
        ({"scale": [0.0] * N}, "scales positive"),
        ({"weights": None}, "not a nodule scorer"),
    ],
)
def test_a_broken_scorer_file_is_refused(
    tmp_path: Path, change: dict[str, object], said: str
) -> None:
    data = logistic([0.0] * N).to_json() | change
    path = tmp_path / "scorer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ScorerError, match=said):
        NoduleScorer.from_json(path)


def test_an_unreadable_scorer_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scorer.json"
    path.write_text("{not json")
    with pytest.raises(ScorerError, match="not a nodule scorer"):
        NoduleScorer.from_json(path)
    with pytest.raises(ScorerError, match="not a nodule scorer"):
        NoduleScorer.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize("slice_mm", [0.6, 1.0, 2.5])
def test_a_nodule_and_a_mass_come_back_whole_on_the_source_grid(slice_mm: float) -> None:
    """Thin slices are averaged onto the detector's working grid (the mass search's 3 mm at
    1 mm, both searches' at 0.6 mm); what it finds is put back on the source slices."""
    pixel = 0.8
    shape = (round(90 / slice_mm), 120, 120)
    k, r, c = np.indices(shape, sparse=True)
    z, y, x = k * slice_mm, r * pixel, c * pixel
    nodule = (z - 40) ** 2 + (y - 30) ** 2 + (x - 30) ** 2 <= 6.0**2
    mass = (z - 45) ** 2 + (y - 60) ** 2 + (x - 62) ** 2 <= 17.0**2
    hu = np.full(shape, -850.0, dtype=np.float32)
    hu[nodule | mass] = 30.0
    lung = np.zeros(shape, dtype=bool)
    lung[2:-2, 2:-2, 2:-2] = True
    fields = LungFields(
        right=lung, left=np.zeros_like(lung), search=lung, body=np.ones_like(lung), problems=()
    )
    candidates = find_nodules(hu, (slice_mm, pixel, pixel), fields, scorer=None)
    for truth, diameter in ((nodule, 12.0), (mass, 34.0)):
        best = 0.0
        for candidate in candidates:
            ours = np.zeros(shape, dtype=bool)
            ours[candidate.box] = candidate.mask
            overlap = np.count_nonzero(ours & truth)
            best = max(best, 2.0 * overlap / (np.count_nonzero(ours) + np.count_nonzero(truth)))
        assert best >= 0.9, (slice_mm, diameter, best)


@pytest.mark.parametrize("pixel", [0.7, 0.9])
def test_the_working_grid_masks_find_what_the_source_grid_masks_find(pixel: float) -> None:
    """The lung fields hand the detector their search regions on their working grid; where the
    detector's blocks are made of whole working blocks (0.7 mm pixels: both searches) it uses
    them as they are, elsewhere (0.9 mm: the mass search's 3-pixel blocks) it grows them first.
    Either way the candidates are those of the same masks given on the source grid."""
    shape = (40, 123, 123)  # not a multiple of the working grid's 2: the last row is padding
    k, r, c = np.indices(shape, sparse=True)
    z, y, x = k * 2.5, r * pixel, c * pixel
    hu = np.full(shape, -850.0, dtype=np.float32)
    hu[(z - 50) ** 2 + (y - 40) ** 2 + (x - 40) ** 2 <= 7.0**2] = 30.0
    hu[(z - 50) ** 2 + (y - 50) ** 2 + (x - 75) ** 2 <= 16.0**2] = 40.0
    working = np.zeros((40, 61, 61), dtype=bool)
    working[1:-1, 2:, 2:] = True  # up to the edge, padding included
    source = grow_in_plane(working, 2, shape)
    lung = source.copy()
    on_working_grid = LungFields(lung, np.zeros_like(lung), working, working, (), factor=2)
    on_source_grid = LungFields(lung, np.zeros_like(lung), source, source, ())
    spacing = (2.5, pixel, pixel)
    found = [
        find_nodules(hu, spacing, fields, scorer=None)
        for fields in (on_working_grid, on_source_grid)
    ]
    assert len(found[0]) >= 2
    assert [(a.box, a.features) for a in found[0]] == [(b.box, b.features) for b in found[1]]
    for a, b in zip(*found, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(on_working_grid.search, source)
