"""The synthetic chest CT: determinism, DICOM geometry and validity, exact ground truth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from radfusion.synth.ct import (
    LABELS,
    MAX_TUMOURS,
    TUMOUR_LABEL_BASE,
    UID_ROOT,
    Phantom,
    make_phantom,
)
from radfusion.synth.ct_series import SynthStudy, synth_ct, write_ct_series

SMALL: dict[str, Any] = {"slices": 40, "rows": 128, "columns": 128, "seed": 3, "tumours": 2}
SPACING = 360.0 / 128  # synth_ct's default: a 360 mm field of view


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(**SMALL, pixel_spacing=SPACING)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SynthStudy:
    return synth_ct(tmp_path_factory.mktemp("ct"), **SMALL)


@pytest.fixture(scope="module")
def datasets(study: SynthStudy) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in study.files]


def test_same_arguments_give_identical_bytes(study: SynthStudy, tmp_path: Path) -> None:
    again = synth_ct(tmp_path, **SMALL)
    names = sorted(p.name for p in study.directory.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    assert {"labels.npz", "truth.json", "CT0001.dcm", "CT0040.dcm"} <= set(names)
    for name in names:
        assert (study.directory / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert again.StudyInstanceUID == study.StudyInstanceUID


def test_seed_changes_the_phantom_and_its_uids(phantom: Phantom, study: SynthStudy) -> None:
    other = make_phantom(**{**SMALL, "seed": 4}, pixel_spacing=SPACING)
    assert not np.array_equal(other.hu, phantom.hu)
    assert make_phantom(**SMALL, pixel_spacing=SPACING).hu.tobytes() == phantom.hu.tobytes()
    assert phantom.hu.dtype == np.int16 and phantom.labels.dtype == np.uint8
    assert phantom.hu.shape == phantom.labels.shape == (40, 128, 128)


def test_uids_depend_on_patient_id(phantom: Phantom, tmp_path: Path) -> None:
    # ("RF-1", 23) and ("RF-12", 3) concatenate alike: the entropy must keep them apart.
    a = write_ct_series(phantom, tmp_path / "a", patient_id="RF-1", seed=23)
    b = write_ct_series(phantom, tmp_path / "b", patient_id="RF-12", seed=3)
    assert len({a.StudyInstanceUID, a.SeriesInstanceUID, a.FrameOfReferenceUID}) == 3
    assert a.StudyInstanceUID != b.StudyInstanceUID
    for uid in (a.StudyInstanceUID, a.SeriesInstanceUID, a.FrameOfReferenceUID):
        assert uid.startswith(UID_ROOT) and len(uid) <= 64


def test_headers_and_geometry(
    study: SynthStudy, datasets: list[pydicom.Dataset], phantom: Phantom
) -> None:
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 41))
    assert [f.name for f in study.files] == [f"CT{i:04d}.dcm" for i in range(1, 41)]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(z), phantom.slice_thickness, atol=1e-6)
    assert max(z) < 0
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == list(phantom.pixel_spacing)
        assert float(ds.SliceThickness) == phantom.slice_thickness
        assert float(ds.SliceLocation) == pytest.approx(z[k])
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) == (
            study.StudyInstanceUID,
            study.SeriesInstanceUID,
            study.FrameOfReferenceUID,
        )
        assert (ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope) == (1, 0, 1)
        assert np.array_equal(ds.pixel_array, phantom.hu[k])
    first = datasets[0]
    assert (first.Modality, first.BodyPartExamined, first.PatientPosition) == ("CT", "CHEST", "HFS")
    assert (first.PatientID, str(first.PatientName)) == ("RF-0001", "Phantom^Chest")
    assert (first.WindowCenter, first.WindowWidth) == (-600, 1500)
    issuer = first.IssuerOfPatientIDQualifiersSequence[0]
    assert (issuer.UniversalEntityID, issuer.UniversalEntityIDType) == (
        "1.2.826.0.1.3680043.10.1234.1",
        "ISO",
    )


def test_affine_matches_headers_and_npz(
    study: SynthStudy, datasets: list[pydicom.Dataset], phantom: Phantom
) -> None:
    with np.load(study.ground_truth) as npz:
        labels, affine = npz["labels"], npz["affine"]
    assert labels.dtype == np.uint8 and np.array_equal(labels, phantom.labels)
    assert np.array_equal(affine, phantom.affine())
    # Voxel (c, r, k) per the DICOM standard: IPP_k + c·Δcol·row_cosine + r·Δrow·col_cosine.
    for k in (0, 17, 39):
        ds = datasets[k]
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        d_row, d_col = (float(v) for v in ds.PixelSpacing)
        c, r = 100, 7
        expected = ipp + c * d_col * np.array([1, 0, 0]) + r * d_row * np.array([0, 1, 0])
        assert np.allclose((affine @ [c, r, k, 1])[:3], expected, atol=1e-6)


def test_tumour_centre_voxel_and_centroid(phantom: Phantom) -> None:
    affine = phantom.affine()
    half_voxel = np.diag(affine)[:3] / 2
    assert len(phantom.tumours) == 2
    for t in phantom.tumours:
        c, r, k = np.rint(np.linalg.solve(affine, [*t.centre_mm, 1])[:3]).astype(int)
        assert phantom.labels[k, r, c] == t.label
        assert np.all(np.abs((affine @ [c, r, k, 1])[:3] - t.centre_mm) <= half_voxel + 1e-9)
        kk, rr, cc = np.nonzero(phantom.labels == t.label)
        centroid = (affine @ [cc.mean(), rr.mean(), kk.mean(), 1])[:3]
        assert np.all(np.abs(centroid - t.centre_mm) <= half_voxel)
        assert 4 <= t.radius_mm <= 15 and 0 <= t.hu <= 60
        assert t.label == TUMOUR_LABEL_BASE + phantom.tumours.index(t)


def test_hu_matches_labels(phantom: Phantom) -> None:
    hu, labels = phantom.hu.astype(float), phantom.labels
    for side in ("right_lung", "left_lung"):
        assert hu[labels == LABELS[side]].mean() < -700
    assert hu[labels == LABELS["background"]].mean() < -950
    assert hu[labels == LABELS["bone"]].mean() > 300
    for t in phantom.tumours:
        assert abs(hu[labels == t.label].mean() - t.hu) < 30
    noise = hu[labels == LABELS["background"]].std()
    assert 10 < noise < 30


def test_tumours_lie_wholly_inside_their_lung(phantom: Phantom) -> None:
    labels = phantom.labels
    for t in phantom.tumours:
        lung = LABELS[f"{t.side}_lung"]
        kk, rr, cc = np.nonzero(labels == t.label)
        for axis, size in enumerate(labels.shape):
            for step in (-1, 1):
                idx = [kk, rr, cc]
                idx[axis] = idx[axis] + step
                assert np.all((idx[axis] >= 0) & (idx[axis] < size)), "tumour touches the edge"
                neighbours = labels[tuple(idx)]
                assert np.all((neighbours == t.label) | (neighbours == lung)), t


def test_lungs_sides_and_extent(phantom: Phantom) -> None:
    labels = phantom.labels
    right_c = np.nonzero(labels == LABELS["right_lung"])[2]
    left_c = np.nonzero(labels == LABELS["left_lung"])[2]
    # Column index grows towards the patient's left (+x in LPS).
    assert right_c.max() < labels.shape[2] / 2 < left_c.min()
    with_lung = [bool(np.isin(s, (3, 4)).any()) for s in labels]
    assert not with_lung[0] and not with_lung[-1]
    assert 0.7 * len(with_lung) < sum(with_lung) < len(with_lung)
    middle = labels[len(labels) // 2]
    assert (middle == 3).sum() > 200 and (middle == 4).sum() > 200
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 10, 11}


def test_volumes_are_voxel_counts(study: SynthStudy, phantom: Phantom) -> None:
    voxel = phantom.pixel_spacing[0] * phantom.pixel_spacing[1] * phantom.slice_thickness
    truth = json.loads(study.truth_json.read_text())
    assert truth["StudyInstanceUID"] == study.StudyInstanceUID
    assert truth["SeriesInstanceUID"] == study.SeriesInstanceUID
    assert truth["labels"]["right_lung"] == 3 and truth["labels"]["tumour_1"] == 11
    for t, entry in zip(phantom.tumours, truth["tumours"], strict=True):
        count = int(np.count_nonzero(phantom.labels == t.label))
        assert t.volume_mm3 == pytest.approx(count * voxel, rel=1e-12)
        assert entry["label"] == t.label and entry["side"] == t.side
        assert entry["centre_mm"] == list(t.centre_mm)
        assert entry["volume_mm3"] == pytest.approx(t.volume_mm3)
        assert entry["volume_ml"] == pytest.approx(t.volume_mm3 / 1000)
    for lung in truth["lungs"]:
        count = int(np.count_nonzero(phantom.labels == lung["label"]))
        assert lung["volume_mm3"] == pytest.approx(count * voxel, rel=1e-12)
    assert [i["SOPInstanceUID"] for i in truth["instances"]] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in study.files
    ]


def test_non_chest_has_no_lungs_or_tumours(tmp_path: Path) -> None:
    study = synth_ct(tmp_path, slices=12, rows=96, columns=96, chest=False)
    with np.load(study.ground_truth) as npz:
        assert set(np.unique(npz["labels"])) == {0, 1, 2}
    truth = json.loads(study.truth_json.read_text())
    assert truth["tumours"] == [] and truth["lungs"] == []
    ds = pydicom.dcmread(study.files[0])
    assert ds.BodyPartExamined == "ABDOMEN"


def test_small_field_of_view_still_has_a_chest() -> None:
    p = make_phantom(slices=30, rows=64, columns=64, pixel_spacing=5.6, tumours=1, seed=1)
    assert len(p.tumours) == 1
    assert (p.labels[15] == 3).sum() > 20 and (p.labels[15] == 4).sum() > 20


def test_issuer_variants(phantom: Phantom, tmp_path: Path) -> None:
    uri = write_ct_series(phantom, tmp_path / "u", issuer_of_patient_id="https://example.org/mrn")
    item = pydicom.dcmread(uri.files[0]).IssuerOfPatientIDQualifiersSequence[0]
    assert (item.UniversalEntityID, item.UniversalEntityIDType) == (
        "https://example.org/mrn",
        "URI",
    )
    none = pydicom.dcmread(
        write_ct_series(phantom, tmp_path / "n", issuer_of_patient_id=None).files[0]
    )
    assert "IssuerOfPatientIDQualifiersSequence" not in none and "IssuerOfPatientID" not in none


def test_rewrite_with_fewer_slices_removes_stale_files(tmp_path: Path) -> None:
    synth_ct(tmp_path, slices=6, rows=64, columns=64, tumours=0)
    synth_ct(tmp_path, slices=4, rows=64, columns=64, tumours=0)
    assert sorted(p.name for p in tmp_path.glob("CT*.dcm")) == [
        f"CT000{i}.dcm" for i in range(1, 5)
    ]


def test_dciodvfy_finds_no_errors(study: SynthStudy) -> None:
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (dicom3tools) is not installed")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    for f in (study.files[0], study.files[20]):
        r = subprocess.run([exe, str(f)], capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        assert "CTImage" in out, out  # it recognised the IOD
        assert not [line for line in out.splitlines() if "Error" in line], out


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"slices": 0}, "slices"),
        ({"tumours": -1}, "tumours"),
        ({"tumours": MAX_TUMOURS + 1}, "tumours"),
        ({"rows": 8}, "rows"),
        ({"columns": 0}, "columns"),
        ({"seed": -1}, "seed"),
        ({"pixel_spacing": 0.0}, "pixel_spacing"),
        ({"pixel_spacing": float("nan")}, "pixel_spacing"),
        ({"slice_thickness": -2.5}, "slice_thickness"),
        ({"slices": 3, "tumours": 1}, "tumours"),  # a tumour cannot fit in three slices
    ],
)
def test_make_phantom_rejects_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    args = {"rows": 64, "columns": 64, "slices": 10, "pixel_spacing": 5.6, **kwargs}
    with pytest.raises(ValueError, match=name):
        make_phantom(**args)


def test_make_phantom_rejects_wrong_types() -> None:
    with pytest.raises(TypeError, match="slices"):
        make_phantom(slices=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="chest"):
        make_phantom(slices=2, rows=32, columns=32, chest="no")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"study_date": "2026-01-01"}, "study_date"),
        ({"study_date": "20261301"}, "study_date"),
        ({"uid_root": "1.2.3"}, "uid_root"),
        ({"uid_root": "1.02.3."}, "uid_root"),
        ({"patient_id": ""}, "patient_id"),
        ({"patient_id": "A\\B"}, "patient_id"),
        ({"accession_number": "X" * 17}, "accession_number"),
        ({"body_part": "chest"}, "body_part"),
        ({"issuer_of_patient_id": "urn:oid:1.2.x"}, "issuer_of_patient_id"),
    ],
)
def test_write_rejects_bad_arguments(
    phantom: Phantom, tmp_path: Path, kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        write_ct_series(phantom, tmp_path, **kwargs)
    assert not list(tmp_path.glob("*.dcm"))  # nothing written before the arguments are checked
