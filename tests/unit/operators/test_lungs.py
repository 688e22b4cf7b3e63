"""Lung fields from CT intensities: right and left lung as the truth has them (Dice), on the
patient's sides whatever the array order or table position, without trachea and main bronchi,
never in the air outside the body; an abdomen has no lungs and says so; on a real chest CT
(LIDC-IDRI-0001) the lungs are of adult size and proportion, on their sides, inside the body,
with no problems reported.

The real case's bounds are the issue's acceptance bounds; nothing in the lung finder is, or may
be, tuned to that case.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radfusion.operators.lungs import (
    LungFields,
    find_lung_fields,
    shrink_slices,
    slice_factor,
    x_of_columns,
)
from radfusion.operators.volume import Volume, assemble_volume
from radfusion.synth.ct import LABELS, STRUCTURES, Phantom, make_phantom

SEEDS = (0, 1)
LIDC_0001 = Path("/work/shared/data/lidc-idri-0001/dicom")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


@dataclasses.dataclass(frozen=True)
class Case:
    phantom: Phantom
    hu: np.ndarray  # float32, as the app's Volume holds it
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    fields: LungFields


def chest(seed: int) -> Case:
    """A realistic chest, 256² at 1.4 mm and 120 slices of 2.5 mm: 30 cm, the whole chest."""
    phantom = make_phantom(
        style="realistic",
        rows=256,
        columns=256,
        pixel_spacing=1.4,
        slices=120,
        slice_thickness=2.5,
        tumours=2,
        seed=seed,
    )
    hu = phantom.hu.astype(np.float32)
    spacing = (phantom.spacing_z, *phantom.pixel_spacing)
    affine = phantom.affine()
    return Case(phantom, hu, spacing, affine, find_lung_fields(hu, spacing, affine))


@pytest.fixture(scope="module", params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def case(request: pytest.FixtureRequest) -> Case:
    return chest(request.param)


def truth_lungs(phantom: Phantom) -> tuple[np.ndarray, np.ndarray]:
    """The truth's lungs with the tumours inside them, as clinical lung masks count them."""
    right = phantom.labels == LABELS["right_lung"]
    left = phantom.labels == LABELS["left_lung"]
    for tumour in phantom.tumours:
        inside = phantom.labels == tumour.label
        if tumour.side == "right":
            right |= inside
        else:
            left |= inside
    return right, left


def centroid_x(mask: np.ndarray, affine: np.ndarray) -> float:
    x = np.broadcast_to(x_of_columns(affine, mask.shape), mask.shape)
    return float(x[mask].mean())


# -- realistic phantoms -----------------------------------------------------------------------


def test_lungs_match_the_truth(case: Case) -> None:
    fields = case.fields
    assert fields.problems == ()
    assert fields.found
    right, left = truth_lungs(case.phantom)
    assert dice(fields.right, right) >= 0.95, dice(fields.right, right)
    assert dice(fields.left, left) >= 0.95, dice(fields.left, left)
    assert not (fields.right & fields.left).any()
    for mask in (fields.right, fields.left, fields.search, fields.body):
        assert mask.shape == case.hu.shape and mask.dtype == bool
    # Where nodules are searched for holds the lungs, but for the airways grown from the
    # trachea (and a margin round them) that the lung's holes filling put back.
    lungs = fields.right | fields.left
    assert np.count_nonzero(lungs & fields.search) >= 0.98 * np.count_nonzero(lungs)


def test_right_lung_is_on_the_patients_right(case: Case) -> None:
    fields = case.fields
    assert centroid_x(fields.right, case.affine) < 0 < centroid_x(fields.left, case.affine)


def test_sides_follow_patient_geometry_not_array_order(case: Case) -> None:
    """The same chest stored with its columns reversed (ImageOrientationPatient -1,0,0): the
    right lung now lies at high column indices, and is still the right lung."""
    columns = case.hu.shape[2]
    affine = case.affine.copy()
    affine[:3, 3] += (columns - 1) * affine[:3, 0]
    affine[:3, 0] = -affine[:3, 0]
    flipped = find_lung_fields(np.ascontiguousarray(case.hu[:, :, ::-1]), case.spacing_mm, affine)
    assert flipped.problems == ()
    right, left = truth_lungs(case.phantom)
    right, left = right[:, :, ::-1], left[:, :, ::-1]
    # In array terms the sides swapped: the right lung is at high column indices now ...
    columns_of = np.arange(columns)
    assert columns_of[flipped.right.any(axis=(0, 1))].mean() > columns / 2
    assert columns_of[flipped.left.any(axis=(0, 1))].mean() < columns / 2
    # ... in patient terms they did not.
    assert dice(flipped.right, right) >= 0.95
    assert dice(flipped.left, left) >= 0.95
    assert centroid_x(flipped.right, affine) < centroid_x(flipped.left, affine)
    assert dice(flipped.right, case.fields.right[:, :, ::-1]) >= 0.99


def test_sides_do_not_depend_on_where_the_patient_lies(case: Case) -> None:
    """A patient off the table centre: both lungs at positive x (the patient's left of the
    isocentre), told apart all the same."""
    affine = case.affine.copy()
    affine[0, 3] += 250.0
    fields = find_lung_fields(case.hu, case.spacing_mm, affine)
    assert centroid_x(fields.right, affine) > 0
    np.testing.assert_array_equal(fields.right, case.fields.right)
    np.testing.assert_array_equal(fields.left, case.fields.left)


def test_trachea_and_main_bronchi_are_not_lung(case: Case) -> None:
    structures = case.phantom.structures
    assert structures is not None
    # Airways outside the lungs: the truth says body, not lung (intrapulmonary airways are
    # lung there, as in clinical lung masks).
    central = np.isin(structures, [STRUCTURES["airway"], STRUCTURES["airway_wall"]]) & (
        case.phantom.labels == LABELS["body"]
    )
    lumen = central & (structures == STRUCTURES["airway"])
    assert lumen.sum() > 1000  # the trachea is there to be left out
    lungs = case.fields.right | case.fields.left
    share = float(np.count_nonzero(central & lungs)) / float(np.count_nonzero(central))
    assert share <= 0.01, f"{share:.1%} of trachea and main bronchi counted as lung"


def test_air_outside_the_body_is_never_lung(case: Case) -> None:
    lungs = case.fields.right | case.fields.left
    outside = case.phantom.labels == LABELS["background"]
    assert outside.sum() > 0.2 * outside.size
    assert not (lungs & outside).any()
    assert not (lungs & ~case.fields.body).any()
    assert not (case.fields.search & ~case.fields.body).any()


@pytest.mark.parametrize("reversed_columns", [False, True], ids=["as-stored", "columns-reversed"])
def test_the_heart_the_lung_wraps_stays_out_of_the_mass_envelope(reversed_columns: bool) -> None:
    """The envelope closes across slices (a mass against the chest wall is capped by lung above
    and below), but not where lung lies further out in the same row: the heart, hilum and
    diaphragm dome are wrapped by lung too, and are not masses. Without that rule 14 % of this
    phantom's heart was in the envelope (and scored up to 0.95 as a mass on others like it).
    "Further out" is the patient's, not the array's: the same holds with the columns reversed."""
    phantom = make_phantom(
        style="realistic",
        rows=128,
        columns=128,
        pixel_spacing=3.0625,
        slices=34,
        slice_thickness=5.0,
        tumours=0,
        effusion=True,
        seed=2153,
    )
    assert phantom.structures is not None
    hu, heart = phantom.hu.astype(np.float32), phantom.structures == STRUCTURES["heart"]
    affine = phantom.affine()
    if reversed_columns:
        hu, heart = np.ascontiguousarray(hu[:, :, ::-1]), heart[:, :, ::-1]
        affine[:3, 3] += (hu.shape[2] - 1) * affine[:3, 0]
        affine[:3, 0] = -affine[:3, 0]
    fields = find_lung_fields(hu, (phantom.spacing_z, *phantom.pixel_spacing), affine)
    assert fields.problems == ()
    assert np.count_nonzero(heart & fields.envelope) <= 0.06 * np.count_nonzero(heart)


def test_an_abdomen_has_no_lungs_and_says_so() -> None:
    phantom = make_phantom(
        rows=256, columns=256, pixel_spacing=1.4, slices=60, slice_thickness=5.0, chest=False
    )
    assert (phantom.hu < -900).sum() > 1000  # bowel gas (and air outside) to be confused with lung
    fields = find_lung_fields(phantom.hu.astype(np.float32), (5.0, 1.4, 1.4), phantom.affine())
    assert not fields.found
    assert not fields.right.any() and not fields.left.any() and not fields.search.any()
    assert fields.problems
    assert any("no lungs" in p for p in fields.problems)


def test_x_of_columns_is_the_affines_x() -> None:
    rng = np.random.default_rng(3)
    affine = np.eye(4)
    affine[:3] = rng.normal(size=(3, 4))
    shape = (3, 4, 5)
    k, r, c = np.indices(shape)
    expected = (affine @ np.stack([c, r, k, np.ones_like(k)]).reshape(4, -1))[0].reshape(shape)
    np.testing.assert_allclose(np.broadcast_to(x_of_columns(affine, shape), shape), expected)


def test_shrink_slices_averages_blocks_and_drops_the_incomplete_last() -> None:
    hu = np.arange(7, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), dtype=np.float32)
    np.testing.assert_array_equal(shrink_slices(hu, 3)[:, 0, 0], [1.0, 4.0])
    mask = np.zeros((4, 1, 1), dtype=bool)
    mask[[0, 1, 2]] = True
    np.testing.assert_array_equal(shrink_slices(mask, 2)[:, 0, 0], [1.0, 0.5])
    assert shrink_slices(hu, 1) is hu


@pytest.mark.parametrize(
    ("spacing", "target", "slices", "expected"),
    [
        (2.5, 3.0, 120, 1),  # already as thick as the working grid
        (1.5, 3.0, 200, 2),
        (1.0, 3.0, 300, 3),
        (0.6, 1.4, 500, 2),
        (0.8, 1.4, 400, 1),  # two would make 1.6 mm: coarser than the grid
        (0.5, 3.0, 30, 3),  # too few slices to average six: at least 8 stay
    ],
)
def test_slice_factor_keeps_the_working_grid_within_its_spacing(
    spacing: float, target: float, slices: int, expected: int
) -> None:
    assert slice_factor(spacing, target, slices) == expected


def test_a_volume_that_is_not_3d_is_refused() -> None:
    with pytest.raises(ValueError, match="3-D"):
        find_lung_fields(np.zeros((4, 4), dtype=np.float32), (1.0, 1.0, 1.0), np.eye(4))


# -- a real chest CT ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lidc() -> tuple[Volume, LungFields]:
    if not LIDC_0001.is_dir():
        pytest.skip(f"{LIDC_0001} is not here")
    files = sorted(LIDC_0001.glob("*.dcm"))
    random.Random(0).shuffle(files)  # the volume must not depend on the order files come in
    volume = assemble_volume([pydicom.dcmread(f) for f in files])
    return volume, find_lung_fields(volume.hu, volume.spacing_mm, volume.affine)


def test_real_chest_ct_lungs_are_plausible(lidc: tuple[Volume, LungFields]) -> None:
    volume, fields = lidc
    assert fields.problems == ()
    voxel_l = float(np.prod(volume.spacing_mm)) / 1e6
    right_l = np.count_nonzero(fields.right) * voxel_l
    left_l = np.count_nonzero(fields.left) * voxel_l
    assert 0.8 <= right_l <= 4.5, right_l
    assert 0.8 <= left_l <= 4.5, left_l
    assert 0.7 <= right_l / left_l <= 1.6, right_l / left_l
    assert centroid_x(fields.right, volume.affine) < centroid_x(fields.left, volume.affine)
    assert not ((fields.right | fields.left) & ~fields.body).any()
    assert not (fields.right & fields.left).any()
