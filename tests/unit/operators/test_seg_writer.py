"""The SEG writer: valid DICOM (dciodvfy), right segments and codes, pixels on the right source
frames, deterministic bytes, single-frame and Enhanced CT sources, sparse source headers."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from radfusion.operators.measurement import measure
from radfusion.operators.results import AlgorithmInfo, SegmentationResult
from radfusion.operators.seg_writer import SERIES_NUMBER, build_seg, write_seg
from radfusion.operators.volume import Volume, assemble_volume
from radfusion.synth.ct import LABELS, TUMOUR_LABEL_BASE, make_phantom
from radfusion.synth.ct_series import write_ct_series
from tests.conftest import require_tool, reversed_enhanced_ct
from tests.detection_support import anatomy_from_truth

ALGORITHM = AlgorithmInfo(
    name="radfusion-lung-ct", version="0.1.0", parameters=(("inference", "in-process"),)
)
UIDS = {
    "series_instance_uid": "1.2.826.0.1.3680043.10.1234.9.77",
    "sop_instance_uid": "1.2.826.0.1.3680043.10.1234.9.78",
}
LABEL_MAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclasses.dataclass(frozen=True)
class Case:
    volume: Volume
    result: SegmentationResult
    truth: np.ndarray  # synthetic ground truth labels, [k, r, c] in the volume's order


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    phantom = make_phantom(
        slices=24, rows=96, columns=96, pixel_spacing=3.5, slice_thickness=5, tumours=2, seed=3
    )
    study = write_ct_series(phantom, tmp_path_factory.mktemp("ct"))
    volume = assemble_volume([pydicom.dcmread(f) for f in study.files])
    # The synthetic files are written in slice order, so the truth is in the volume's k order.
    assert [int(ds.InstanceNumber) for ds in volume.source_images] == list(range(1, 25))
    truth = np.load(study.ground_truth)["labels"]
    anatomy = anatomy_from_truth(truth)
    measured = measure(anatomy, volume, uid_root="1.2.826.0.1.3680043.10.1234.9.")
    assert measured.result is not None, measured.out_of_scope_reason
    return Case(volume, measured.result, truth)


def dciodvfy(path: Path) -> tuple[str, list[str]]:
    """dciodvfy's report and its error lines; warnings are printed for the log."""
    exe = require_tool("dciodvfy")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    print(out)
    return out, [line for line in out.splitlines() if "Error" in line]


def pixels(seg: hd.seg.Segmentation, volume: Volume) -> np.ndarray:
    """The SEG's label map per source slice, [k, r, c] in the volume's order."""
    return seg.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in volume.source_images],
        combine_segments=True,
        assert_missing_frames_are_empty=True,  # empty frames are omitted
    )


def test_binary_seg_is_valid_dicom(case: Case, tmp_path: Path) -> None:
    path = write_seg(
        case.volume.source_images, case.result, ALGORITHM, path=tmp_path / "seg.dcm", **UIDS
    )
    out, errors = dciodvfy(path)
    assert "Segmentation" in out, out  # it recognised the IOD
    assert not errors, out


def test_segments_codes_and_identification(case: Case, tmp_path: Path) -> None:
    path = write_seg(
        case.volume.source_images, case.result, ALGORITHM, path=tmp_path / "seg.dcm", **UIDS
    )
    seg = hd.seg.segread(path)
    source = case.volume.source_images[0]
    assert seg.SOPClassUID == SEG_SOP_CLASS
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == tuple(UIDS.values())
    assert (seg.SeriesNumber, seg.InstanceNumber) == (SERIES_NUMBER, 1)
    assert "not for clinical use" in seg.SeriesDescription
    assert (seg.Manufacturer, seg.ManufacturerModelName, seg.SoftwareVersions) == (
        "radfusion",
        ALGORITHM.name,
        ALGORITHM.version,
    )
    assert seg.DeviceSerialNumber
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame names its source image
        assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID

    findings = case.result.findings
    assert [(f.kind, f.side) for f in findings][:2] == [("lung", "right"), ("lung", "left")]
    assert [f.kind for f in findings[2:]] == ["tumour", "tumour"]
    assert seg.get_segment_numbers() == [f.segment_number for f in findings]
    for finding in findings:
        item = seg.get_segment_description(finding.segment_number)
        assert item.segment_label == finding.tracking_id
        assert item.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = item.algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
            ALGORITHM.name,
            ALGORITHM.version,
        )
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # AI, CID 7162
        assert (item.tracking_id, item.tracking_uid) == (finding.tracking_id, finding.tracking_uid)
        side = codes.cid244.Right if finding.side == "right" else codes.cid244.Left
        if finding.kind == "lung":
            assert item.segmented_property_category == codes.cid7150.AnatomicalStructure
            assert item.segmented_property_type == codes.cid7151.Lung
            modifier = item.SegmentedPropertyTypeCodeSequence[0]
            assert modifier.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == side.value
        else:
            assert item.segmented_property_category == (
                codes.cid7150.MorphologicallyAbnormalStructure
            )
            assert item.segmented_property_type == codes.cid7151.Neoplasm
            region = item.AnatomicRegionSequence[0]
            assert region.CodeValue == codes.SCT.Lung.value
            assert region.AnatomicRegionModifierSequence[0].CodeValue == side.value

    ours = [
        e
        for e in seg.ContributingEquipmentSequence
        if e.get("ManufacturerModelName") == ALGORITHM.name
    ]
    assert len(ours) == 1
    assert (ours[0].Manufacturer, ours[0].SoftwareVersions) == ("radfusion", ALGORITHM.version)
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert pydicom.uid.UID(ours[0].DeviceUID).is_valid


def test_pixels_match_the_label_map_and_the_truth(case: Case, tmp_path: Path) -> None:
    path = write_seg(
        case.volume.source_images, case.result, ALGORITHM, path=tmp_path / "seg.dcm", **UIDS
    )
    got = pixels(hd.seg.segread(path), case.volume)
    np.testing.assert_array_equal(got, case.result.labels)
    by_number = {f.segment_number: f for f in case.result.findings}
    right = next(n for n, f in by_number.items() if f.kind == "lung" and f.side == "right")
    left = next(n for n, f in by_number.items() if f.kind == "lung" and f.side == "left")
    np.testing.assert_array_equal(got == right, case.truth == LABELS["right_lung"])
    np.testing.assert_array_equal(got == left, case.truth == LABELS["left_lung"])
    tumours = [n for n, f in by_number.items() if f.kind == "tumour"]
    np.testing.assert_array_equal(np.isin(got, tumours), case.truth >= TUMOUR_LABEL_BASE)


def test_labelmap_seg_is_valid_and_holds_the_same_pixels(case: Case, tmp_path: Path) -> None:
    path = write_seg(
        case.volume.source_images,
        case.result,
        ALGORITHM,
        path=tmp_path / "labelmap.dcm",
        labelmap=True,
        **UIDS,
    )
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == LABEL_MAP_SOP_CLASS
    assert seg.SegmentationType == "LABELMAP"
    np.testing.assert_array_equal(pixels(seg, case.volume), case.result.labels)

    # dicom3tools of 2022 predates Label Map Segmentation (2024): it does not know the IOD,
    # and applies the older SEG IOD's rule that segment numbers start at 1 (a label map's
    # background is segment 0). Those two errors are expected; any other is not.
    _, errors = dciodvfy(path)
    tool_too_old = ("Information Object Not found", "SegmentNumber not monotonically")
    assert [e for e in errors if not any(t in e for t in tool_too_old)] == []

    # So check every module the two IODs share by validating the same object as a BINARY
    # SEG: only the label-map differences may be reported.
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SEG_SOP_CLASS
    ds.save_as(tmp_path / "as-seg.dcm")
    out, errors = dciodvfy(tmp_path / "as-seg.dcm")
    assert "Segmentation" in out, out
    label_map_differences = (
        "<LABELMAP> for value 1 of attribute <Segmentation Type>",
        "Value is zero for value 1 of attribute <Segment Number>",
        "SegmentNumber not monotonically increasing",
        "Element=<SegmentIdentificationSequence> Module=<SegmentationMacro>",  # per frame
    )
    assert [e for e in errors if not any(d in e for d in label_map_differences)] == []


def test_output_is_deterministic(case: Case, tmp_path: Path) -> None:
    for labelmap in (False, True):
        a, b = (
            write_seg(
                case.volume.source_images,
                case.result,
                ALGORITHM,
                path=tmp_path / f"{name}.dcm",
                labelmap=labelmap,
                **UIDS,
            )
            for name in ("a", "b")
        )
        assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_enhanced_ct_source(case: Case, tmp_path: Path) -> None:
    enhanced, volume = reversed_enhanced_ct(case.volume.source_images, tmp_path)
    assert volume.frame_numbers != tuple(range(1, 25))
    np.testing.assert_array_equal(volume.hu, case.volume.hu)

    path = write_seg(
        volume.source_images,
        case.result,
        ALGORITHM,
        path=tmp_path / "seg.dcm",
        frame_numbers=volume.frame_numbers,
        **UIDS,
    )
    out, errors = dciodvfy(path)
    assert "Segmentation" in out and not errors, out
    seg = hd.seg.segread(path)
    got = seg.get_pixels_by_source_frame(
        str(enhanced.SOPInstanceUID),
        list(volume.frame_numbers),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(got, case.result.labels)

    # The multi-frame image passed once, without frame numbers: frames are ordered along the
    # slice normal as assemble_volume orders them, giving the same object.
    again = write_seg(
        [volume.source_images[0]], case.result, ALGORITHM, path=tmp_path / "again.dcm", **UIDS
    )
    assert again.read_bytes() == path.read_bytes()


def test_sparse_source_headers(case: Case, tmp_path: Path) -> None:
    sparse = []
    for ds in case.volume.source_images:
        ds = pydicom.dcmread(ds.filename)  # a private copy to strip
        for keyword in (
            "PatientName",
            "PatientBirthDate",
            "PatientSex",
            "SeriesNumber",
            "StudyID",
            "AccessionNumber",
            "ReferringPhysicianName",
            "StudyDate",
            "StudyTime",
            "Manufacturer",
        ):
            if keyword in ds:
                delattr(ds, keyword)
        sparse.append(ds)
    before = [len(ds) for ds in sparse]
    path = write_seg(sparse, case.result, ALGORITHM, path=tmp_path / "seg.dcm", **UIDS)
    assert [len(ds) for ds in sparse] == before  # the caller's datasets are untouched
    out, errors = dciodvfy(path)
    assert not errors, out
    seg = hd.seg.segread(path)
    assert seg.PatientName == "" and seg.StudyID == ""
    assert seg.ContentDate == case.volume.source_images[0].SeriesDate  # the next date found
    np.testing.assert_array_equal(pixels(seg, case.volume), case.result.labels)


def test_no_findings_is_refused(case: Case) -> None:
    empty = SegmentationResult(labels=np.zeros_like(case.result.labels), findings=())
    with pytest.raises(ValueError, match="no findings"):
        build_seg(case.volume.source_images, empty, ALGORITHM, **UIDS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v, r: (v.source_images[:-1], r), "24 slices but there are 23 source images"),
        (lambda v, r: ([*v.source_images[:-1], v.source_images[0]], r), "more than once"),
        (
            lambda v, r: (v.source_images, dataclasses.replace(r, findings=r.findings[:2])),
            "no finding describing them",
        ),
        (
            lambda v, r: (
                v.source_images,
                SegmentationResult(labels=r.labels[:, :50], findings=r.findings),
            ),
            "label map is 50x96",
        ),
    ],
)
def test_mismatched_inputs_are_refused(case: Case, change: object, message: str) -> None:
    images, result = change(case.volume, case.result)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        build_seg(images, result, ALGORITHM, **UIDS)


def test_long_algorithm_name_keeps_the_notice(case: Case) -> None:
    algorithm = dataclasses.replace(ALGORITHM, name="x" * 40, version="1.0.0-rc.1+build.20260101")
    seg = build_seg(case.volume.source_images, case.result, algorithm, **UIDS)
    assert len(seg.SeriesDescription) <= 64
    assert seg.SeriesDescription.endswith("(demonstration, not for clinical use)")


def test_source_without_pixel_data_is_enough(case: Case) -> None:
    headers = []
    for ds in case.volume.source_images:
        header = Dataset()
        header.update({e.tag: e for e in ds if e.keyword != "PixelData"})
        headers.append(header)
    seg = build_seg(headers, case.result, ALGORITHM, **UIDS)
    assert seg.NumberOfFrames > 0
