"""Change over time: registration of the lungs, matching, doubling time, the SR's sentences."""

from __future__ import annotations

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
        _finding("Tumour 1", (3.0, 0.0, 0.0), 1000.0),
        _finding("Tumour 2", (8.0, 0.0, 0.0), 300.0),  # also near prior 1, but farther
        _finding("Tumour 3", (-80.0, 0.0, 0.0), 200.0, side="left"),
    ]
    comparison = compare(now, prior, dt.date(2026, 3, 2), _identity, 0.0)
    assert comparison.interval_days == 60
    by_name = {(c.status, c.tracking_id): c for c in comparison.changes}
    assert set(by_name) == {
        ("matched", "Tumour 1"),
        ("new", "Tumour 2"),
        ("new", "Tumour 3"),
        ("not found", "Tumour 2"),
    }
    grown = by_name["matched", "Tumour 1"]
    assert grown.prior_tracking_id == "Tumour 1" and grown.distance_mm == pytest.approx(3.0)
    assert grown.volume_change_percent == pytest.approx(100.0)
    assert grown.doubling_time_days(60) == pytest.approx(60.0)  # doubled in 60 days
    assert comparison.evidence == (("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),)
    text = comparison.statements()
    assert "1 nodule(s) matched, 2 new, 1 prior nodule(s) not found again" in text[0]
    assert any("Tumour 1 (right lung)" in t and "volume doubling time 60 days" in t for t in text)
    assert any(t.startswith("Prior Tumour 2 (right lung)") and "not found again" in t for t in text)


def test_a_nodule_that_did_not_grow_has_no_doubling_time() -> None:
    change = NoduleChange("matched", "Tumour 1", "left", "Tumour 1", 9.0, 10.0, 400.0, 500.0, 1.0)
    assert change.volume_change_percent == pytest.approx(-20.0)
    assert change.doubling_time_days(90) is None
    grown = NoduleChange("matched", "T", "left", "T", 9.0, 9.0, 600.0, 500.0, 1.0)
    assert grown.doubling_time_days(0) is None  # same day: no interval


def test_registration_undoes_a_change_of_position() -> None:
    kw = {"slices": 60, "rows": 128, "columns": 128, "pixel_spacing": 2.8, "seed": 4, "tumours": 0}
    offset = np.array([6.0, -9.0, 12.5])
    now, then = make_phantom(**kw), make_phantom(**kw).moved(tuple(offset))
    current, prior = _volume(now), _volume(then)
    lungs = [
        (lambda f: f.right | f.left)(find_lung_fields(v.hu, v.spacing_mm, v.affine))
        for v in (current, prior)
    ]
    to_current, shift = register_lungs(current, lungs[0], prior, lungs[1])
    assert shift == pytest.approx(float(np.linalg.norm(offset)), abs=1.5)
    point = np.array([40.0, 10.0, -120.0])
    assert np.allclose(to_current(point + offset), point, atol=2.0)
    with pytest.raises(RegistrationError, match="no lungs"):
        register_lungs(current, np.zeros_like(lungs[0]), prior, lungs[1])
