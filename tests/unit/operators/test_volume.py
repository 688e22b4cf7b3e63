"""Volume assembly: HU and LPS geometry equal the synthetic truth; slices are ordered by position
(not InstanceNumber or file order); Enhanced CT, rescale and compressed transfer syntaxes give the
same volume; inconsistent, tilted or irregular series are refused with a reason; of several
candidate series the first that assembles is used, and when none does every reason is given."""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from radfusion.logs import uid_tag
from radfusion.operators.series_selector import SeriesCandidate, read_headers
from radfusion.operators.volume import (
    Volume,
    VolumeError,
    assemble_first_usable,
    assemble_volume,
    read_series,
)
from radfusion.synth.ct import Phantom, make_phantom
from radfusion.synth.ct_series import SynthStudy, write_ct_series

SLICES, ROWS, COLUMNS = 24, 96, 96
PIXEL_SPACING, SLICE_THICKNESS = 3.5, 5.0
UID_BASE = "1.2.826.0.1.3680043.10.1234.9.55."


@dataclasses.dataclass(frozen=True)
class Series:
    phantom: Phantom
    study: SynthStudy

    def datasets(self) -> list[Dataset]:
        """Fresh full datasets of the series, in slice (= InstanceNumber = file) order."""
        return read_series(self.study.files)

    def z(self, k: int) -> float:
        return self.phantom.origin[2] + k * SLICE_THICKNESS


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    phantom = make_phantom(
        slices=SLICES,
        rows=ROWS,
        columns=COLUMNS,
        pixel_spacing=PIXEL_SPACING,
        slice_thickness=SLICE_THICKNESS,
        tumours=2,
        seed=5,
    )
    return Series(phantom, write_ct_series(phantom, tmp_path_factory.mktemp("ct")))


def save(datasets: list[Dataset], directory: Path) -> list[Path]:
    """Write datasets as CT0001.dcm... in list order (so file order is list order)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = directory / f"CT{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def assert_matches_phantom(volume: Volume, series: Series) -> None:
    np.testing.assert_array_equal(volume.hu, series.phantom.hu)
    assert volume.hu.dtype == np.float32
    np.testing.assert_allclose(volume.affine, series.phantom.affine(), atol=1e-6)
    assert volume.spacing_mm == (SLICE_THICKNESS, PIXEL_SPACING, PIXEL_SPACING)
    assert volume.shape == (SLICES, ROWS, COLUMNS)
    assert volume.FrameOfReferenceUID == series.study.FrameOfReferenceUID


# -- the plain series ------------------------------------------------------------------------


def test_single_frame_series_equals_the_phantom(series: Series) -> None:
    datasets = series.datasets()
    volume = assemble_volume(datasets)
    assert_matches_phantom(volume, series)
    assert volume.frame_numbers == (1,) * SLICES
    assert [ds.SOPInstanceUID for ds in volume.source_images] == [
        ds.SOPInstanceUID for ds in datasets
    ]
    # The affine maps voxel (c, r, k) to the position of slice k plus the in-plane offsets.
    for k in (0, 7, SLICES - 1):
        ipp = np.asarray(volume.source_images[k].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(volume.affine @ [0, 0, k, 1], [*ipp, 1], atol=1e-6)
        np.testing.assert_allclose(
            volume.affine @ [10, 20, k, 1],
            np.append(ipp + np.array([10 * PIXEL_SPACING, 20 * PIXEL_SPACING, 0]), 1),
            atol=1e-6,
        )


def test_read_series_reads_full_datasets_in_the_given_order(series: Series) -> None:
    files = list(reversed(series.study.files[:3]))
    datasets = read_series(files)
    assert [int(ds.InstanceNumber) for ds in datasets] == [3, 2, 1]
    assert all("PixelData" in ds for ds in datasets)


def test_single_slice_uses_the_slice_thickness(series: Series) -> None:
    volume = assemble_volume(series.datasets()[5:6])
    assert volume.shape == (1, ROWS, COLUMNS)
    assert volume.spacing_mm[0] == SLICE_THICKNESS
    np.testing.assert_array_equal(volume.hu[0], series.phantom.hu[5])
    np.testing.assert_allclose(volume.affine[:3, 3], [*series.phantom.origin[:2], series.z(5)])


# -- slice order -----------------------------------------------------------------------------


def test_order_is_by_position_not_instance_number_or_list_order(series: Series) -> None:
    datasets = series.datasets()
    rng = random.Random(7)
    numbers = list(range(1, SLICES + 1))
    rng.shuffle(numbers)
    for ds, number in zip(datasets, numbers, strict=True):
        ds.InstanceNumber = number
    rng.shuffle(datasets)
    volume = assemble_volume(datasets)
    assert_matches_phantom(volume, series)
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.source_images]
    np.testing.assert_allclose(z, [series.z(k) for k in range(SLICES)])


def test_series_numbered_head_to_feet(series: Series, tmp_path: Path) -> None:
    # InstanceNumber 1 is the top slice and files are written top first (z descending).
    datasets = series.datasets()[::-1]
    for number, ds in enumerate(datasets, 1):
        ds.InstanceNumber = number
    files = save(datasets, tmp_path)
    volume = assemble_volume(read_series(files))
    assert_matches_phantom(volume, series)
    assert [int(ds.InstanceNumber) for ds in volume.source_images] == list(range(SLICES, 0, -1))


def _lps_consistency(volume: Volume, phantom: Phantom) -> None:
    """Every voxel of ``volume`` lies, through its affine, on a phantom voxel with its HU."""
    k, r, c = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    index = np.stack([c.ravel(), r.ravel(), k.ravel(), np.ones(c.size)])
    to_phantom = np.linalg.inv(phantom.affine()) @ volume.affine @ index
    rounded = np.rint(to_phantom)
    np.testing.assert_allclose(to_phantom, rounded, atol=1e-6)
    pc, pr, pk = rounded[:3].astype(int)
    np.testing.assert_array_equal(volume.hu.ravel(), phantom.hu[pk, pr, pc])


@pytest.mark.parametrize(
    ("orientation", "flip_rows", "flip_columns"),
    [
        ([-1, 0, 0, 0, -1, 0], True, True),  # rotated 180° in plane; normal still +z
        ([1, 0, 0, 0, -1, 0], True, False),  # normal -z: slices ordered head to feet
        ([-1, 0, 0, 0, 1, 0], False, True),  # normal -z
    ],
)
def test_flipped_orientations_map_every_voxel_to_its_lps_position(
    series: Series, orientation: list[int], flip_rows: bool, flip_columns: bool
) -> None:
    ph = series.phantom
    last_x = ph.origin[0] + (COLUMNS - 1) * PIXEL_SPACING
    last_y = ph.origin[1] + (ROWS - 1) * PIXEL_SPACING
    datasets = series.datasets()
    for k, ds in enumerate(datasets):
        pixels = ph.hu[k]
        if flip_rows:
            pixels = pixels[::-1]
        if flip_columns:
            pixels = pixels[:, ::-1]
        ds.PixelData = np.ascontiguousarray(pixels).astype("<i2").tobytes()
        ds.ImageOrientationPatient = [str(v) for v in orientation]
        x = last_x if flip_columns else ph.origin[0]
        y = last_y if flip_rows else ph.origin[1]
        ds.ImagePositionPatient = [f"{x:.10g}", f"{y:.10g}", f"{series.z(k):.10g}"]
    volume = assemble_volume(datasets)
    normal = np.cross(orientation[:3], orientation[3:])
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.source_images]
    assert np.all(np.diff(z) * normal[2] > 0)  # k grows along the slice normal
    np.testing.assert_allclose(volume.affine[:3, 2], normal * SLICE_THICKNESS, atol=1e-9)
    _lps_consistency(volume, ph)


def test_oblique_orientation_gives_a_consistent_affine(series: Series) -> None:
    # Rotated 20° about x then 10° about z; non-square pixels catch a row/column swap.
    a, b = np.radians(20.0), np.radians(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    rot = rz @ rx
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    row_dir, col_dir = (
        np.array([float(f"{v:.10g}") for v in row_dir]),
        np.array([float(f"{v:.10g}") for v in col_dir]),
    )
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = 0.7, 0.9
    p0 = np.array([-40.0, 12.5, -300.0])
    datasets = series.datasets()
    for k, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in p0 + k * SLICE_THICKNESS * normal]
        ds.PixelSpacing = [str(row_spacing), str(col_spacing)]
    datasets.reverse()
    volume = assemble_volume(datasets)
    assert volume.spacing_mm == pytest.approx((SLICE_THICKNESS, row_spacing, col_spacing))
    np.testing.assert_array_equal(volume.hu, series.phantom.hu)
    for k in (0, 1, 11, SLICES - 1):
        ipp = np.asarray(volume.source_images[k].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(ipp, p0 + k * SLICE_THICKNESS * normal, atol=1e-6)
        for c, r in ((0, 0), (95, 0), (0, 95), (13, 57)):
            expected = ipp + c * col_spacing * row_dir + r * row_spacing * col_dir
            np.testing.assert_allclose(volume.affine @ [c, r, k, 1], [*expected, 1], atol=1e-6)


# -- other encodings -------------------------------------------------------------------------


def _enhanced(datasets: list[Dataset], path: Path) -> Path:
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=UID_BASE + "1",
        series_number=3,
        sop_instance_uid=UID_BASE + "2",
        instance_number=1,
    )
    enhanced.save_as(path)
    return path


def test_enhanced_ct_equals_the_single_frame_series(series: Series, tmp_path: Path) -> None:
    # Frames in reverse slice order, so frame number != slice index + 1.
    path = _enhanced(series.datasets()[::-1], tmp_path / "enhanced.dcm")
    enhanced = pydicom.dcmread(path)
    assert int(enhanced.NumberOfFrames) == SLICES
    assert "ImagePositionPatient" not in enhanced  # positions are per frame
    volume = assemble_volume([enhanced])
    assert_matches_phantom(volume, series)
    assert volume.frame_numbers == tuple(range(SLICES, 0, -1))
    assert all(ds is enhanced for ds in volume.source_images)
    frames = enhanced.PerFrameFunctionalGroupsSequence
    for k, number in enumerate(volume.frame_numbers):
        position = frames[number - 1].PlanePositionSequence[0].ImagePositionPatient
        assert float(position[2]) == pytest.approx(series.z(k))


def test_enhanced_ct_with_shuffled_frames(series: Series, tmp_path: Path) -> None:
    enhanced = pydicom.dcmread(_enhanced(series.datasets(), tmp_path / "enhanced.dcm"))
    order = np.random.default_rng(1).permutation(SLICES)  # new frame i is old frame order[i]
    frames = enhanced.pixel_array[order]
    items = enhanced.PerFrameFunctionalGroupsSequence
    enhanced.PerFrameFunctionalGroupsSequence = [items[int(i)] for i in order]
    enhanced.PixelData = np.ascontiguousarray(frames).astype("<i2").tobytes()
    enhanced.save_as(tmp_path / "shuffled.dcm")
    shuffled = pydicom.dcmread(tmp_path / "shuffled.dcm")
    volume = assemble_volume([shuffled])
    assert_matches_phantom(volume, series)
    assert sorted(volume.frame_numbers) == list(range(1, SLICES + 1))
    for k, number in enumerate(volume.frame_numbers):
        item = shuffled.PerFrameFunctionalGroupsSequence[number - 1]
        assert float(item.PlanePositionSequence[0].ImagePositionPatient[2]) == pytest.approx(
            series.z(k)
        )
        np.testing.assert_array_equal(shuffled.pixel_array[number - 1], series.phantom.hu[k])


def _rescaled(series: Series, slope: float, intercept: float) -> tuple[list[Dataset], np.ndarray]:
    """The series stored unsigned with ``slope``/``intercept``; returns it and its HU."""
    stored = np.rint((series.phantom.hu.astype(np.float64) - intercept) / slope)
    assert stored.min() >= 0 and stored.max() < 2**16
    datasets = series.datasets()
    for k, ds in enumerate(datasets):
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.PixelData = stored[k].astype("<u2").tobytes()
    return datasets, (stored * slope + intercept).astype(np.float32)


@pytest.mark.parametrize(("slope", "intercept"), [(2.0, -1024.0), (0.5, -1024.0), (1.0, -1024.0)])
def test_rescale_slope_and_intercept_are_applied(
    series: Series, tmp_path: Path, slope: float, intercept: float
) -> None:
    datasets, expected = _rescaled(series, slope, intercept)
    # Slope 2 cannot store odd HU: within 1 HU of the phantom, exactly the rescaled values.
    assert np.abs(expected - series.phantom.hu).max() <= (1 if slope == 2 else 0)
    volume = assemble_volume(datasets)
    np.testing.assert_array_equal(volume.hu, expected)
    np.testing.assert_allclose(volume.affine, series.phantom.affine(), atol=1e-6)
    # Enhanced CT carries them in the Pixel Value Transformation functional group.
    enhanced = pydicom.dcmread(_enhanced(datasets, tmp_path / "enhanced.dcm"))
    assert "RescaleSlope" not in enhanced
    np.testing.assert_array_equal(assemble_volume([enhanced]).hu, expected)


def _encoder_available(syntax: UID) -> bool:
    return bool(
        pydicom.pixels.get_encoder(syntax).is_available
        and pydicom.pixels.get_decoder(syntax).is_available
    )


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=str)
def test_compressed_transfer_syntaxes_decode_to_the_same_hu(
    series: Series, tmp_path: Path, syntax: UID
) -> None:
    if not _encoder_available(syntax):
        pytest.skip(f"no encoder/decoder plugin for {syntax.name}")
    datasets = series.datasets()
    for ds in datasets:
        ds.compress(syntax)
    files = save(datasets, tmp_path)
    read = read_series(files)
    assert {ds.file_meta.TransferSyntaxUID for ds in read} == {syntax}
    volume = assemble_volume(read)
    assert_matches_phantom(volume, series)


def test_undecodable_pixel_data_is_refused(series: Series) -> None:
    datasets = series.datasets()
    datasets[3].compress(RLELossless)
    datasets[3].PixelData = datasets[3].PixelData[:200]  # truncated fragment
    with pytest.raises(VolumeError, match="pixel data cannot be decoded"):
        assemble_volume(datasets)


def test_headers_without_pixel_data_are_refused(series: Series) -> None:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.study.files]
    with pytest.raises(VolumeError, match="pixel data cannot be decoded"):
        assemble_volume(headers)


# -- refusals --------------------------------------------------------------------------------


def test_no_images_is_refused() -> None:
    with pytest.raises(VolumeError, match="no images"):
        assemble_volume([])


@pytest.mark.parametrize("shift", [(0.75, 0.0), (0.0, 0.75), (-0.4, 0.4)])
def test_gantry_tilt_is_refused(series: Series, shift: tuple[float, float]) -> None:
    # Slice positions drift in plane from slice to slice (orientation stays axial).
    datasets = series.datasets()
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x + k * shift[0]:.10g}", f"{y + k * shift[1]:.10g}", z]
    with pytest.raises(VolumeError, match="gantry tilt"):
        assemble_volume(datasets)


def test_tilted_orientation_with_positions_along_z_is_refused(series: Series) -> None:
    # How scanners encode a tilted gantry: tilted columns, table positions straight along z.
    tilt = np.radians(15.0)
    datasets = series.datasets()
    column = [f"{v:.10g}" for v in (0.0, np.cos(tilt), np.sin(tilt))]
    for ds in datasets:
        ds.ImageOrientationPatient = ["1", "0", "0", *column]
    with pytest.raises(VolumeError, match="gantry tilt"):
        assemble_volume(datasets)


def test_sub_tolerance_position_jitter_is_accepted(series: Series) -> None:
    # Positions rounded by the scanner (±0.05 mm) are not a tilt or irregular spacing.
    datasets = series.datasets()
    rng = np.random.default_rng(0)
    for ds in datasets:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        dx, dy, dz = rng.uniform(-0.05, 0.05, 3)
        ds.ImagePositionPatient = [f"{x + dx:.10g}", f"{y + dy:.10g}", f"{z + dz:.10g}"]
    volume = assemble_volume(datasets)
    np.testing.assert_array_equal(volume.hu, series.phantom.hu)


@pytest.mark.parametrize("missing", [1, 12, SLICES - 2])
def test_missing_slice_is_refused(series: Series, missing: int) -> None:
    files = [f for k, f in enumerate(series.study.files) if k != missing]
    with pytest.raises(VolumeError, match=r"irregular slice spacing.*missing slices"):
        assemble_volume(read_series(files))


def test_dropping_an_end_slice_keeps_a_regular_volume(series: Series) -> None:
    volume = assemble_volume(read_series(series.study.files[1:]))
    np.testing.assert_array_equal(volume.hu, series.phantom.hu[1:])
    np.testing.assert_allclose(volume.affine[:3, 3], [*series.phantom.origin[:2], series.z(1)])


def test_duplicate_positions_are_refused(series: Series) -> None:
    datasets = series.datasets()
    duplicate = copy.deepcopy(datasets[10])
    duplicate.SOPInstanceUID = UID_BASE + "3"
    duplicate.InstanceNumber = SLICES + 1
    with pytest.raises(VolumeError, match="share a position"):
        assemble_volume([*datasets, duplicate])


def test_two_interleaved_stacks_are_refused(series: Series) -> None:
    # The same series twice (e.g. two reconstructions sharing a Series Instance UID).
    with pytest.raises(VolumeError, match="share a position"):
        assemble_volume(series.datasets() + series.datasets())


def _set_rows(ds: Dataset) -> None:
    ds.Rows = ROWS - 8
    ds.PixelData = ds.PixelData[: (ROWS - 8) * COLUMNS * 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda ds: setattr(ds, "ImageOrientationPatient", ["1", "0", "0", "0", "0.8", "0.6"]),
            "different orientations",
        ),
        (
            lambda ds: setattr(ds, "ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"]),
            "different orientations",
        ),
        (lambda ds: setattr(ds, "PixelSpacing", ["3.5", "3.6"]), "different pixel spacings"),
        (lambda ds: setattr(ds, "PixelSpacing", ["3.6", "3.6"]), "different pixel spacings"),
        (_set_rows, "different matrix sizes"),
        (lambda ds: delattr(ds, "ImagePositionPatient"), "lacks orientation, position"),
        (lambda ds: delattr(ds, "PixelSpacing"), "lacks orientation, position"),
    ],
    ids=[
        "tilted-orientation",
        "sagittal-orientation",
        "column-spacing",
        "pixel-spacing",
        "matrix",
        "no-position",
        "no-spacing",
    ],
)
def test_inconsistent_images_are_refused(series: Series, change: object, message: str) -> None:
    datasets = series.datasets()
    change(datasets[9])  # type: ignore[operator]
    with pytest.raises(VolumeError, match=message):
        assemble_volume(datasets)


def test_volume_error_is_a_value_error() -> None:
    assert issubclass(VolumeError, ValueError)


def test_synthetic_files_are_what_the_tests_assume(series: Series) -> None:
    ds = series.datasets()[0]
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (int(ds.PixelRepresentation), float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (
        1,
        1.0,
        0.0,
    )


def test_several_multi_frame_images_in_one_series_are_refused() -> None:
    phantom = make_phantom(
        slices=SLICES,
        rows=ROWS,
        columns=COLUMNS,
        seed=11,
        tumours=0,
        pixel_spacing=3.5,
        slice_thickness=5.0,
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        study = write_ct_series(phantom, Path(tmp))
        slices = [pydicom.dcmread(f) for f in study.files]
        halves = [
            hd.legacy.LegacyConvertedEnhancedCTImage(
                part,
                series_instance_uid="1.2.826.0.1.3680043.10.1234.9.90",
                series_number=9,
                sop_instance_uid=f"1.2.826.0.1.3680043.10.1234.9.9{i}",
                instance_number=i,
            )
            for i, part in enumerate((slices[:12], slices[12:]), 1)
        ]
    with pytest.raises(VolumeError, match="multi-frame"):
        assemble_volume(halves)


def test_an_image_without_rows_is_refused_not_a_crash(series: Series) -> None:
    datasets = series.datasets()
    del datasets[4].Rows
    with pytest.raises(VolumeError, match="lacks Rows or Columns"):
        assemble_volume(datasets)


def test_read_series_refuses_a_file_that_is_gone(series: Series, tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"an image cannot be read \(FileNotFoundError\)"):
        read_series([series.study.files[0], tmp_path / "gone.dcm"])


# -- several candidate series ----------------------------------------------------------------


def candidate(files: list[Path] | tuple[Path, ...], number: int | None) -> SeriesCandidate:
    """A candidate as the selector makes it: headers of ``files``, Series Number ``number``."""
    headers = tuple(ds for _, ds in read_headers(files))
    return SeriesCandidate(
        str(headers[0].SeriesInstanceUID), tuple(files), headers, len(files), (), number
    )


def variant(
    series: Series, directory: Path, number: int, change: object = None, skip: int | None = None
) -> SeriesCandidate:
    """The series re-written as another series (own UIDs, Series Number ``number``), slice
    ``skip`` left out and ``change(k, ds)`` applied to each slice."""
    datasets = []
    for k, ds in enumerate(series.datasets()):
        if k == skip:
            continue
        ds.SeriesInstanceUID = f"{UID_BASE}{number}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_BASE}{number}.{k + 1}"
        ds.SeriesNumber = number
        if change is not None:
            change(k, ds)  # type: ignore[operator]
        datasets.append(ds)
    return candidate(save(datasets, directory), number)


def _tilt(k: int, ds: Dataset) -> None:
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [f"{x:.10g}", f"{y + 0.75 * k:.10g}", f"{z:.10g}"]


def test_the_next_candidate_is_used_when_the_preferred_one_fails(
    series: Series, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gappy = variant(series, tmp_path / "gappy", 3, skip=12)
    good = candidate(series.study.files, 2)
    with caplog.at_level(logging.INFO, logger="radfusion.operators.volume"):
        volume = assemble_first_usable([gappy, good])
    assert_matches_phantom(volume, series)
    assert {ds.SeriesInstanceUID for ds in volume.source_images} == {good.SeriesInstanceUID}
    # The HU array holds the pixels; the source images are kept as headers only.
    assert not any("PixelData" in ds for ds in volume.source_images)
    assert "irregular slice spacing" in caplog.text
    assert "used after 1 preferred series could not be assembled" in caplog.text
    assert uid_tag(gappy.SeriesInstanceUID) in caplog.text
    assert UID_BASE not in caplog.text and series.study.SeriesInstanceUID not in caplog.text


def test_the_preferred_candidate_is_used_when_it_works(series: Series, tmp_path: Path) -> None:
    tilted = variant(series, tmp_path / "tilted", 4, change=_tilt)
    good = candidate(series.study.files, 2)
    volume = assemble_first_usable([good, tilted])
    assert volume.source_images[0].SeriesInstanceUID == good.SeriesInstanceUID


def test_when_no_candidate_works_every_reason_is_given_in_order(
    series: Series, tmp_path: Path
) -> None:
    gappy = variant(series, tmp_path / "gappy", 3, skip=12)
    tilted = variant(series, tmp_path / "tilted", 4, change=_tilt)
    with pytest.raises(VolumeError) as err:
        assemble_first_usable([gappy, tilted])
    message = str(err.value)
    alone = []
    for each in (gappy, tilted):
        with pytest.raises(VolumeError) as single:
            assemble_volume(read_series(each.files))
        alone.append(str(single.value))
    assert "irregular slice spacing" in alone[0] and "gantry tilt" in alone[1]
    assert message == (
        f"series 3 ({SLICES - 1} slices): {alone[0]}; series 4 ({SLICES} slices): {alone[1]}"
    )
    assert message.isascii() and UID_BASE not in message


def test_a_candidate_whose_file_is_gone_costs_only_that_candidate(
    series: Series, tmp_path: Path
) -> None:
    gone = variant(series, tmp_path / "gone", 5)
    gone.files[7].unlink()  # removed between selection and reading
    volume = assemble_first_usable([gone, candidate(series.study.files, 2)])
    assert_matches_phantom(volume, series)
    with pytest.raises(VolumeError, match=r"^series 5 \(24 slices\): an image cannot be read"):
        assemble_first_usable([gone])


def test_a_malformed_value_costs_only_that_candidate(series: Series, tmp_path: Path) -> None:
    def two_coordinates(k: int, ds: Dataset) -> None:
        if k == 6:
            ds.ImagePositionPatient = ds.ImagePositionPatient[:2]

    malformed = variant(series, tmp_path / "malformed", 6, change=two_coordinates)
    with pytest.raises(VolumeError, match=r"series 6 .*Image Position \(Patient\) must hold 3"):
        assemble_first_usable([malformed])
    volume = assemble_first_usable([malformed, candidate(series.study.files, 2)])
    assert_matches_phantom(volume, series)


def test_no_candidates_is_refused() -> None:
    with pytest.raises(VolumeError, match="no series to assemble"):
        assemble_first_usable([])


# -- pixel padding ---------------------------------------------------------------------------


def _outside_circle() -> np.ndarray:
    """The corners of a slice: what scanners pad outside the scan circle."""
    r, c = np.ogrid[:ROWS, :COLUMNS]
    return (r - (ROWS - 1) / 2) ** 2 + (c - (COLUMNS - 1) / 2) ** 2 > (ROWS / 2) ** 2


def _stored(
    series: Series,
    *,
    signed: bool,
    slope: float = 1.0,
    intercept: float = 0.0,
    bits_stored: int = 16,
    padding: tuple[str, int] | None = None,
    range_limit: tuple[str, int] | None = None,
    stored: np.ndarray | None = None,
) -> tuple[list[Dataset], np.ndarray]:
    """The series with the phantom's HU stored as given (``stored`` overrides the pixels) and
    the padding attributes as (VR, value); returns it and the stored values."""
    if stored is None:
        stored = np.rint((series.phantom.hu.astype(np.float64) - intercept) / slope)
    stored = stored.astype(np.int64)
    datasets = series.datasets()
    for k, ds in enumerate(datasets):
        ds.PixelRepresentation = int(signed)
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = (stored[k] & 0xFFFF).astype("<u2").tobytes()  # the 16-bit words
        if padding is not None:
            ds.add_new(0x00280120, *padding)
        if range_limit is not None:
            ds.add_new(0x00280121, *range_limit)
    return datasets, stored


def _expected(series: Series, padded: np.ndarray) -> np.ndarray:
    hu = series.phantom.hu.astype(np.float32)
    hu[padded] = -1024
    return hu


def _with_corners(series: Series, value: int, intercept: float = 0.0) -> np.ndarray:
    stored = series.phantom.hu.astype(np.int64) - int(intercept)
    stored[:, _outside_circle()] = value
    return stored


def test_signed_padding_value_becomes_air(series: Series) -> None:
    # GE: signed, intercept -1024, PixelPaddingValue -2000 (would decode to -3024 HU).
    stored = _with_corners(series, -2000, -1024)
    datasets, _ = _stored(
        series, signed=True, intercept=-1024, padding=("SS", -2000), stored=stored
    )
    volume = assemble_volume(datasets)
    padded = np.broadcast_to(_outside_circle(), volume.shape)
    np.testing.assert_array_equal(volume.hu, _expected(series, padded))
    # Canon: intercept 0, padding -3024 stored = -3024 HU.
    stored = _with_corners(series, -3024)
    datasets, _ = _stored(series, signed=True, padding=("SS", -3024), stored=stored)
    np.testing.assert_array_equal(assemble_volume(datasets).hu, _expected(series, padded))


@pytest.mark.parametrize("slope", [1.0, 0.5])
@pytest.mark.parametrize("element", [("US", 0xF830), ("SS", -2000)], ids=["US", "SS-wrong-sign"])
def test_unsigned_padding_value_becomes_air(
    series: Series, slope: float, element: tuple[str, int]
) -> None:
    # Philips: unsigned, intercept -1024, 0xF830 (+62512 HU at slope 1, +30744 at 0.5); the
    # same bit pattern written as -2000 in an SS element must match as well.
    stored = np.rint((series.phantom.hu.astype(np.float64) + 1024) / slope).astype(np.int64)
    stored[:, _outside_circle()] = 0xF830
    datasets, _ = _stored(
        series, signed=False, slope=slope, intercept=-1024, padding=element, stored=stored
    )
    volume = assemble_volume(datasets)
    padded = np.broadcast_to(_outside_circle(), volume.shape)
    expected = (stored * slope - 1024).astype(np.float32)
    expected[padded] = -1024
    np.testing.assert_array_equal(volume.hu, expected)
    assert volume.hu.max() < 4000


def test_signed_padding_given_as_unsigned_pattern_matches(series: Series) -> None:
    # Signed 12-bit pixels, padding written as US 0xF830: its 12 stored bits are -2000.
    stored = _with_corners(series, -2000)
    datasets, _ = _stored(
        series, signed=True, bits_stored=12, padding=("US", 0xF830), stored=stored
    )
    volume = assemble_volume(datasets)
    padded = np.broadcast_to(_outside_circle(), volume.shape)
    np.testing.assert_array_equal(volume.hu, _expected(series, padded))


def test_padding_range_limit_pads_the_inclusive_range_in_either_order(series: Series) -> None:
    stored = series.phantom.hu.astype(np.int64) + 1024  # unsigned, intercept -1024
    outside = _outside_circle()
    # Corners hold 0..9 stored (-1024..-1015 HU would be air anyway): use 3000..3009 instead,
    # plus the neighbours 2999 and 3010, which are real pixels.
    ramp = 3000 + np.arange(int(outside.sum())) % 10
    stored[:, outside] = ramp
    stored[:, 0, COLUMNS // 2] = 2999
    stored[:, ROWS - 1, COLUMNS // 2] = 3010
    unpadded = (stored - 1024).astype(np.float32)
    for value, limit in ((3000, 3009), (3009, 3000)):
        datasets, _ = _stored(
            series,
            signed=False,
            intercept=-1024,
            padding=("US", value),
            range_limit=("US", limit),
            stored=stored,
        )
        volume = assemble_volume(datasets)
        expected = unpadded.copy()
        expected[:, outside] = -1024
        np.testing.assert_array_equal(volume.hu, expected)
        assert (volume.hu[:, 0, COLUMNS // 2] == 2999 - 1024).all()
        assert (volume.hu[:, ROWS - 1, COLUMNS // 2] == 3010 - 1024).all()


def test_without_padding_attribute_pixels_are_unchanged(series: Series) -> None:
    stored = _with_corners(series, -2000, -1024)
    datasets, _ = _stored(series, signed=True, intercept=-1024, stored=stored)
    volume = assemble_volume(datasets)
    np.testing.assert_array_equal(volume.hu, (stored - 1024).astype(np.float32))
    # A Pixel Padding Range Limit alone (no Pixel Padding Value) pads nothing either.
    datasets, _ = _stored(
        series, signed=True, intercept=-1024, range_limit=("SS", -2000), stored=stored
    )
    np.testing.assert_array_equal(assemble_volume(datasets).hu, volume.hu)


def test_real_pixels_next_to_the_padding_value_are_untouched(series: Series) -> None:
    # Padding is -2000 stored; real pixels stored -1999 and -2001, and one stored -976 that
    # decodes to -2000 HU (the padding number, were it compared after the rescale), stay.
    stored = series.phantom.hu.astype(np.int64) + 1024
    stored[:, 0, :3] = [-1999, -2001, -976]
    datasets, _ = _stored(
        series, signed=True, intercept=-1024, padding=("SS", -2000), stored=stored
    )
    volume = assemble_volume(datasets)
    np.testing.assert_array_equal(volume.hu, (stored - 1024).astype(np.float32))
    assert (volume.hu[:, 0, 2] == -2000).all()


def test_unsigned_12_bit_padding_matches_on_the_stored_bits(series: Series) -> None:
    # Unsigned 12-bit pixels whose padding words carry set bits above Bits Stored (0xF830):
    # only the 12 stored bits (0x830) count, in the pixels as in Pixel Padding Value.
    stored = series.phantom.hu.astype(np.int64) + 1024
    assert stored.max() < 0x830  # no real pixel shares the padding's stored bits
    stored[:, _outside_circle()] = 0xF830
    datasets, _ = _stored(
        series,
        signed=False,
        intercept=-1024,
        bits_stored=12,
        padding=("US", 0xF830),
        stored=stored,
    )
    volume = assemble_volume(datasets)
    padded = np.broadcast_to(_outside_circle(), volume.shape)
    np.testing.assert_array_equal(volume.hu, _expected(series, padded))


def test_enhanced_ct_padding_at_the_top_level(series: Series, tmp_path: Path) -> None:
    stored = _with_corners(series, -2000, -1024)
    datasets, _ = _stored(series, signed=True, intercept=-1024, stored=stored)
    enhanced = pydicom.dcmread(_enhanced(datasets, tmp_path / "enhanced.dcm"))
    assert "PixelPaddingValue" not in enhanced
    enhanced.add_new(0x00280120, "SS", -2000)
    volume = assemble_volume([enhanced])
    padded = np.broadcast_to(_outside_circle(), volume.shape)
    np.testing.assert_array_equal(volume.hu, _expected(series, padded))


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("PixelSpacing", [float("nan"), 0.7], "Pixel Spacing must hold 2 finite numbers"),
        ("PixelSpacing", [0.0, 0.7], "Pixel Spacing must be positive"),
        ("PixelSpacing", [], "Pixel Spacing must hold 2 finite numbers"),
        ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0], "not two orthogonal unit vectors"),
        ("ImageOrientationPatient", [1, 0, 0, 0, 1], "must hold 6 finite numbers"),
        ("ImagePositionPatient", [0, 0, float("inf")], "must hold 3 finite numbers"),
        ("RescaleSlope", float("nan"), "Rescale Slope is nan"),
    ],
)
def test_geometry_a_sender_got_wrong_is_refused_with_its_reason(
    series: Series, keyword: str, value: object, reason: str
) -> None:
    """Found by the fuzz harness (tests/fuzz): these gave numpy errors or a NaN volume."""
    datasets = series.datasets()
    for ds in datasets if keyword == "ImageOrientationPatient" else datasets[5:6]:
        setattr(ds, keyword, value)
    with pytest.raises(VolumeError, match=reason):
        assemble_volume(datasets)


def test_a_rescale_that_overflows_the_volume_is_refused(series: Series) -> None:
    """Found by a long fuzz run: a finite slope of 1e35 gave -inf HU."""
    datasets = series.datasets()
    datasets[3].RescaleSlope = 1e35
    with pytest.raises(VolumeError, match="overflow"):
        assemble_volume(datasets)
