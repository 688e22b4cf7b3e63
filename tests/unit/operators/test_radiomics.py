"""Radiomics: the library's values on the IBSI digital phantom, and the operator's plumbing."""

from __future__ import annotations

import csv
import logging
import math
from decimal import Decimal
from importlib import metadata
from pathlib import Path

import nibabel
import numpy as np
import pytest

from radfusion.operators import radiomics
from radfusion.operators.radiomics import (
    FEATURES,
    GROUND_GLASS,
    SD,
    RadiomicsError,
    RadiomicsSettings,
    shape_features,
    tumour_features,
)

PHANTOM = Path(__file__).resolve().parents[2] / "data" / "ibsi_phantom"
# The phantom's intensities are its grey levels: no resampling, re-segmentation or
# discretisation (as the IBSI computed the reference values).
AS_IS = RadiomicsSettings(resampling_mm=None, intensity_range_hu=None, discretisation="none")


def _nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI image as [k, r, c] (NIfTI stores x fastest) and its spacing in that order."""
    image = nibabel.load(path)
    data = np.asarray(image.dataobj).transpose(2, 1, 0)
    zooms = image.header.get_zooms()
    return data, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def _tolerance(value: str, tolerance: str) -> float:
    """The IBSI tolerance; 0 means the value as printed: half its last significant digit."""
    if float(tolerance) > 0:
        return float(tolerance)
    printed = Decimal(value.removesuffix(".0") if value.endswith(".0") else value)
    return 0.5 * 10.0 ** printed.as_tuple().exponent


def _references() -> dict[str, tuple[float, float]]:
    """IBSI id → (value, tolerance) for the features radfusion reports; texture 3D averaged."""
    out = {}
    with (PHANTOM / "reference_values.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["aggregation"] in ("", "3D, averaged") and row["value"]:
                out[row["ibsi_id"]] = (
                    float(row["value"]),
                    _tolerance(row["value"], row["tolerance"]),
                )
    return out


@pytest.fixture(scope="module")
def phantom_features() -> dict[str, float]:
    image, spacing = _nifti(PHANTOM / "phantom.nii.gz")
    mask, _ = _nifti(PHANTOM / "mask.nii.gz")
    assert image.shape == (4, 4, 5) and int(mask.sum()) == 74 and spacing == (2.0, 2.0, 2.0)
    return tumour_features(image.astype(float), spacing, mask > 0, AS_IS)


def test_every_reported_feature_has_an_ibsi_reference() -> None:
    references = _references()
    assert {f.ibsi for f in FEATURES} <= references.keys()
    assert len(FEATURES) == 16 + 25 + 16


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.name)
def test_library_matches_the_ibsi_phantom_reference(
    feature: object, phantom_features: dict[str, float]
) -> None:
    value, tolerance = _references()[feature.ibsi]  # type: ignore[attr-defined]
    got = phantom_features[feature.name]  # type: ignore[attr-defined]
    assert abs(got - value) <= tolerance * (1 + 1e-9), f"{got} vs {value} ± {tolerance}"


def test_derived_values(phantom_features: dict[str, float]) -> None:
    assert phantom_features[SD] == pytest.approx(math.sqrt(phantom_features["variance"]))
    # Grey levels 1..9 are never in the ground-glass HU range.
    assert phantom_features[GROUND_GLASS] == 0.0


def test_ground_glass_fraction_and_ct_settings() -> None:
    """A CT-like sphere, half solid (40 HU) and half ground glass (-500 HU), 1 mm voxels
    resampled to 1 mm, 25 HU bins: half of it counts as ground glass; volume about right."""
    zz, yy, xx = np.mgrid[:24, :24, :24]
    ball = (zz - 11.5) ** 2 + (yy - 11.5) ** 2 + (xx - 11.5) ** 2 <= 8.0**2
    image = np.full(ball.shape, -850.0)
    image[ball] = np.where(xx[ball] < 11.5, 40.0, -500.0)
    values = tumour_features(image, (1.0, 1.0, 1.0), ball, RadiomicsSettings())
    assert values[GROUND_GLASS] == pytest.approx(0.5, abs=0.02)
    assert values["volume"] == pytest.approx(4 / 3 * math.pi * 8**3, rel=0.05)
    assert values["sphericity"] > 0.9
    assert values["max_3d_diameter"] == pytest.approx(16.0, abs=1.5)


def test_an_empty_region_is_an_error_not_a_crash() -> None:
    with pytest.raises(RadiomicsError, match="empty"):
        tumour_features(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), np.zeros((4, 4, 4), bool), AS_IS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resampling_mm": 0.0},
        {"interpolation_order": 2},
        {"intensity_range_hu": (400.0, -1000.0)},
        {"bin_width_hu": 0.0},
        {"discretisation": "fixed_bin_number"},
    ],
)
def test_settings_out_of_range_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RadiomicsSettings(**kwargs)  # type: ignore[arg-type]


def test_the_library_neither_prints_nor_leaves_a_handler(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """mirp calls logging.basicConfig and logs each call at INFO to stdout when allowed to: in
    a process whose root logger has no handler yet (pytest's own are taken off for this)."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    handlers, filters = list(root.handlers), list(root.filters)
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 2:6, 2:6] = True
    image = np.random.default_rng(0).normal(0, 50, mask.shape)
    tumour_features(image, (1.0, 1.0, 1.0), mask, RadiomicsSettings())
    assert capsys.readouterr().out == ""
    assert root.handlers == handlers and root.filters == filters


def test_a_missing_library_is_said_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(radiomics.metadata, "version", missing)
    with pytest.raises(RadiomicsError, match=r"pip install --no-deps mirp==2\.7\.0"):
        radiomics.library_version()


def test_a_tiny_region_has_shape_features_not_an_error() -> None:
    """Three voxels of a real synthetic cohort's tumour (2.5 × 2.8 × 2.8 mm voxels): two of
    their principal variances are zero, and rounding made one negative (a math domain error
    that failed the study)."""
    mask = np.zeros((4, 4, 4), bool)
    for k, r, c in ((1, 1, 2), (1, 2, 3), (2, 2, 2)):
        mask[k, r, c] = True
    values = shape_features(mask, (2.5, 2.8125, 2.8125))
    assert values["flatness"] == pytest.approx(0.0, abs=1e-6)
    assert values["volume"] > 0
