"""Measurement: a class map from the synthetic truth gives right and left lungs on the patient's
sides and one finding per tumour whose volume, side, diameter, HU and centroid match the truth;
deterministic tracking UIDs; no lungs means out of scope; small blobs are ignored; lungs that
touch at the midline are still split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID
from scipy import ndimage

from radfusion.operators.measurement import (
    LUNG,
    MIN_LUNG_COMPONENT_ML,
    MIN_LUNG_ML,
    MIN_TUMOUR_MM3,
    TUMOUR,
    Measured,
    measure,
)
from radfusion.operators.results import Finding, SegmentationResult
from radfusion.operators.volume import Volume, assemble_volume
from radfusion.synth.ct import (
    LABELS,
    NOISE_SIGMA_HU,
    TUMOUR_LABEL_BASE,
    Phantom,
    make_phantom,
    write_ct_series,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1234.9."
PIXEL_SPACING, SLICE_THICKNESS = 3.5, 5.0
VOXEL_MM3 = PIXEL_SPACING * PIXEL_SPACING * SLICE_THICKNESS
VOXEL_DIAGONAL_MM = float(np.sqrt(2 * PIXEL_SPACING**2 + SLICE_THICKNESS**2))


@dataclasses.dataclass(frozen=True)
class Case:
    phantom: Phantom
    volume: Volume
    classes: np.ndarray
    measured: Measured

    @property
    def result(self) -> SegmentationResult:
        assert self.measured.result is not None, self.measured.out_of_scope_reason
        return self.measured.result

    def lungs(self) -> list[Finding]:
        return [f for f in self.result.findings if f.kind == "lung"]

    def tumours(self) -> list[Finding]:
        return [f for f in self.result.findings if f.kind == "tumour"]


def class_map(labels: np.ndarray) -> np.ndarray:
    """What a perfect model outputs: 1 for lung, 2 for tumour."""
    classes = np.zeros(labels.shape, dtype=np.uint8)
    classes[(labels == LABELS["right_lung"]) | (labels == LABELS["left_lung"])] = LUNG
    classes[labels >= TUMOUR_LABEL_BASE] = TUMOUR
    return classes


def phantom_volume(phantom: Phantom, tmp_path_factory: pytest.TempPathFactory) -> Volume:
    study = write_ct_series(phantom, tmp_path_factory.mktemp("ct"))
    return assemble_volume([pydicom.dcmread(f) for f in study.files])


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    # Seed 2: three tumours, two in the right lung and one in the left, of distinct sizes.
    phantom = make_phantom(
        slices=24,
        rows=96,
        columns=96,
        pixel_spacing=PIXEL_SPACING,
        slice_thickness=SLICE_THICKNESS,
        tumours=3,
        seed=2,
    )
    assert sorted(t.side for t in phantom.tumours) == ["left", "right", "right"]
    volume = phantom_volume(phantom, tmp_path_factory)
    classes = class_map(phantom.labels)
    return Case(phantom, volume, classes, measure(classes, volume, uid_root=UID_ROOT))


def lps(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """LPS (x, y, z) of the centre of every voxel of ``mask``, one row each."""
    k, r, c = np.nonzero(mask)
    return (volume.affine @ np.stack([c, r, k, np.ones_like(k)]))[:3].T


def voxel_x(volume: Volume) -> np.ndarray:
    """LPS x of every voxel, [k, r, c]."""
    k, r, c = np.indices(volume.shape)
    a = volume.affine
    return a[0, 0] * c + a[0, 1] * r + a[0, 2] * k + a[0, 3]


# -- lungs -----------------------------------------------------------------------------------


def test_right_and_left_lungs_are_on_the_patients_sides(case: Case) -> None:
    right, left = case.lungs()
    assert (right.side, right.segment_number, right.tracking_id) == ("right", 1, "Right lung")
    assert (left.side, left.segment_number, left.tracking_id) == ("left", 2, "Left lung")
    assert right.centroid_lps[0] < -30 and left.centroid_lps[0] > 30  # LPS: +x is left
    labels = case.result.labels
    truth = case.phantom.labels
    np.testing.assert_array_equal(labels == 1, truth == LABELS["right_lung"])
    np.testing.assert_array_equal(labels == 2, truth == LABELS["left_lung"])
    for finding, label in ((right, "right_lung"), (left, "left_lung")):
        assert finding.volume_mm3 == pytest.approx((truth == LABELS[label]).sum() * VOXEL_MM3)
        assert finding.mean_hu == pytest.approx(-850, abs=3)
        assert finding.sd_hu == pytest.approx(NOISE_SIGMA_HU, rel=0.1)


def test_result_shape_and_segment_numbers(case: Case) -> None:
    result = case.result
    assert case.measured.out_of_scope_reason is None
    assert result.labels.shape == case.volume.shape
    assert result.labels.dtype == np.uint8
    numbers = [f.segment_number for f in result.findings]
    assert numbers == list(range(1, len(case.phantom.tumours) + 3))
    assert set(np.unique(result.labels)) == {0, *numbers}
    for finding in result.findings:
        count = int((result.labels == finding.segment_number).sum())
        assert finding.volume_mm3 == pytest.approx(count * VOXEL_MM3)
    assert not np.any(result.labels[case.classes == 0])


def test_lung_side_follows_lps_not_the_column_index(case: Case) -> None:
    # The same anatomy stored with columns reversed (ImageOrientationPatient -1,0,0): the right
    # lung now lies at high column indices but is still the right lung.
    columns = case.volume.shape[2]
    affine = case.volume.affine.copy()
    affine[:3, 3] = affine[:3, 3] + (columns - 1) * affine[:3, 0]
    affine[:3, 0] = -affine[:3, 0]
    flipped = dataclasses.replace(case.volume, hu=case.volume.hu[:, :, ::-1].copy(), affine=affine)
    measured = measure(case.classes[:, :, ::-1].copy(), flipped, uid_root=UID_ROOT)
    assert measured.result is not None
    truth = case.phantom.labels[:, :, ::-1]
    np.testing.assert_array_equal(measured.result.labels == 1, truth == LABELS["right_lung"])
    findings = measured.result.findings
    assert [(f.kind, f.side) for f in findings[:2]] == [("lung", "right"), ("lung", "left")]
    for a, b in zip(findings, case.result.findings, strict=True):
        assert (a.tracking_id, a.side) == (b.tracking_id, b.side)
        assert a.volume_mm3 == pytest.approx(b.volume_mm3)
        np.testing.assert_allclose(a.centroid_lps, b.centroid_lps, atol=1e-6)


# -- tumours ---------------------------------------------------------------------------------


def matched(case: Case) -> list[tuple[Finding, object]]:
    """Each truth tumour with the finding whose labels are exactly its voxels."""
    out = []
    for tumour in case.phantom.tumours:
        truth = case.phantom.labels == tumour.label
        numbers = np.unique(case.result.labels[truth])
        assert len(numbers) == 1, f"tumour {tumour.label} split over segments {numbers}"
        np.testing.assert_array_equal(case.result.labels == numbers[0], truth)
        (finding,) = [f for f in case.result.findings if f.segment_number == numbers[0]]
        out.append((finding, tumour))
    return out


def test_one_finding_per_tumour(case: Case) -> None:
    tumours = case.tumours()
    assert len(tumours) == len(case.phantom.tumours)
    pairs = matched(case)
    assert len({f.segment_number for f, _ in pairs}) == len(pairs)
    for finding, tumour in pairs:
        assert finding.kind == "tumour"
        assert finding.volume_mm3 == pytest.approx(tumour.volume_mm3, rel=0.01)
        assert finding.side == tumour.side


def test_tumours_are_numbered_largest_first(case: Case) -> None:
    tumours = case.tumours()
    volumes = [f.volume_mm3 for f in tumours]
    assert volumes == sorted(volumes, reverse=True)
    assert len(set(volumes)) == len(volumes)  # distinct, so the order is meaningful
    assert [f.tracking_id for f in tumours] == [f"Tumour {i}" for i in range(1, len(tumours) + 1)]
    assert [f.segment_number for f in tumours] == list(range(3, 3 + len(tumours)))


def test_longest_axial_diameter(case: Case) -> None:
    for finding, tumour in matched(case):
        d = finding.longest_axial_diameter_mm
        # Voxel centres lie within the sphere, so no in-plane chord exceeds 2r; the equatorial
        # slice is at most half a slice from the centre, so it loses less than a voxel diagonal.
        assert 2 * tumour.radius_mm - VOXEL_DIAGONAL_MM <= d <= 2 * tumour.radius_mm + 1e-6
        a, b = (np.asarray(p) for p in finding.diameter_endpoints_lps)
        assert np.linalg.norm(a - b) == pytest.approx(d)
        assert a[2] == pytest.approx(b[2])  # axial: both ends on one slice
        for end in (a, b):
            assert np.linalg.norm(end - tumour.centre_mm) <= tumour.radius_mm + 1e-6


def test_longest_axial_diameter_is_the_true_maximum(case: Case) -> None:
    # Brute force over every pair of voxel centres on each slice.
    for finding, tumour in matched(case):
        mask = case.phantom.labels == tumour.label
        best = 0.0
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            on_slice = np.zeros_like(mask)
            on_slice[k] = mask[k]
            points = lps(case.volume, on_slice)
            d = np.linalg.norm(points[:, None] - points[None], axis=-1)
            best = max(best, float(d.max()))
        assert finding.longest_axial_diameter_mm == pytest.approx(best)


def test_mean_hu_and_centroid(case: Case) -> None:
    for finding, tumour in matched(case):
        n = round(tumour.volume_mm3 / VOXEL_MM3)
        assert finding.mean_hu == pytest.approx(tumour.hu, abs=5 * NOISE_SIGMA_HU / np.sqrt(n))
        values = case.volume.hu[case.phantom.labels == tumour.label]
        assert finding.mean_hu == pytest.approx(float(values.mean()))
        assert finding.sd_hu == pytest.approx(float(values.std()))
        half_voxel = np.array([PIXEL_SPACING, PIXEL_SPACING, SLICE_THICKNESS]) / 2
        assert np.all(np.abs(np.subtract(finding.centroid_lps, tumour.centre_mm)) <= half_voxel)


# -- tracking UIDs ---------------------------------------------------------------------------


def test_tracking_uids_are_valid_distinct_and_deterministic(case: Case) -> None:
    uids = [f.tracking_uid for f in case.result.findings]
    assert len(set(uids)) == len(uids)
    assert all(UID(u).is_valid and u.startswith(UID_ROOT) for u in uids)
    again = measure(case.classes.copy(), case.volume, uid_root=UID_ROOT)
    assert again.result is not None
    assert [f.tracking_uid for f in again.result.findings] == uids
    assert again.result.findings == case.result.findings
    np.testing.assert_array_equal(again.result.labels, case.result.labels)


def test_tracking_uids_depend_on_the_series_and_root(case: Case) -> None:
    source = Dataset()
    source.SeriesInstanceUID = UID_ROOT + "123"
    other_series = dataclasses.replace(case.volume, source_images=(source,) * case.volume.shape[0])
    measured = measure(case.classes, other_series, uid_root=UID_ROOT)
    assert measured.result is not None
    ours = {f.tracking_uid for f in case.result.findings}
    assert ours.isdisjoint(f.tracking_uid for f in measured.result.findings)
    other_root = measure(case.classes, case.volume, uid_root="1.2.826.0.1.3680043.10.1234.8.")
    assert other_root.result is not None
    assert all(
        f.tracking_uid.startswith("1.2.826.0.1.3680043.10.1234.8.")
        for f in other_root.result.findings
    )


# -- out of scope and refusals ---------------------------------------------------------------


def test_abdomen_without_lungs_is_out_of_scope(tmp_path_factory: pytest.TempPathFactory) -> None:
    phantom = make_phantom(
        slices=24,
        rows=96,
        columns=96,
        pixel_spacing=PIXEL_SPACING,
        slice_thickness=SLICE_THICKNESS,
        chest=False,
        seed=1,
    )
    volume = phantom_volume(phantom, tmp_path_factory)
    classes = class_map(phantom.labels)
    assert not classes.any()
    measured = measure(classes, volume, uid_root=UID_ROOT)
    assert measured.result is None
    assert measured.out_of_scope_reason is not None
    assert "no lungs" in measured.out_of_scope_reason


def test_empty_class_map_is_out_of_scope(case: Case) -> None:
    measured = measure(np.zeros_like(case.classes), case.volume, uid_root=UID_ROOT)
    assert measured.result is None
    assert "lungs" in (measured.out_of_scope_reason or "")


def test_tumours_without_lungs_are_out_of_scope(case: Case) -> None:
    classes = np.where(case.classes == TUMOUR, TUMOUR, 0).astype(np.uint8)
    measured = measure(classes, case.volume, uid_root=UID_ROOT)
    assert measured.result is None
    assert "no lungs found" in (measured.out_of_scope_reason or "")


def test_shape_mismatch_is_refused(case: Case) -> None:
    with pytest.raises(ValueError, match="shape"):
        measure(case.classes[:, :-1], case.volume, uid_root=UID_ROOT)
    with pytest.raises(ValueError, match="shape"):
        measure(case.classes.transpose(0, 2, 1)[:-1], case.volume, uid_root=UID_ROOT)


# -- thresholds and lungs touching, on a hand-made volume ------------------------------------

GRID = (20, 40, 60)  # [k, r, c], 2 mm voxels: 8 mm³
GRID_MM = 2.0
GRID_VOXEL_MM3 = GRID_MM**3


def grid_volume() -> Volume:
    """A 2 mm grid centred on x = 0 (column 29.5), so columns < 30 are the patient's right."""
    affine = np.diag([GRID_MM, GRID_MM, GRID_MM, 1.0])
    affine[:3, 3] = [-(GRID[2] - 1) / 2 * GRID_MM, -40.0, -100.0]
    source = Dataset()
    source.SeriesInstanceUID = UID_ROOT + "4242"
    return Volume(
        hu=np.full(GRID, -850.0, dtype=np.float32),
        spacing_mm=(GRID_MM, GRID_MM, GRID_MM),
        affine=affine,
        FrameOfReferenceUID=UID_ROOT + "4243",
        source_images=(source,) * GRID[0],
        frame_numbers=(1,) * GRID[0],
    )


def box_lungs() -> np.ndarray:
    """Two separate box lungs, 16×30×20 voxels (76.8 mL) each."""
    classes = np.zeros(GRID, dtype=np.uint8)
    classes[2:18, 5:35, 4:24] = LUNG  # right: x < 0
    classes[2:18, 5:35, 36:56] = LUNG  # left: x > 0
    return classes


def test_grid_volume_is_what_the_tests_assume() -> None:
    volume = grid_volume()
    x = voxel_x(volume)
    assert np.all(x[:, :, :30] < 0) and np.all(x[:, :, 30:] > 0)
    lung_ml = (box_lungs() == LUNG).sum() * GRID_VOXEL_MM3 / 1000
    assert lung_ml >= MIN_LUNG_ML


def test_tumour_blobs_below_the_threshold_are_ignored() -> None:
    assert 3 * GRID_VOXEL_MM3 < MIN_TUMOUR_MM3 <= 4 * GRID_VOXEL_MM3
    classes = box_lungs()
    classes[5, 10, 8:11] = TUMOUR  # 3 voxels, 24 mm³: noise
    classes[10, 20, 40:42] = TUMOUR  # 2×2 voxels, 32 mm³: a finding
    classes[11, 20, 40:42] = TUMOUR
    classes[15, 30, 10] = TUMOUR  # 1 voxel
    measured = measure(classes, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is not None
    tumours = [f for f in measured.result.findings if f.kind == "tumour"]
    assert len(tumours) == 1
    (tumour,) = tumours
    assert tumour.volume_mm3 == pytest.approx(4 * GRID_VOXEL_MM3)
    assert tumour.side == "left"
    labels = measured.result.labels
    assert labels[5, 10, 8] == 0 and labels[15, 30, 10] == 0
    assert labels[10, 20, 40] == tumour.segment_number


def test_lung_fragments_below_the_threshold_are_ignored() -> None:
    classes = box_lungs()
    # A detached 4.8 mL fragment on the right (ignored) and a 5.12 mL one on the left (kept,
    # part of the left lung).
    classes[0, 0:30, 4:24] = LUNG  # 600 voxels
    classes[19, 0:32, 36:56] = LUNG  # 640 voxels
    assert 600 * GRID_VOXEL_MM3 / 1000 < MIN_LUNG_COMPONENT_ML <= 640 * GRID_VOXEL_MM3 / 1000
    measured = measure(classes, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is not None
    right, left = measured.result.findings
    assert (right.side, left.side) == ("right", "left")
    assert right.volume_mm3 == pytest.approx(16 * 30 * 20 * GRID_VOXEL_MM3)
    assert left.volume_mm3 == pytest.approx((16 * 30 * 20 + 640) * GRID_VOXEL_MM3)
    assert not measured.result.labels[0].any()


def test_too_little_lung_is_out_of_scope() -> None:
    classes = np.zeros(GRID, dtype=np.uint8)
    classes[2:18, 5:35, 4:24] = LUNG  # one lung of 76.8 mL would do ...
    classes[2:18, 5:35, 14:24] = 0  # ... but 38.4 mL is not a chest
    measured = measure(classes, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is None
    assert "38 mL < 50 mL" in (measured.out_of_scope_reason or "")


def test_lungs_touching_at_the_midline_are_split(case: Case) -> None:
    # Bridge the lungs across the mediastinum on a few slices: one connected component.
    classes = case.classes.copy()
    body = case.phantom.labels > 0
    classes[10:13, 44:50, :] = np.where(
        body[10:13, 44:50, :] & (classes[10:13, 44:50, :] == 0), LUNG, classes[10:13, 44:50, :]
    )
    _, n = ndimage.label(classes == LUNG)
    assert n == 1, "the bridge should join the lungs"
    measured = measure(classes, case.volume, uid_root=UID_ROOT)
    assert measured.result is not None
    findings = measured.result.findings
    assert [(f.kind, f.side, f.segment_number) for f in findings[:2]] == [
        ("lung", "right", 1),
        ("lung", "left", 2),
    ]
    x = voxel_x(case.volume)
    lung = classes == LUNG
    labels = measured.result.labels
    np.testing.assert_array_equal(labels == 1, lung & (x < 0))
    np.testing.assert_array_equal(labels == 2, lung & (x >= 0))
    right, left = findings[:2]
    assert right.centroid_lps[0] < -30 and left.centroid_lps[0] > 30
    # The tumours keep their sides.
    assert [f.side for f in findings[2:]] == [f.side for f in case.tumours()]


def test_box_lungs_touching_at_the_midline_are_split() -> None:
    classes = np.zeros(GRID, dtype=np.uint8)
    classes[2:18, 5:35, 10:50] = LUNG  # one block across x = 0
    measured = measure(classes, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is not None
    right, left = measured.result.findings
    assert (right.side, left.side) == ("right", "left")
    half = 16 * 30 * 20 * GRID_VOXEL_MM3
    assert right.volume_mm3 == pytest.approx(half) and left.volume_mm3 == pytest.approx(half)
    assert np.all(measured.result.labels[:, :, 10:30][classes[:, :, 10:30] == LUNG] == 1)
    assert np.all(measured.result.labels[:, :, 30:50][classes[:, :, 30:50] == LUNG] == 2)


def test_touching_lungs_with_a_detached_fragment_are_still_split() -> None:
    classes = np.zeros(GRID, dtype=np.uint8)
    classes[2:18, 5:35, 10:30] = LUNG  # right lung, 76.8 mL
    classes[2:18, 5:35, 30:54] = LUNG  # left lung, larger (92.2 mL), touching the right one
    classes[19, 0:32, 10:30] = LUNG  # a detached right basal fragment: 640 voxels, 5.12 mL
    measured = measure(classes, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is not None
    right, left = measured.result.findings[:2]
    assert (right.side, left.side) == ("right", "left")
    labels = measured.result.labels
    # Expected: the right lung is everything on the right (x < 0), block and fragment.
    assert right.volume_mm3 == pytest.approx((16 * 30 * 20 + 640) * GRID_VOXEL_MM3)
    assert left.volume_mm3 == pytest.approx(16 * 30 * 24 * GRID_VOXEL_MM3)
    assert np.all(labels[2:18, 5:35, 10:30] == 1)


def test_one_lung_off_the_field_centre_is_not_split_into_two() -> None:
    """A field of view on the right hemithorax: one lung, wholly right of the isocentre."""
    classes = np.zeros(GRID, dtype=np.uint8)
    classes[2:18, 5:35, 0:26] = LUNG  # x from -59 to -9 mm: all on the patient's right
    measured = measure(classes, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is not None
    [right] = measured.result.findings
    assert right.side == "right" and right.tracking_id == "Right lung"


def test_two_lungs_of_a_patient_off_the_table_centre_keep_their_sides() -> None:
    classes = np.zeros(GRID, dtype=np.uint8)
    classes[2:18, 5:35, 36:46] = LUNG  # both lungs left of x = 0: the patient lies off-centre
    classes[2:18, 5:35, 50:60] = LUNG
    measured = measure(classes, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is not None
    right, left = measured.result.findings
    assert (right.side, left.side) == ("right", "left")
    assert right.centroid_lps[0] < left.centroid_lps[0]


def brute_force_diameter(volume: Volume, mask: np.ndarray) -> float:
    """Longest in-plane distance between the centres of ``mask``'s voxels, slice by slice."""
    best = 0.0
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        on_slice = np.zeros_like(mask)
        on_slice[k] = mask[k]
        points = lps(volume, on_slice)
        best = max(best, float(np.linalg.norm(points[:, None] - points[None], axis=-1).max()))
    return best


def lungs_with_a_fragment_on_their_rows() -> np.ndarray:
    """Two lungs, the right one with a detached 7.68 mL fragment beside it on the same slices
    and rows, further out: the right lung's longest diameter runs from the fragment."""
    classes = np.zeros(GRID, dtype=np.uint8)
    k, r, c = np.indices(GRID)
    classes[((k - 10) / 8) ** 2 + ((r - 20) / 15) ** 2 + ((c - 16) / 8) ** 2 <= 1] = LUNG
    classes[2:18, 5:35, 36:56] = LUNG
    classes[4:12, 5:35, 2:6] = LUNG  # 960 voxels; columns 6-7 stay empty
    return classes


def touching_lungs_with_a_fragment() -> np.ndarray:
    """One block across x = 0 (split into right and left) and a fragment on its left rows."""
    classes = np.zeros(GRID, dtype=np.uint8)
    classes[2:18, 5:35, 8:50] = LUNG
    classes[2:18, 5:12, 30:50] = 0  # a notch: the halves differ in shape
    classes[6:14, 10:30, 54:58] = LUNG  # 640 voxels; columns 50-53 stay empty
    return classes


@pytest.mark.parametrize(
    "layout", [lungs_with_a_fragment_on_their_rows, touching_lungs_with_a_fragment]
)
def test_lungs_in_pieces_are_measured_over_all_their_voxels(layout: object) -> None:
    classes = layout()  # type: ignore[operator]
    rng = np.random.default_rng(7)
    volume = dataclasses.replace(grid_volume(), hu=rng.normal(-850, 40, GRID).astype(np.float32))
    measured = measure(classes, volume, uid_root=UID_ROOT)
    assert measured.result is not None
    labels = measured.result.labels
    np.testing.assert_array_equal(labels > 0, classes == LUNG)  # every piece is in a lung
    for finding in measured.result.findings:
        mask = labels == finding.segment_number
        assert finding.volume_mm3 == pytest.approx(mask.sum() * GRID_VOXEL_MM3)
        np.testing.assert_allclose(finding.centroid_lps, lps(volume, mask).mean(axis=0))
        values = volume.hu[mask].astype(np.float64)
        assert finding.mean_hu == pytest.approx(values.mean())
        assert finding.sd_hu == pytest.approx(values.std())
        d = finding.longest_axial_diameter_mm
        assert d == pytest.approx(brute_force_diameter(volume, mask))
        a, b = (np.asarray(p) for p in finding.diameter_endpoints_lps)
        assert np.linalg.norm(a - b) == pytest.approx(d) and a[2] == pytest.approx(b[2])


def test_hundreds_of_tumour_candidates_report_the_largest_only(case: Case) -> None:
    """A speckled tumour map must not overflow the uint8 label map (it used to raise)."""
    from radfusion.operators.measurement import MAX_TUMOURS

    classes = case.classes.copy()
    classes[classes == TUMOUR] = LUNG
    # Isolated one-voxel tumours (61 mm3 each, above MIN_TUMOUR_MM3) on a sparse grid.
    k, r, c = np.nonzero(classes == LUNG)
    grid = (k % 2 == 0) & (r % 3 == 0) & (c % 3 == 0)
    assert grid.sum() > 300  # more than a uint8 label map could number
    classes[k[grid], r[grid], c[grid]] = TUMOUR
    measured = measure(classes, case.volume, uid_root=UID_ROOT)
    assert measured.result is not None
    tumours = [f for f in measured.result.findings if f.kind == "tumour"]
    assert len(tumours) == MAX_TUMOURS
    assert int(measured.result.labels.max()) == MAX_TUMOURS + 2
