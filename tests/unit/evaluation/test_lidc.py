"""LIDC reader XML → reference nodules: parsing, rasterising, grouping, on synthetic and real
geometry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from radfusion.evaluation.grid import CtGrid, ReferenceMismatchError, find_ct_series
from radfusion.evaluation.lidc import (
    LidcFormatError,
    is_lidc_xml,
    parse_lidc_xml,
    rasterise,
    reference_nodules,
)
from radfusion.evaluation.synthetic import dice
from radfusion.synth.ct_series import synth_ct
from tests.unit.evaluation.support import LIDC_DICOM, LIDC_XML, lidc_xml, require_lidc, square


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> CtGrid:
    root = tmp_path_factory.mktemp("lidc_small")
    synth_ct(root, slices=10, rows=40, columns=40, tumours=0)
    [grid] = find_ct_series(root).values()
    return grid


def roi(grid: CtGrid, k: int, points: list[tuple[int, int]], inclusion: bool = True) -> tuple:
    return (grid.sop_uids[k], grid.z_mm[k], inclusion, points)


def test_square_outline_fills_with_its_edge_and_holes_without(small: CtGrid) -> None:
    xml = lidc_xml(
        small.StudyInstanceUID,
        small.SeriesInstanceUID,
        [[[roi(small, 4, square(10, 12, 9)), roi(small, 4, square(13, 15, 3), inclusion=False)]]],
    )
    read = parse_lidc_xml(xml)
    assert read.readers == 1 and len(read.nodules) == 1
    mask = rasterise(read.nodules[0], small)
    expected = np.zeros(small.shape, dtype=bool)
    expected[4, 12:21, 10:19] = True  # rows from y, columns from x; edge pixels included
    expected[4, 16, 14] = False  # the hole's interior; its edge stays in the nodule
    assert np.array_equal(mask, expected)


def test_namespace_is_optional_and_points_are_not_nodules(small: CtGrid) -> None:
    readers = [[[roi(small, 2, square(5, 5, 6))], [roi(small, 7, [(30, 30)])]]]
    with_ns = parse_lidc_xml(lidc_xml("1.2", "1.3", readers))
    without = parse_lidc_xml(lidc_xml("1.2", "1.3", readers, namespace=False))
    assert with_ns == without
    assert (with_ns.StudyInstanceUID, with_ns.SeriesInstanceUID) == ("1.2", "1.3")
    assert len(with_ns.nodules) == 1  # the single point (< 3 mm) is not an outlined nodule


def test_readers_overlapping_outlines_group_into_one_nodule(small: CtGrid) -> None:
    a = [roi(small, k, square(10, 10, 8)) for k in (3, 4, 5)]
    b = [roi(small, k, square(12, 12, 8)) for k in (4, 5, 6)]
    lone = [roi(small, 2, square(28, 28, 6))]
    read = parse_lidc_xml(
        lidc_xml(small.StudyInstanceUID, small.SeriesInstanceUID, [[a, lone], [b]])
    )
    nodules = reference_nodules(read, small)
    assert [n.readers for n in nodules] == [1, 2]  # ordered by slice of their centroid
    lone_ref, pair = nodules
    # Two readers: the consensus (≥ 50 %) is their union; a single reader's, his own outline.
    assert pair.union.voxels == pair.consensus.voxels
    assert pair.diameter_source == "consensus"
    assert pair.counts(min_readers=2, min_diameter_mm=0)
    assert not lone_ref.counts(min_readers=2, min_diameter_mm=0)
    assert lone_ref.counts(min_readers=1, min_diameter_mm=0)
    assert not pair.counts(min_readers=2, min_diameter_mm=1e3)


def test_three_readers_consensus_is_two_of_three(small: CtGrid) -> None:
    outlines = [square(10, 10, 6), square(12, 10, 6), square(14, 10, 6)]
    read = parse_lidc_xml(
        lidc_xml(
            small.StudyInstanceUID,
            small.SeriesInstanceUID,
            [[[roi(small, 5, o)]] for o in outlines],
        )
    )
    [nodule] = reference_nodules(read, small)
    assert nodule.readers == 3
    assert nodule.union.voxels == 10 * 6  # columns 10-19
    assert nodule.consensus.voxels == 6 * 6  # columns 12-17: two or three readers
    assert nodule.volume_ml == pytest.approx(36 * small.voxel_ml)


def test_outline_on_an_unknown_image_is_a_mismatch(small: CtGrid) -> None:
    read = parse_lidc_xml(lidc_xml("1", "2", [[[("9.9.9", 9999.0, True, square(5, 5, 5))]]]))
    with pytest.raises(ReferenceMismatchError, match="not a slice"):
        rasterise(read.nodules[0], small)
    # Known by position alone (some reads carry other SOP UIDs): placed by imageZposition.
    read = parse_lidc_xml(lidc_xml("1", "2", [[[("9.9.9", small.z_mm[3], True, square(5, 5, 5))]]]))
    assert rasterise(read.nodules[0], small)[3].sum() == 25
    read = parse_lidc_xml(lidc_xml("1", "2", [[[roi(small, 3, square(38, 5, 5))]]]))
    with pytest.raises(ReferenceMismatchError, match="outside"):
        rasterise(read.nodules[0], small)


def test_not_lidc_is_a_format_error(tmp_path: Path) -> None:
    other = tmp_path / "other.xml"
    other.write_text("<Other/>")
    broken = tmp_path / "broken.xml"
    broken.write_text("<LidcReadMessage>")
    assert not is_lidc_xml(other) and not is_lidc_xml(tmp_path / "missing.xml")
    with pytest.raises(LidcFormatError, match="not LidcReadMessage"):
        parse_lidc_xml(other)
    with pytest.raises(LidcFormatError, match="not readable"):
        parse_lidc_xml(broken)
    with pytest.raises(LidcFormatError, match="bad coordinate"):
        parse_lidc_xml(lidc_xml("1", "2", [[[("1", 0.0, True, [(1, 1), ("x", 2)])]]]))  # type: ignore[list-item]


def test_synthetic_tumour_outlined_like_lidc_gives_its_truth(tmp_path: Path) -> None:
    study = synth_ct(
        tmp_path, slices=40, rows=128, columns=128, tumours=1, seed=3, slice_thickness=2.5
    )
    truth = np.load(study.ground_truth)["labels"]
    meta = json.loads(study.truth_json.read_text())
    [tumour] = meta["tumours"]
    [grid] = find_ct_series(tmp_path).values()
    target = truth == tumour["label"]
    rois = []
    for k in np.flatnonzero(target.any(axis=(1, 2))):
        plane = target[k]
        # Boundary pixels (a pixel with a 4-neighbour outside), in order around the centre.
        padded = np.pad(plane, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        rr, cc = np.nonzero(plane & ~inner)
        order = np.argsort(np.arctan2(rr - rr.mean(), cc - cc.mean()))
        rois.append(roi(grid, int(k), [(int(cc[i]), int(rr[i])) for i in order]))
    read = parse_lidc_xml(lidc_xml(study.StudyInstanceUID, study.SeriesInstanceUID, [[rois]]))
    [nodule] = reference_nodules(read, grid)
    assert dice(nodule.consensus.full(), target) >= 0.95
    assert nodule.volume_ml == pytest.approx(tumour["volume_ml"], rel=0.1)
    assert nodule.diameter_mm == pytest.approx(2 * tumour["radius_mm"], abs=2 * 128 / 360 * 3)


@pytest.fixture(scope="module")
def real() -> tuple[CtGrid, list]:
    require_lidc()
    read = parse_lidc_xml(LIDC_XML)
    grid = find_ct_series(LIDC_DICOM)[read.SeriesInstanceUID or ""]
    return grid, reference_nodules(read, grid)


def test_real_case_has_four_readers_and_one_nodule(real: tuple[CtGrid, list]) -> None:
    read = parse_lidc_xml(LIDC_XML)
    assert read.readers == 4 and len(read.nodules) == 4  # the < 3 mm marks are left out
    assert is_lidc_xml(LIDC_XML)
    grid, nodules = real
    assert grid.shape == (133, 512, 512)
    [nodule] = nodules
    assert nodule.readers == 4 and nodule.counts(min_readers=2, min_diameter_mm=10)


def test_real_nodule_size_and_place(real: tuple[CtGrid, list]) -> None:
    grid, [nodule] = real
    # README: about 25 mm, ≈ 7.8 mL at 50 % agreement, slices ~87-94 from the feet. The 25 mm
    # is the equivalent sphere's; the spiculated nodule's longest axial diameter is longer.
    assert 5.0 <= nodule.volume_ml <= 10.0
    equivalent = (6 * nodule.volume_ml * 1000 / math.pi) ** (1 / 3)
    assert 20.0 <= equivalent <= 30.0
    assert 25.0 <= nodule.diameter_mm <= 36.0 and nodule.diameter_source == "consensus"
    k = nodule.consensus.centroid()[0] + 1  # 1-based, from the feet
    assert 86 <= k <= 95
    # Patient left: +x in LPS, i.e. right of the image centre for this orientation.
    assert nodule.consensus.centroid()[2] > grid.columns / 2
