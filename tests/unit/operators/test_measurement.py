"""Measurement: what the detection found (lung fields, nodule candidates) → findings.

The anatomy is built by hand from a phantom's truth labels (the lungs as the lung finder gives
them: nodules inside count as lung; one candidate per tumour), so every expected value is
exact: lungs are measured without the nodules, each nodule is one finding numbered in the
detection's order with its score, diameters are the true maxima, HU and centroids the voxels'.
Tracking UIDs are deterministic and depend on the series and the root. No lungs means out of
scope; lungs with problems give no findings, only the reason. Where left and right come from
is :mod:`tests.unit.operators.test_lungs`'s business, not this file's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from radfusion.operators.detection import Anatomy
from radfusion.operators.lungs import LungFields
from radfusion.operators.measurement import MIN_LUNG_ML, Measured, measure
from radfusion.operators.nodules import FEATURES, NoduleCandidate
from radfusion.operators.results import Finding, SegmentationResult
from radfusion.operators.volume import Volume, assemble_volume
from radfusion.synth.ct import LABELS, NOISE_SIGMA_HU, Phantom, Tumour, make_phantom
from radfusion.synth.ct_series import write_ct_series

UID_ROOT = "1.2.826.0.1.3680043.10.1234.9."
PIXEL_SPACING, SLICE_THICKNESS = 3.5, 5.0
VOXEL_MM3 = PIXEL_SPACING * PIXEL_SPACING * SLICE_THICKNESS
VOXEL_DIAGONAL_MM = float(np.sqrt(2 * PIXEL_SPACING**2 + SLICE_THICKNESS**2))
# Detection scores given to the phantom's tumours 0, 1, 2: not in the order of their sizes or
# labels, so that numbering by score is told apart from numbering by anything else.
SCORES = (0.71, 0.93, 0.55)


def box_of(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of a non-empty mask."""
    k, r, c = np.nonzero(mask)
    return (
        slice(int(k.min()), int(k.max()) + 1),
        slice(int(r.min()), int(r.max()) + 1),
        slice(int(c.min()), int(c.max()) + 1),
    )


def candidate(mask: np.ndarray, score: float, *, core_hu: float = 30.0) -> NoduleCandidate:
    """A nodule candidate of the voxels of ``mask`` (volume-shaped)."""
    box = box_of(mask)
    voxels = int(np.count_nonzero(mask))
    diameter = float((6.0 * voxels * VOXEL_MM3 / np.pi) ** (1.0 / 3.0))
    return NoduleCandidate(
        box=box,
        mask=mask[box].copy(),
        score=score,
        diameter_mm=diameter,
        core_hu=core_hu,
        texture="solid",
        features=(0.0,) * len(FEATURES),
    )


def fields_from_truth(
    labels: np.ndarray, problems: tuple[str, ...] = (), tumours: tuple[Tumour, ...] = ()
) -> LungFields:
    """Lung fields as the lung finder gives them: each lung with the tumours inside it."""
    masks = {}
    for side in ("right", "left"):
        mask = labels == LABELS[f"{side}_lung"]
        for tumour in tumours:
            if tumour.side == side:
                mask |= labels == tumour.label
        masks[side] = mask
    lungs = masks["right"] | masks["left"]
    return LungFields(
        right=masks["right"],
        left=masks["left"],
        search=lungs,
        body=labels != LABELS["background"],
        problems=problems,
    )


def anatomy_from_truth(
    phantom: Phantom, scores: tuple[float, ...] = SCORES, statements: tuple[str, ...] = ()
) -> tuple[Anatomy, list[Tumour]]:
    """The anatomy a perfect detector gives; also the tumours in reporting (score) order."""
    ranked = sorted(zip(scores, phantom.tumours, strict=True), key=lambda st: -st[0])
    nodules = tuple(candidate(phantom.labels == t.label, s, core_hu=t.hu) for s, t in ranked)
    fields = fields_from_truth(phantom.labels, tumours=phantom.tumours)
    return Anatomy(fields, nodules, statements, len(nodules)), [t for _, t in ranked]


@dataclasses.dataclass(frozen=True)
class Case:
    phantom: Phantom
    volume: Volume
    anatomy: Anatomy
    ranked: list[Tumour]  # the phantom's tumours, best detection score first
    measured: Measured

    @property
    def result(self) -> SegmentationResult:
        assert self.measured.result is not None, self.measured.out_of_scope_reason
        return self.measured.result

    def lungs(self) -> list[Finding]:
        return [f for f in self.result.findings if f.kind == "lung"]

    def tumours(self) -> list[Finding]:
        return [f for f in self.result.findings if f.kind == "tumour"]


def phantom_volume(phantom: Phantom, tmp_path_factory: pytest.TempPathFactory) -> Volume:
    study = write_ct_series(phantom, tmp_path_factory.mktemp("ct"))
    volume = assemble_volume([pydicom.dcmread(f) for f in study.files])
    # Written in slice order, so the truth is in the volume's k order.
    assert [int(ds.InstanceNumber) for ds in volume.source_images] == list(
        range(1, phantom.hu.shape[0] + 1)
    )
    return volume


STATEMENTS = ("No nodule under 10 mm is reported.",)


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
    anatomy, ranked = anatomy_from_truth(phantom, statements=STATEMENTS)
    measured = measure(anatomy, volume, uid_root=UID_ROOT)
    return Case(phantom, volume, anatomy, ranked, measured)


def lps(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """LPS (x, y, z) of the centre of every voxel of ``mask``, one row each."""
    k, r, c = np.nonzero(mask)
    return (volume.affine @ np.stack([c, r, k, np.ones_like(k)]))[:3].T


def brute_force_diameter(volume: Volume, mask: np.ndarray) -> float:
    """Longest in-plane distance between the centres of ``mask``'s voxels, slice by slice."""
    best = 0.0
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        on_slice = np.zeros_like(mask)
        on_slice[k] = mask[k]
        points = lps(volume, on_slice)
        best = max(best, float(np.linalg.norm(points[:, None] - points[None], axis=-1).max()))
    return best


# -- lungs -----------------------------------------------------------------------------------


def test_lungs_are_the_fields_without_the_nodules(case: Case) -> None:
    right, left = case.lungs()
    assert (right.side, right.segment_number, right.tracking_id) == ("right", 1, "Right lung")
    assert (left.side, left.segment_number, left.tracking_id) == ("left", 2, "Left lung")
    assert right.detection_score is None and left.detection_score is None
    labels = case.result.labels
    truth = case.phantom.labels
    # The fields hold the tumours (holes filled); the lung segments do not.
    fields = case.anatomy.fields
    assert np.count_nonzero(fields.right) > np.count_nonzero(truth == LABELS["right_lung"])
    np.testing.assert_array_equal(labels == 1, truth == LABELS["right_lung"])
    np.testing.assert_array_equal(labels == 2, truth == LABELS["left_lung"])
    for finding, label, mask in (
        (right, "right_lung", fields.right),
        (left, "left_lung", fields.left),
    ):
        in_lung = sum(
            int(np.count_nonzero(truth == t.label))
            for t in case.phantom.tumours
            if t.side == finding.side
        )
        expected = np.count_nonzero(mask) - in_lung
        assert expected == np.count_nonzero(truth == LABELS[label])
        assert finding.volume_mm3 == pytest.approx(expected * VOXEL_MM3)
        assert finding.mean_hu == pytest.approx(-850, abs=3)  # no tumour HU mixed in
        assert finding.sd_hu == pytest.approx(NOISE_SIGMA_HU, rel=0.1)
    assert right.centroid_lps[0] < -30 and left.centroid_lps[0] > 30  # LPS: +x is left


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
    fields = case.anatomy.fields
    assert not np.any(result.labels[~(fields.right | fields.left)])


def test_statements_are_passed_on(case: Case) -> None:
    assert case.measured.statements == STATEMENTS


def test_only_the_lungs_found_are_numbered(case: Case) -> None:
    """A field of view with the left lung only: it is segment 1, the nodules follow."""
    fields = case.anatomy.fields
    only_left = fields.replace(right=np.zeros_like(fields.right))
    left_nodules = tuple(
        n for n, t in zip(case.anatomy.nodules, case.ranked, strict=True) if t.side == "left"
    )
    anatomy = Anatomy(only_left, left_nodules, (), len(left_nodules))
    measured = measure(anatomy, case.volume, uid_root=UID_ROOT)
    assert measured.result is not None
    assert [
        (f.kind, f.side, f.segment_number, f.tracking_id) for f in measured.result.findings
    ] == [
        ("lung", "left", 1, "Left lung"),
        ("tumour", "left", 2, "Tumour 1"),
    ]


# -- tumours ---------------------------------------------------------------------------------


def matched(case: Case) -> list[tuple[Finding, Tumour]]:
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


def test_one_finding_per_nodule(case: Case) -> None:
    tumours = case.tumours()
    assert len(tumours) == len(case.phantom.tumours)
    pairs = matched(case)
    assert len({f.segment_number for f, _ in pairs}) == len(pairs)
    for finding, tumour in pairs:
        assert finding.kind == "tumour"
        assert finding.volume_mm3 == pytest.approx(tumour.volume_mm3, rel=1e-9)
        assert finding.side == tumour.side  # the side of the nearer lung


def test_nodules_are_numbered_best_score_first(case: Case) -> None:
    tumours = case.tumours()
    assert [f.tracking_id for f in tumours] == [f"Tumour {i}" for i in range(1, len(tumours) + 1)]
    assert [f.segment_number for f in tumours] == list(range(3, 3 + len(tumours)))
    assert [f.detection_score for f in tumours] == sorted(SCORES, reverse=True)
    for finding, tumour in zip(tumours, case.ranked, strict=True):
        np.testing.assert_array_equal(
            case.result.labels == finding.segment_number, case.phantom.labels == tumour.label
        )
    # Not the order of size: the score decides.
    volumes = [f.volume_mm3 for f in tumours]
    assert volumes != sorted(volumes, reverse=True)


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
    for finding in case.result.findings:  # lungs and tumours, brute force
        mask = case.result.labels == finding.segment_number
        assert finding.longest_axial_diameter_mm == pytest.approx(
            brute_force_diameter(case.volume, mask)
        )


def test_mean_hu_and_centroid(case: Case) -> None:
    for finding, tumour in matched(case):
        n = round(tumour.volume_mm3 / VOXEL_MM3)
        assert finding.mean_hu == pytest.approx(tumour.hu, abs=5 * NOISE_SIGMA_HU / np.sqrt(n))
        values = case.volume.hu[case.phantom.labels == tumour.label].astype(np.float64)
        assert finding.mean_hu == pytest.approx(float(values.mean()))
        assert finding.sd_hu == pytest.approx(float(values.std()))
        half_voxel = np.array([PIXEL_SPACING, PIXEL_SPACING, SLICE_THICKNESS]) / 2
        assert np.all(np.abs(np.subtract(finding.centroid_lps, tumour.centre_mm)) <= half_voxel)
    for finding in case.lungs():
        mask = case.result.labels == finding.segment_number
        np.testing.assert_allclose(finding.centroid_lps, lps(case.volume, mask).mean(axis=0))


# -- tracking UIDs ---------------------------------------------------------------------------


def test_tracking_uids_are_valid_distinct_and_deterministic(case: Case) -> None:
    uids = [f.tracking_uid for f in case.result.findings]
    assert len(set(uids)) == len(uids)
    assert all(UID(u).is_valid and u.startswith(UID_ROOT) for u in uids)
    again = measure(case.anatomy, case.volume, uid_root=UID_ROOT)
    assert again.result is not None
    assert [f.tracking_uid for f in again.result.findings] == uids
    assert again.result.findings == case.result.findings
    np.testing.assert_array_equal(again.result.labels, case.result.labels)


def test_tracking_uids_depend_on_the_series_and_root(case: Case) -> None:
    source = Dataset()
    source.SeriesInstanceUID = UID_ROOT + "123"
    other_series = dataclasses.replace(case.volume, source_images=(source,) * case.volume.shape[0])
    measured = measure(case.anatomy, other_series, uid_root=UID_ROOT)
    assert measured.result is not None
    ours = {f.tracking_uid for f in case.result.findings}
    assert ours.isdisjoint(f.tracking_uid for f in measured.result.findings)
    other_root = measure(case.anatomy, case.volume, uid_root="1.2.826.0.1.3680043.10.1234.8.")
    assert other_root.result is not None
    assert all(
        f.tracking_uid.startswith("1.2.826.0.1.3680043.10.1234.8.")
        for f in other_root.result.findings
    )
    assert ours.isdisjoint(f.tracking_uid for f in other_root.result.findings)


# -- out of scope, unreliable lungs and refusals ---------------------------------------------


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
    fields = fields_from_truth(phantom.labels, problems=("no lungs found",))
    assert not fields.found
    measured = measure(Anatomy(fields, (), (), 0), volume, uid_root=UID_ROOT)
    assert measured.result is None
    assert (measured.out_of_scope_reason or "").startswith("no lungs found")
    assert "does not appear to be a chest CT" in (measured.out_of_scope_reason or "")


def test_too_little_lung_is_out_of_scope(case: Case) -> None:
    fields = case.anatomy.fields
    voxel_ml = VOXEL_MM3 / 1000.0
    small = np.zeros_like(fields.right)
    small.flat[: int(MIN_LUNG_ML / voxel_ml) - 1] = True  # just under the threshold
    tiny = fields.replace(right=small, left=np.zeros_like(small))
    measured = measure(Anatomy(tiny, case.anatomy.nodules, (), 3), case.volume, uid_root=UID_ROOT)
    assert measured.result is None
    assert (measured.out_of_scope_reason or "").startswith("no lungs found")
    assert f"< {MIN_LUNG_ML:.0f} mL" in (measured.out_of_scope_reason or "")


def test_lungs_with_problems_give_no_findings_only_the_reason(case: Case) -> None:
    problems = ("right lung 7.20 L outside 0.3-6.0 L", "2% of the lungs lie outside the body")
    fields = case.anatomy.fields.replace(problems=problems)
    anatomy = Anatomy(fields, case.anatomy.nodules, STATEMENTS, 3)  # nodules too: not reported
    measured = measure(anatomy, case.volume, uid_root=UID_ROOT)
    assert measured.result is None
    reason = measured.out_of_scope_reason or ""
    assert reason.startswith("the lungs could not be segmented reliably (")
    for problem in problems:
        assert problem in reason


def test_shape_mismatch_is_refused(case: Case) -> None:
    fields = case.anatomy.fields
    cropped = LungFields(
        right=fields.right[:, :-1],
        left=fields.left[:, :-1],
        search=fields.search[:, :-1],
        body=fields.body[:, :-1],
        problems=(),
    )
    with pytest.raises(ValueError, match="shape"):
        measure(Anatomy(cropped, (), (), 0), case.volume, uid_root=UID_ROOT)
    swapped = dataclasses.replace(
        case.volume, hu=np.ascontiguousarray(case.volume.hu.transpose(0, 2, 1)[:-1])
    )
    with pytest.raises(ValueError, match="shape"):
        measure(case.anatomy, swapped, uid_root=UID_ROOT)


# -- overlaps, pieces and numbers, on a hand-made volume -------------------------------------

GRID = (20, 40, 60)  # [k, r, c], 2 mm voxels: 8 mm³
GRID_MM = 2.0
GRID_VOXEL_MM3 = GRID_MM**3


def grid_volume(hu: np.ndarray | None = None) -> Volume:
    """A 2 mm grid centred on x = 0 (column 29.5), so columns < 30 are the patient's right."""
    affine = np.diag([GRID_MM, GRID_MM, GRID_MM, 1.0])
    affine[:3, 3] = [-(GRID[2] - 1) / 2 * GRID_MM, -40.0, -100.0]
    source = Dataset()
    source.SeriesInstanceUID = UID_ROOT + "4242"
    return Volume(
        hu=np.full(GRID, -850.0, dtype=np.float32) if hu is None else hu,
        spacing_mm=(GRID_MM, GRID_MM, GRID_MM),
        affine=affine,
        FrameOfReferenceUID=UID_ROOT + "4243",
        source_images=(source,) * GRID[0],
        frame_numbers=(1,) * GRID[0],
    )


def grid_fields(right: np.ndarray, left: np.ndarray) -> LungFields:
    return LungFields(
        right=right, left=left, search=right | left, body=np.ones(GRID, dtype=bool), problems=()
    )


def box_lungs() -> tuple[np.ndarray, np.ndarray]:
    """Two separate box lungs, 16×30×20 voxels (76.8 mL) each."""
    right, left = np.zeros(GRID, dtype=bool), np.zeros(GRID, dtype=bool)
    right[2:18, 5:35, 4:24] = True  # x < 0
    left[2:18, 5:35, 36:56] = True  # x > 0
    return right, left


def ball(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    k, r, c = np.indices(GRID)
    return (k - centre[0]) ** 2 + (r - centre[1]) ** 2 + (c - centre[2]) ** 2 <= radius**2


def test_overlapping_candidates_keep_shared_voxels_for_the_better_one() -> None:
    right, left = box_lungs()
    better = ball((10, 20, 12), 4)
    worse = ball((10, 20, 16), 4)  # shares about a third of its voxels with ``better``
    inside = ball((10, 20, 12), 2)  # wholly inside ``better``: nothing of its own is left
    apart = ball((10, 20, 46), 3)  # in the left lung
    shared = better & worse
    assert 0 < shared.sum() < worse.sum()
    nodules = tuple(
        candidate(m, s) for m, s in ((better, 0.9), (worse, 0.8), (inside, 0.7), (apart, 0.6))
    )
    anatomy = Anatomy(grid_fields(right, left), nodules, (), 4)
    measured = measure(anatomy, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is not None
    labels = measured.result.labels
    tumours = [f for f in measured.result.findings if f.kind == "tumour"]
    assert [(f.tracking_id, f.segment_number, f.detection_score) for f in tumours] == [
        ("Tumour 1", 3, 0.9),
        ("Tumour 2", 4, 0.8),
        ("Tumour 3", 5, 0.6),
    ]
    np.testing.assert_array_equal(labels == 3, better)
    np.testing.assert_array_equal(labels == 4, worse & ~better)
    np.testing.assert_array_equal(labels == 5, apart)
    assert tumours[1].volume_mm3 == pytest.approx((worse & ~better).sum() * GRID_VOXEL_MM3)
    assert [f.side for f in tumours] == ["right", "right", "left"]
    # The lungs lose every nodule voxel, and nothing else.
    np.testing.assert_array_equal(labels == 1, right & ~(better | worse))
    np.testing.assert_array_equal(labels == 2, left & ~apart)


def test_a_nodule_left_with_one_voxel_per_slice_has_its_ends_on_that_voxel() -> None:
    """What a better candidate leaves of a worse one can be a thin sliver: its diameter is 0
    and both ends lie on its voxel (they once defaulted to the origin, off every image, and
    the SR writer failed the study)."""
    right, left = box_lungs()
    sliver = np.zeros_like(right)
    sliver[10, 20, 14] = sliver[11, 20, 14] = True
    anatomy = Anatomy(grid_fields(right, left), (candidate(sliver, 0.9),), (), 1)
    volume = grid_volume()
    measured = measure(anatomy, volume, uid_root=UID_ROOT)
    assert measured.result is not None
    (tumour,) = [f for f in measured.result.findings if f.kind == "tumour"]
    assert tumour.longest_axial_diameter_mm == 0.0
    voxel = volume.affine @ np.array([14, 20, 10, 1.0])
    for end in tumour.diameter_endpoints_lps:
        np.testing.assert_allclose(end, voxel[:3])


def test_a_nodule_astride_the_lung_border_is_measured_whole() -> None:
    """A juxta-pleural nodule: partly outside the lung field; all of it is the nodule, and the
    lung loses only what it held."""
    right, left = box_lungs()
    nodule = ball((10, 20, 4), 3)  # centred on the right lung's outer face (column 4)
    assert (nodule & ~right).any() and (nodule & right).any()
    anatomy = Anatomy(grid_fields(right, left), (candidate(nodule, 0.8),), (), 1)
    measured = measure(anatomy, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is not None
    labels = measured.result.labels
    np.testing.assert_array_equal(labels == 3, nodule)
    lung_right = measured.result.findings[0]
    assert lung_right.volume_mm3 == pytest.approx((right & ~nodule).sum() * GRID_VOXEL_MM3)


def lungs_with_a_fragment_on_their_rows() -> tuple[np.ndarray, np.ndarray]:
    """Two lungs, the right one with a detached 7.68 mL fragment beside it on the same slices
    and rows, further out: the right lung's longest diameter runs from the fragment."""
    k, r, c = np.indices(GRID)
    right = ((k - 10) / 8) ** 2 + ((r - 20) / 15) ** 2 + ((c - 16) / 8) ** 2 <= 1
    right[4:12, 5:35, 2:6] = True  # 960 voxels; columns 6-7 stay empty
    left = np.zeros(GRID, dtype=bool)
    left[2:18, 5:35, 36:56] = True
    return right, left


def notched_lungs_with_a_fragment() -> tuple[np.ndarray, np.ndarray]:
    """Lungs that touch at x = 0, the left one notched and with a fragment on its rows."""
    right, left = np.zeros(GRID, dtype=bool), np.zeros(GRID, dtype=bool)
    right[2:18, 5:35, 8:30] = True
    left[2:18, 5:35, 30:50] = True
    left[2:18, 5:12, 30:50] = False  # a notch: the halves differ in shape
    left[6:14, 10:30, 54:58] = True  # 640 voxels; columns 50-53 stay empty
    return right, left


@pytest.mark.parametrize(
    "layout", [lungs_with_a_fragment_on_their_rows, notched_lungs_with_a_fragment]
)
def test_lungs_in_pieces_are_measured_over_all_their_voxels(layout: object) -> None:
    right, left = layout()  # type: ignore[operator]
    rng = np.random.default_rng(7)
    volume = grid_volume(rng.normal(-850, 40, GRID).astype(np.float32))
    measured = measure(Anatomy(grid_fields(right, left), (), (), 0), volume, uid_root=UID_ROOT)
    assert measured.result is not None
    labels = measured.result.labels
    np.testing.assert_array_equal(labels == 1, right)
    np.testing.assert_array_equal(labels == 2, left)
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


def test_the_most_nodules_detection_reports_fit_the_label_map() -> None:
    """DetectionSettings allows up to 250 findings: with both lungs, segment 252 still fits
    the uint8 label map, and every nodule keeps its own number."""
    right, left = box_lungs()
    lungs = right | left
    k, r, c = np.nonzero(lungs & (np.indices(GRID)[0] % 3 == 0))
    spots = list(zip(k, r, c, strict=True))[::5][:250]
    assert len(spots) == 250
    nodules = []
    for i, spot in enumerate(spots):
        mask = np.zeros(GRID, dtype=bool)
        mask[spot] = True
        nodules.append(candidate(mask, 1.0 - i / 1000.0))
    anatomy = Anatomy(grid_fields(right, left), tuple(nodules), (), len(nodules))
    measured = measure(anatomy, grid_volume(), uid_root=UID_ROOT)
    assert measured.result is not None
    assert len(measured.result.findings) == 252
    assert int(measured.result.labels.max()) == 252
    for i, spot in enumerate(spots):
        assert measured.result.labels[spot] == 3 + i
