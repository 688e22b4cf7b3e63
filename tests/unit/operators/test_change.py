"""Change over time: registration of the lungs, matching, doubling time, the SR's sentences."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import numpy as np
import pytest
from pydicom.dataset import Dataset

from radfusion.operators.change import (
    NoduleChange,
    PriorAnalysis,
    RegistrationError,
    compare,
    register_lungs,
)
from radfusion.operators.lungs import find_lung_fields
from radfusion.operators.results import Finding
from radfusion.operators.volume import Volume
from radfusion.synth.ct import make_phantom


def _finding(name: str, centre: tuple[float, float, float], volume: float, side: str = "right"):
    diameter = (6 * volume / math.pi) ** (1 / 3)
    return Finding(
        kind="tumour",
        side=side,
        segment_number=3,
        tracking_id=name,
        tracking_uid="1.2.3",
        volume_mm3=volume,
        longest_axial_diameter_mm=diameter,
        mean_hu=30.0,
        sd_hu=10.0,
        centroid_lps=centre,
        diameter_endpoints_lps=(centre, centre),
    )


def _volume(phantom) -> Volume:  # type: ignore[no-untyped-def]
    header = Dataset()
    header.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    header.SOPInstanceUID = "1.2.3.4"
    return Volume(
        hu=phantom.hu.astype(np.float32),
        spacing_mm=(phantom.spacing_z, *phantom.pixel_spacing),
        affine=phantom.affine(),
        FrameOfReferenceUID="1.2",
        source_images=(header,),
        frame_numbers=(1,),
    )


def _prior(nodules: list[Finding]) -> PriorAnalysis:
    phantom = make_phantom(slices=8, rows=32, columns=32, seed=1, tumours=0, pixel_spacing=8.0)
    volume = _volume(phantom)
    return PriorAnalysis("1.9", "1.9.1", dt.date(2026, 1, 1), volume, volume.hu > 0, tuple(nodules))


def _identity(point):  # type: ignore[no-untyped-def]
    return tuple(float(v) for v in point)


def test_nodules_are_matched_nearest_first_and_the_rest_are_new_or_not_found() -> None:
    prior = _prior(
        [
            _finding("Tumour 1", (0.0, 0.0, 0.0), 500.0),
            _finding("Tumour 2", (60.0, 0.0, 0.0), 400.0),  # nothing near it now
        ]
    )
    now = [
        _finding("Tumour 1", (3.0, 0.0, 0.0), 1500.0),
        _finding("Tumour 2", (8.0, 0.0, 0.0), 300.0),  # also near prior 1, but farther
        _finding("Tumour 3", (-80.0, 0.0, 0.0), 200.0, side="left"),
    ]
    comparison = compare(now, prior, dt.date(2026, 4, 1), _identity, 0.0)
    assert comparison.interval_days == 90
    by_name = {(c.status, c.tracking_id): c for c in comparison.changes}
    assert set(by_name) == {
        ("matched", "Tumour 1"),
        ("new", "Tumour 2"),
        ("new", "Tumour 3"),
        ("not found", "Tumour 2"),
    }
    grown = by_name["matched", "Tumour 1"]
    assert grown.prior_tracking_id == "Tumour 1" and grown.distance_mm == pytest.approx(3.0)
    assert grown.volume_change_percent == pytest.approx(200.0)
    # Tripled in 90 days: 90 × ln 2 / ln 3 (the inverse formula would give 142.6).
    assert grown.doubling_time_days(90) == pytest.approx(56.78, abs=0.01)
    assert comparison.evidence == (("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),)
    text = comparison.statements()
    assert "1 nodule(s) matched, 2 new, 1 prior nodule(s) not found again" in text[0]
    assert any("Tumour 1 (right lung)" in t and "volume doubling time 57 days" in t for t in text)
    assert any(t.startswith("Prior Tumour 2 (right lung)") and "not found again" in t for t in text)


def test_a_nodule_that_did_not_grow_has_no_doubling_time() -> None:
    change = NoduleChange("matched", "Tumour 1", "left", "Tumour 1", 9.0, 10.0, 400.0, 500.0, 1.0)
    assert change.volume_change_percent == pytest.approx(-20.0)
    assert change.doubling_time_days(90) is None
    grown = NoduleChange("matched", "T", "left", "T", 9.0, 9.0, 600.0, 500.0, 1.0)
    assert grown.doubling_time_days(0) is None  # same day: no interval


def _turned(volume: Volume, degrees: float, offset: np.ndarray) -> Volume:
    """The same voxels with the patient turned about the z axis and moved: another
    positioning in the scanner."""
    a = math.radians(degrees)
    turn = np.eye(4)
    turn[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    turn[:3, 3] = offset
    return dataclasses.replace(volume, affine=turn @ volume.affine)


def test_registration_undoes_a_change_of_position() -> None:
    kw = {"slices": 60, "rows": 128, "columns": 128, "pixel_spacing": 2.8, "seed": 4, "tumours": 0}
    current = _volume(make_phantom(**kw))
    offset = np.array([6.0, -9.0, 12.5])
    prior = _turned(current, 8.0, offset)
    lungs = (lambda f: f.right | f.left)(
        find_lung_fields(current.hu, current.spacing_mm, current.affine)
    )
    # The prior's lungs are the same voxels, so the same mask: only the positioning differs.
    to_current, shift = register_lungs(current, lungs, prior, lungs)
    for point in ([40.0, 10.0, -120.0], [-60.0, -20.0, -90.0]):
        moved = (prior.affine @ np.linalg.inv(current.affine) @ [*point, 1.0])[:3]
        assert np.allclose(to_current(moved), point, atol=2.5), point
    assert shift > 10.0
    with pytest.raises(RegistrationError, match="no lungs"):
        register_lungs(current, np.zeros_like(lungs), prior, lungs)
