"""DICOM SEG on a CT grid: segment roles, pixels by source instance and by plane position."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from radfusion.evaluation.grid import CtGrid, ReferenceMismatchError, find_ct_series
from radfusion.evaluation.reference_seg import (
    is_seg,
    read_reference_seg,
    read_segments,
    seg_source_uids,
    segment_role,
    volume_on_grid,
)
from radfusion.synth.ct_series import synth_ct
from tests.unit.evaluation.support import write_seg


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> CtGrid:
    root = tmp_path_factory.mktemp("refseg")
    synth_ct(root, slices=12, rows=48, columns=40, tumours=0)
    [g] = find_ct_series(root).values()
    return g


def coded(value: str, meaning: str, modifier: str | None = None) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    if modifier is not None:
        mod = Dataset()
        mod.CodeValue, mod.CodingSchemeDesignator, mod.CodeMeaning = modifier, "SCT", "side"
        item.SegmentedPropertyTypeModifierCodeSequence = [mod]
    return item


def segment(label: str, type_code: Dataset) -> Dataset:
    item = Dataset()
    item.SegmentLabel = label
    item.SegmentedPropertyTypeCodeSequence = [type_code]
    return item


@pytest.mark.parametrize(
    ("label", "type_code", "expected"),
    [
        ("Right lung", coded("39607008", "Lung", "24028007"), ("lung", "right")),
        ("Left lung", coded("39607008", "Lung", "7771000"), ("lung", "left")),
        ("Segment_1", coded("44029006", "Left lung"), ("lung", "left")),
        ("right lung", coded("85756007", "Tissue"), ("lung", "right")),
        ("Lungs", coded("85756007", "Tissue"), ("lung", None)),
        ("Tumour 1", coded("108369006", "Neoplasm"), ("lesion", None)),
        ("Lung nodule", coded("27925004", "Nodule"), ("lesion", None)),
        ("Segment_2", coded("85756007", "Tissue"), ("lesion", None)),
    ],
)
def test_segment_role(label: str, type_code: Dataset, expected: tuple) -> None:
    assert segment_role(segment(label, type_code)) == expected


def test_segments_read_back_on_the_grid(grid: CtGrid, tmp_path: Path) -> None:
    lung = np.zeros(grid.shape, dtype=bool)
    lung[2:10, 10:30, 5:18] = True
    nodule = np.zeros(grid.shape, dtype=bool)
    nodule[4:7, 15:20, 8:12] = True
    path = write_seg(tmp_path / "ref.dcm", grid, [("Right lung", lung), ("Nodule 1", nodule)])
    assert is_seg(path) and not is_seg(grid.files[0])
    assert seg_source_uids(path) == (grid.StudyInstanceUID, [grid.SeriesInstanceUID])
    first, second = read_segments(path, grid)
    assert (first.label, first.kind, first.side) == ("Right lung", "lung", "right")
    assert (second.label, second.kind) == ("Nodule 1", "lesion")
    assert np.array_equal(first.mask.full(), lung) and np.array_equal(second.mask.full(), nodule)
    reference = read_reference_seg(path, grid)
    [ref] = reference.nodules
    assert ref.readers is None and ref.volume_ml == pytest.approx(60 * grid.voxel_ml)
    assert np.array_equal(reference.lungs["right"].full(), lung)


def test_plane_positions_place_the_same_pixels(grid: CtGrid, tmp_path: Path) -> None:
    nodule = np.zeros(grid.shape, dtype=bool)
    nodule[3:8, 5:9, 20:33] = True
    path = write_seg(tmp_path / "ref.dcm", grid, [("Nodule", nodule)])
    volume = hd.seg.segread(path).get_volume(dtype=np.uint8)
    placed = volume_on_grid(np.asarray(volume.array), np.asarray(volume.affine), grid)
    assert np.array_equal(placed[..., 0] > 0, nodule)
    shifted = np.asarray(volume.affine).copy()
    shifted[:3, 3] += 0.5 * np.asarray(grid.orientation[:3]) * grid.pixel_spacing[1]
    with pytest.raises(ReferenceMismatchError, match="between"):
        volume_on_grid(np.asarray(volume.array), shifted, grid)


def test_seg_of_another_series_is_a_mismatch(grid: CtGrid, tmp_path: Path) -> None:
    other_root = tmp_path / "other"
    synth_ct(other_root, slices=12, rows=48, columns=40, tumours=0, seed=9)
    [other] = find_ct_series(other_root).values()
    mask = np.zeros(other.shape, dtype=bool)
    mask[1, 1, 1] = True
    path = write_seg(tmp_path / "other.dcm", other, [("Nodule", mask)])
    with pytest.raises(ReferenceMismatchError, match="another series"):
        read_segments(path, grid)
