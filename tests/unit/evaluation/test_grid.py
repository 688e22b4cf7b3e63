"""The evaluation's grid helpers: masks, diameters, kernel classes, CT series discovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radfusion.evaluation.grid import Mask, find_ct_series, kernel_class, longest_axial_diameter_mm
from radfusion.synth.ct_series import synth_ct


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ("STANDARD", "soft"),
        ("SOFT", "soft"),
        ("LUNG", "sharp"),
        ("BONE", "sharp"),
        ("B30f", "soft"),
        ("Br40d", "soft"),
        ("B70f", "sharp"),
        ("I50f\\3", "sharp"),
        ("FC13", "soft"),
        ("FC51", "sharp"),
        ("C", "soft"),
        ("L", "sharp"),
        ("", "unknown"),
        ("XYZ", "unknown"),
    ],
)
def test_kernel_class(kernel: str, expected: str) -> None:
    assert kernel_class(kernel) == expected


def test_mask_keeps_its_bounding_box_and_round_trips() -> None:
    full = np.zeros((5, 10, 12), dtype=bool)
    full[1:3, 2:5, 7:11] = True
    mask = Mask.from_full(full)
    assert mask.offset == (1, 2, 7) and mask.array.shape == (2, 3, 4)
    assert np.array_equal(mask.full(), full) and mask.voxels == 24
    assert np.allclose(mask.centroid(), [1.5, 3.0, 8.5])
    assert mask.contains((1.4, 3.0, 9.0)) and not mask.contains((0.0, 3.0, 9.0))
    empty = Mask.from_full(np.zeros((2, 3, 4), dtype=bool))
    assert empty.voxels == 0 and not empty.full().any() and not empty.contains((0, 0, 0))
    with pytest.raises(ValueError, match="empty"):
        empty.centroid()


def test_longest_axial_diameter_is_between_voxel_centres_in_mm() -> None:
    mask = np.zeros((3, 20, 20), dtype=bool)
    mask[1, 5:15, 5:15] = True  # 10 × 10 pixels: diagonal 9√2 pixel steps
    assert longest_axial_diameter_mm(mask, (0.5, 2.0)) == pytest.approx(np.hypot(4.5, 18.0))
    mask[2, 0, 0:20] = True  # a longer line on another slice wins
    assert longest_axial_diameter_mm(mask, (0.5, 2.0)) == pytest.approx(38.0)
    assert longest_axial_diameter_mm(np.zeros((1, 2, 2), dtype=bool), (1.0, 1.0)) == 0.0


def test_find_ct_series_reads_the_grid_and_skips_other_files(tmp_path: Path) -> None:
    study = synth_ct(tmp_path / "ct", slices=12, rows=32, columns=32, tumours=0)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")
    [grid] = find_ct_series(tmp_path).values()
    assert grid.SeriesInstanceUID == study.SeriesInstanceUID
    assert grid.shape == (12, 32, 32)
    assert list(grid.z_mm) == sorted(grid.z_mm)
    assert grid.slice_spacing_mm == pytest.approx(2.5)
    assert grid.slice_at_z(grid.z_mm[3] + 1.0) == 3 and grid.slice_at_z(1e6) is None
