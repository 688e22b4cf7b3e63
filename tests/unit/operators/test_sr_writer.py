"""The SR writer: valid DICOM (dciodvfy, dsrdump), valid TID 1500 structure (PixelMed's
DicomSRValidator), one TID 1411 group per finding resolving to its SEG segment, the finding's
values, diameters as SCOORD lines on their CT image (and frame), the out-of-scope report,
determinism and sparse source headers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import subprocess
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from radfusion.operators.change import Comparison, NoduleChange
from radfusion.operators.measurement import measure
from radfusion.operators.result_identity import algorithm_device_uid
from radfusion.operators.results import AlgorithmInfo, SegmentationResult
from radfusion.operators.sr_writer import (
    SERIES_NUMBER,
    VIEWER_TRACKING_IDENTIFIER,
    build_sr,
    finding_label,
    write_sr,
)
from radfusion.operators.volume import Volume, assemble_volume
from radfusion.synth.ct import make_phantom
from radfusion.synth.ct_series import write_ct_series
from tests.conftest import require_tool, reversed_enhanced_ct
from tests.detection_support import DETECTION_SCORES, anatomy_from_truth

ALGORITHM = AlgorithmInfo(
    name="radfusion-lung-ct", version="0.1.0", parameters=(("inference", "in-process"),)
)
UIDS = {
    "series_instance_uid": "1.2.826.0.1.3680043.10.1234.9.87",
    "sop_instance_uid": "1.2.826.0.1.3680043.10.1234.9.88",
}
REASON = (
    "no lungs found (segmented lung volume 0 mL < 50 mL): the input does not appear to be a "
    "chest CT"
)
MEASUREMENT_NAMES = ("Volume", "Long axis", "Attenuation Coefficient")
# What the lung CT app adds when the site has a FHIR server (apps/lung_ct).
STATEMENTS = (
    "Clinical and genomic data (FHIR): unavailable, the FHIR server could not be reached "
    "(FHIR server https://fhir.example.org/R4 unavailable for Patient: ConnectError)",
    "This algorithm uses imaging only.",
)


@dataclasses.dataclass(frozen=True)
class Case:
    volume: Volume
    result: SegmentationResult
    seg: Dataset  # a SEG of the result, built with highdicom directly (no SEG writer needed)

    @property
    def sources(self) -> list[Dataset]:
        return list(self.volume.source_images)


def _seg(volume: Volume, result: SegmentationResult) -> Dataset:
    """A BINARY SEG with one segment per finding, numbered as the findings."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM.name, family=codes.cid7162.ArtificialIntelligence, version="0.1.0"
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=f.segment_number,
            segment_label=f.tracking_id,
            segmented_property_category=(
                codes.cid7150.AnatomicalStructure
                if f.kind == "lung"
                else codes.cid7150.MorphologicallyAbnormalStructure
            ),
            segmented_property_type=(
                codes.cid7151.Lung if f.kind == "lung" else codes.cid7151.Neoplasm
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f.tracking_id,
            tracking_uid=f.tracking_uid,
        )
        for f in result.findings
    ]
    seg = hd.seg.Segmentation(
        source_images=list(volume.source_images),
        pixel_array=result.labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid="1.2.826.0.1.3680043.10.1234.9.85",
        series_number=901,
        sop_instance_uid="1.2.826.0.1.3680043.10.1234.9.86",
        instance_number=1,
        manufacturer=ALGORITHM.manufacturer,
        manufacturer_model_name=ALGORITHM.name,
        software_versions=ALGORITHM.version,
        device_serial_number="1",
        omit_empty_frames=True,
    )
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(seg)))


def _encode(ds: Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


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
    assert [f.kind for f in measured.result.findings] == ["lung", "lung", "tumour", "tumour"]
    return Case(volume, measured.result, _seg(volume, measured.result))


@pytest.fixture(scope="module")
def sr_path(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    return write_sr(
        case.sources, case.seg, case.result, ALGORITHM, statements=STATEMENTS, path=path, **UIDS
    )


@pytest.fixture(scope="module")
def out_of_scope_path(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    return write_sr(
        case.sources, None, None, ALGORITHM, out_of_scope_reason=REASON, path=path, **UIDS
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines; its whole report is printed for the log."""
    exe = require_tool("dciodvfy")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    print(out)
    return [line for line in out.splitlines() if "Error" in line]


def dsrdump(path: Path) -> str:
    exe = require_tool("dsrdump")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


# PixelMed's DicomSRValidator (Debian pixelmed-apps): Java 17 needs the XPath limits lifted.
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
PIXELMED_JVM_FLAGS = (
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)


@dataclasses.dataclass(frozen=True)
class KnownFinding:
    """A DicomSRValidator message that is PixelMed's limitation, not a defect of the SR."""

    pattern: str  # regular expression, searched in the message
    reason: str


# Each was checked against the current standard (PS3.16) and highdicom 0.28; the Debian package
# carries PixelMed's 2022-06-18 template tables. Anything else PixelMed reports fails the test.
_NOT_IN_TEMPLATE = r": Content Item not in template$"
PIXELMED_KNOWN = (
    KnownFinding(
        r'\[Row 4\] CODE \(121058,DCM,"Procedure reported"\).*'
        r'Code \(24627-2,LN,"CT Chest"\) not found in context group 100$',
        "TID 1500 row 4 is BCID 100 (baseline, extensible): another code is allowed, and CID 100"
        " has no chest CT; PixelMed reports every code outside a context group as an error",
    ),
    KnownFinding(
        r'/CODE \(276214006,SCT,"Finding category"\)' + _NOT_IN_TEMPLATE,
        "Finding category joined TID 1410/1411/1501 with CP-2176, after PixelMed's tables",
    ),
    KnownFinding(
        r'Measurement Group"\)/TEXT \((111001|111002|111003),DCM,"Algorithm '
        r'(Name|Parameters|Version)"\)' + _NOT_IN_TEMPLATE,
        "TID 4019 on the Measurement Group (highdicom's algorithm_id): not in PixelMed's"
        " 2022 TID 1410/1411 tables",
    ),
    KnownFinding(
        r'/TEXT \(122405,DCM,"Algorithm Manufacturer"\)' + _NOT_IN_TEMPLATE,
        "TID 4019 row 2b (Algorithm Manufacturer) is newer than PixelMed's TID 4019 table",
    ),
    KnownFinding(
        r'\[Row 12\] CONTAINER \(C0034375,UMLS,"Qualitative Evaluations"\)/\[Row 14\] TEXT \*'
        r'.*/TEXT \((111001|111002|111003|122405),DCM,"Algorithm [A-Za-z]+"\): '
        r"Incorrect relationship - expected CONTAINS - found HAS CONCEPT MOD$",
        "the TID 4019 items of TID 1500 row 12b also match row 14's wildcard TEXT row; PixelMed"
        " checks them against both (a template ambiguity; row 12b is what they are)",
    ),
)


def pixelmed_messages(path: Path) -> list[str]:
    """DicomSRValidator's Error and Warning lines; its whole report is printed for the log."""
    java = require_tool("java")
    if not PIXELMED_JAR.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{PIXELMED_JAR} is missing; .ci/run must install pixelmed-apps")
        pytest.skip(f"PixelMed is not installed ({PIXELMED_JAR}; Debian pixelmed-apps)")
    command = [
        java, *PIXELMED_JVM_FLAGS, "-cp", str(PIXELMED_JAR),
        "com.pixelmed.validate.DicomSRValidator",
        "-checktemplateid", "-checkcontentitemorder", str(path),
    ]  # fmt: skip
    r = subprocess.run(command, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    print(out)
    assert "Root Template Validation Complete" in out, out  # it ran to the end
    return [line for line in out.splitlines() if line.startswith(("Error:", "Warning:"))]


def unexplained(messages: list[str]) -> list[str]:
    """The messages no :data:`PIXELMED_KNOWN` entry explains."""
    return [m for m in messages if not any(re.search(k.pattern, m) for k in PIXELMED_KNOWN)]


# -- validity -----------------------------------------------------------------------------------


def test_sr_is_valid_dicom(sr_path: Path, out_of_scope_path: Path) -> None:
    assert dciodvfy_errors(sr_path) == []
    assert dciodvfy_errors(out_of_scope_path) == []


def test_dsrdump_reads_the_measurements(sr_path: Path) -> None:
    out = dsrdump(sr_path)
    assert '"Imaging Measurement Report"' in out
    for name in MEASUREMENT_NAMES:
        assert f'NUM:(,,"{name}")' in out, name
    # The diameter line hangs off its NUM (TID 300 row 8): INFERRED FROM a SCOORD.
    assert re.search(r'<inferred from SCOORD:\(,,"Source"\)=\(POLYLINE', out), out
    assert '"Image Region"' not in out  # no group-level line: OHIF would not load the finding
    assert "SCOORD3D" not in out
    assert '"Referenced Segment"' in out


# PixelMed (2022 tables) checks every Measurement Group that has no ROI against TID 1411, though
# TID 1500 row 8 includes TID 1501 for exactly such groups: it then misses TID 1411's ROI rows
# and calls TID 1501's own rows (a NUM INFERRED FROM SCOORD, TID 300 row 8; a TEXT Comment, row
# 12) "not in template". A plain highdicom TID 1501 group, without line or comment, gets the
# same three errors. Only messages about the TID 1501 groups are excused, and only these.
_TID1501_AS_1411 = (
    r"^Error: Template 1411 VolumetricROIMeasurements/\[Row 1\] CONTAINER \(125007,DCM,"
    r'"Measurement Group"\)/\[Row (5|7|10)\] (SCOORD|IMAGE|SCOORD3D) .*'
    r"within (?P<path>\d+\.\d+\.\d+): .*Missing conditional content item$",
    r"^Warning: (?P<path>\d+\.\d+\.\d+)\.\d+(\.1)*: .*/(TEXT \(121106,DCM,\"Comment\"\)|NUM "
    r'\(103339001,SCT,"Long axis"\)/SCOORD .*)' + _NOT_IN_TEMPLATE,
)


def _tid1501_paths(path: Path) -> set[str]:
    """The content item paths (e.g. "1.10.1") of the report's TID 1501 groups."""
    ds = pydicom.dcmread(path)
    (measurements,) = (
        i
        for i, item in enumerate(ds.ContentSequence, 1)
        if "ContentSequence" in item and item.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    groups = ds.ContentSequence[measurements - 1].ContentSequence
    return {
        f"1.{measurements}.{k}"
        for k, group in enumerate(groups, 1)
        if any(
            i.ConceptNameCodeSequence[0].CodeValue == "112039"
            and i.TextValue == VIEWER_TRACKING_IDENTIFIER
            for i in group.ContentSequence
        )
    }


def test_pixelmed_reports_nothing_of_ours(sr_path: Path) -> None:
    messages = pixelmed_messages(sr_path)
    tid1501 = _tid1501_paths(sr_path)
    assert tid1501
    excused = []
    for message in messages:
        for pattern in _TID1501_AS_1411:
            match = re.search(pattern, message)
            if match and match.group("path") in tid1501:
                excused.append(message)
    assert unexplained([m for m in messages if m not in excused]) == []
    # The TID 1411 groups (segment, measurements) miss no condition.
    assert not [m for m in messages if "Missing conditional" in m and m not in excused]


def test_pixelmed_reports_nothing_of_ours_out_of_scope(out_of_scope_path: Path) -> None:
    assert unexplained(pixelmed_messages(out_of_scope_path)) == []


# -- content ------------------------------------------------------------------------------------


def test_one_volumetric_group_per_finding_resolving_to_its_segment(
    case: Case, sr_path: Path
) -> None:
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    findings = case.result.findings
    assert [g.tracking_identifier for g in groups] == [f.tracking_id for f in findings]
    assert [g.tracking_uid for g in groups] == [f.tracking_uid for f in findings]
    segments = {int(s.SegmentNumber): s for s in case.seg.SegmentSequence}
    for group, finding in zip(groups, findings, strict=True):
        reference = group.referenced_segment
        assert reference is not None
        sop = reference[0].ReferencedSOPSequence[0]  # the "Referenced Segment" IMAGE item
        assert sop.ReferencedSOPInstanceUID == case.seg.SOPInstanceUID
        assert sop.ReferencedSOPClassUID == case.seg.SOPClassUID
        number = int(sop.ReferencedSegmentNumber)
        assert number == finding.segment_number
        assert segments[number].SegmentLabel == finding.tracking_id
        site = group.finding_sites[0]
        assert site.value == codes.SCT.Lung
        assert site.laterality == (codes.SCT.Right if finding.side == "right" else codes.SCT.Left)
        expected = codes.SCT.Lung if finding.kind == "lung" else codes.SCT.Neoplasm
        assert group.finding_type == expected
    # The SEG and every source image are evidence of the SR, so a PACS can resolve them.
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == {case.seg.SOPInstanceUID} | {ds.SOPInstanceUID for ds in case.sources}


def test_measurements_are_the_findings_values(case: Case, sr_path: Path) -> None:
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    for group, finding in zip(groups, case.result.findings, strict=True):
        volumes = {m.unit.value: m.value for m in group.get_measurements(name=codes.SCT.Volume)}
        assert volumes["mm3"] == pytest.approx(finding.volume_mm3, rel=1e-12)
        assert volumes["ml"] == pytest.approx(finding.volume_ml, rel=1e-12)
        (long_axis,) = group.get_measurements(name=codes.SCT.LongAxis)
        assert long_axis.unit.value == "mm"
        assert long_axis.value == pytest.approx(finding.longest_axial_diameter_mm, rel=1e-12)
        hu = {
            m.derivation.value: m
            for m in group.get_measurements(name=codes.DCM.AttenuationCoefficient)
        }
        assert hu["373098007"].value == pytest.approx(finding.mean_hu, rel=1e-12)
        assert hu["386136009"].value == pytest.approx(finding.sd_hu, rel=1e-12)
        assert {m.unit.value for m in hu.values()} == {"[hnsf'U]"}
        for measurement in group.get_measurements():  # each names the algorithm (TID 4019)
            items = {
                item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue")
                for item in measurement[0].ContentSequence
            }
            assert items["Algorithm Name"] == ALGORITHM.name
            assert items["Algorithm Version"] == ALGORITHM.version


def test_a_nodules_detection_score_is_its_certainty_of_finding(case: Case, sr_path: Path) -> None:
    """DCM 111012 "Certainty of Finding", UCUM "1", in the nodule's TID 1411 group (with the
    algorithm named); the lungs, which have no score, have none. The SR stays valid."""
    certainty = codes.DCM.CertaintyOfFinding
    assert certainty.value == "111012"
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    tumours = [f for f in case.result.findings if f.kind == "tumour"]
    assert [f.detection_score for f in tumours] == list(DETECTION_SCORES)
    for group, finding in zip(groups, case.result.findings, strict=True):
        scores = group.get_measurements(name=certainty)
        if finding.kind == "lung":
            assert finding.detection_score is None
            assert scores == []
            continue
        (score,) = scores
        assert score.value == pytest.approx(finding.detection_score, abs=5e-4)
        assert (score.unit.value, score.unit.scheme_designator) == ("1", "UCUM")
        items = {
            item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue")
            for item in score[0].ContentSequence
        }
        assert items["Algorithm Name"] == ALGORITHM.name
    assert 'NUM:(,,"Certainty of Finding")' in dsrdump(sr_path)
    assert dciodvfy_errors(sr_path) == []


def _expected_scoord(volume: Volume, lps: np.ndarray) -> tuple[int, np.ndarray]:
    """The volume's slice index of LPS points on one slice and their SCOORD (column, row): by
    the volume's own affine, independently of the writer's search over the source planes. A
    voxel centre (r, c) is (c + 0.5, r + 0.5): 0.0\\0.0 is the top left corner of the top left
    pixel (PS3.3 Table C.18.6-1)."""
    crk = (np.linalg.inv(volume.affine) @ np.c_[lps, np.ones(len(lps))].T).T[:, :3]
    (k,) = set(np.rint(crk[:, 2]).astype(int).tolist())
    return k, crk[:, :2] + 0.5


def _source_plane(ds: Dataset, frame: int | None) -> tuple[list[float], list[float], list[float]]:
    """Image Position, Image Orientation (Patient) and Pixel Spacing of an image or frame."""
    if frame is None:
        return ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    item = ds.PerFrameFunctionalGroupsSequence[frame - 1]
    shared = ds.SharedFunctionalGroupsSequence[0]
    groups = {
        keyword: (item if keyword in item else shared)[keyword][0]
        for keyword in (
            "PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
        )
    }  # fmt: skip
    return (
        groups["PlanePositionSequence"].ImagePositionPatient,
        groups["PlaneOrientationSequence"].ImageOrientationPatient,
        groups["PixelMeasuresSequence"].PixelSpacing,
    )


def _line(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> Any:
    """The SCOORD the group's only NUM (the long axis) is INFERRED FROM."""
    (long_axis,) = group.get_measurements(name=codes.SCT.LongAxis)
    (line,) = long_axis.referenced_coordinates or ()
    return line


def _check_diameter_lines(
    path: Path, volume: Volume, result: SegmentationResult, *, multi_frame: bool
) -> None:
    """Each finding's TID 1501 group: its Long axis NUM INFERRED FROM a two-point SCOORD
    POLYLINE selected from the source image (and frame) its diameter lies in, whose coordinates
    map back to the end points; the Cornerstone tool's Tracking Identifier, the finding's
    Tracking UID, and the finding's label."""
    sr = hd.sr.srread(path)
    drawn = sr.content.get_image_measurement_groups()
    assert sr.content.get_planar_roi_measurement_groups() == []
    # Same tracking UID as the finding's volumetric group: the same finding (OHIF merges them).
    # Every finding has one: OHIF 3.13 cannot open an SR with a merged group lacking coordinates.
    assert [g.tracking_uid for g in drawn] == [f.tracking_uid for f in result.findings]
    assert {g.tracking_identifier for g in drawn} == {VIEWER_TRACKING_IDENTIFIER}
    sources = {str(ds.SOPInstanceUID): ds for ds in volume.source_images}
    for group, finding in zip(drawn, result.findings, strict=True):
        # Exactly one NUM, the long axis in mm, and the label as the only TEXT Comment.
        nums = [i for i in group[0].ContentSequence if i.ValueType == "NUM"]
        assert [n.ConceptNameCodeSequence[0].CodeMeaning for n in nums] == ["Long axis"]
        assert nums[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm"
        comments = [
            str(i.TextValue)
            for i in group[0].ContentSequence
            if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
        ]
        assert comments == [finding_label(finding)]
        region = _line(group)
        assert region.value_type == hd.sr.ValueTypeValues.SCOORD
        assert region.relationship_type == hd.sr.RelationshipTypeValues.INFERRED_FROM
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        (image,) = region.ContentSequence  # SELECTED FROM the one image it lies in
        assert image.RelationshipType == "SELECTED FROM" and image.ValueType == "IMAGE"
        (sop,) = image.ReferencedSOPSequence
        source = sources[sop.ReferencedSOPInstanceUID]  # an image of the CT series
        assert sop.ReferencedSOPClassUID == source.SOPClassUID
        frame = int(sop.ReferencedFrameNumber) if "ReferencedFrameNumber" in sop else None
        assert (frame is not None) == multi_frame
        ends = np.asarray(finding.diameter_endpoints_lps)
        k, expected = _expected_scoord(volume, ends)
        assert source is volume.source_images[k]
        assert frame == (volume.frame_numbers[k] if multi_frame else None)
        pixels = np.asarray(region.value, dtype=float)
        np.testing.assert_allclose(pixels, expected, atol=1e-3)
        # Back through the referenced image's own geometry: the end points, within 0.5 px.
        position, orientation, spacing = _source_plane(source, frame)
        to_patient = hd.spatial.ImageToReferenceTransformer(
            image_position=position, image_orientation=orientation, pixel_spacing=spacing
        )
        error_px = np.linalg.norm(to_patient(pixels) - ends, axis=1) / min(map(float, spacing))
        assert error_px.max() < 0.5, error_px
        (long_axis,) = group.get_measurements(name=codes.SCT.LongAxis)
        assert long_axis.value == pytest.approx(finding.longest_axial_diameter_mm, rel=1e-12)


def test_each_finding_has_its_diameter_as_a_line_on_its_ct_image(case: Case, sr_path: Path) -> None:
    _check_diameter_lines(sr_path, case.volume, case.result, multi_frame=False)
    # The end points are voxel centres: each coordinate is a whole number and a half.
    for group in hd.sr.srread(sr_path).content.get_image_measurement_groups():
        pixels = np.asarray(_line(group).value, dtype=float)
        np.testing.assert_allclose(pixels % 1.0, 0.5, atol=1e-3)


def test_labels_say_which_finding_where_and_its_attenuation(case: Case) -> None:
    right, left, tumour = case.result.findings[:3]
    assert finding_label(right) == f"Right lung, mean {right.mean_hu:.0f} HU"
    assert finding_label(tumour) == f"{tumour.tracking_id}, {tumour.side} lung, mean " + (
        f"{tumour.mean_hu:.0f} HU"
    )
    assert finding_label(left).startswith("Left lung, mean ")


def test_enhanced_ct_source_gets_a_frame_number(case: Case, tmp_path: Path) -> None:
    _, volume = reversed_enhanced_ct(case.volume.source_images, tmp_path)
    assert volume.frame_numbers != tuple(range(1, 25))
    np.testing.assert_array_equal(volume.affine, case.volume.affine)  # the same findings fit
    path = write_sr(
        volume.source_images, case.seg, case.result, ALGORITHM, path=tmp_path / "sr.dcm", **UIDS
    )
    _check_diameter_lines(path, volume, case.result, multi_frame=True)
    assert dciodvfy_errors(path) == []


def test_a_diameter_of_one_point_is_a_line_of_two_equal_points(case: Case, tmp_path: Path) -> None:
    """A viewer's length tool needs two points; a POINT would not load."""
    first = case.result.findings[0]
    end = first.diameter_endpoints_lps[0]
    dot = dataclasses.replace(first, diameter_endpoints_lps=(end, end))
    result = dataclasses.replace(case.result, findings=(dot, *case.result.findings[1:]))
    path = write_sr(case.sources, case.seg, result, ALGORITHM, path=tmp_path / "sr.dcm", **UIDS)
    region = _line(hd.sr.srread(path).content.get_image_measurement_groups()[0])
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    _, expected = _expected_scoord(case.volume, np.asarray([end, end]))
    np.testing.assert_allclose(np.asarray(region.value, dtype=float), expected, atol=1e-3)


def test_a_diameter_on_no_source_image_is_refused(case: Case) -> None:
    """Never a line on a guessed image: end points off every slice or outside the image fail."""
    tumour = case.result.findings[2]
    a, b = (np.asarray(p) for p in tumour.diameter_endpoints_lps)
    normal = case.volume.affine[:3, 2] / np.linalg.norm(case.volume.affine[:3, 2])
    gap = case.volume.spacing_mm[0]

    def build(ends: tuple[np.ndarray, np.ndarray]) -> None:
        moved = dataclasses.replace(
            tumour, diameter_endpoints_lps=tuple(tuple(map(float, e)) for e in ends)
        )
        findings = list(case.result.findings)
        findings[2] = moved
        result = dataclasses.replace(case.result, findings=tuple(findings))
        build_sr(case.sources, case.seg, result, ALGORITHM, **UIDS)

    build((a + 0.2 * gap * normal, b + 0.2 * gap * normal))  # slice positions may jitter a bit
    with pytest.raises(ValueError, match=r"Tumour 1: .* lies on no source image .*1\.50 mm off"):
        build((a + 0.3 * gap * normal, b + 0.3 * gap * normal))  # between two slices
    with pytest.raises(ValueError, match=r"Tumour 1: .* lies on no source image \(nearest"):
        build((a - 100 * gap * normal, b - 100 * gap * normal))  # beyond the series
    with pytest.raises(ValueError, match="lie on different source images"):
        build((a, b + gap * normal))
    row = case.volume.affine[:3, 0]
    with pytest.raises(ValueError, match=r"lies outside .* \(column -[0-9.]+, row"):
        build((a - 200 * row, b))


def test_header_identifies_study_series_and_algorithm(case: Case, sr_path: Path) -> None:
    sr = pydicom.dcmread(sr_path)
    source = case.sources[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == tuple(UIDS.values())
    assert (sr.SeriesNumber, sr.InstanceNumber) == (SERIES_NUMBER, 1) == (902, 1)
    assert sr.SeriesDescription.startswith("Lung nodule measurements")
    assert "demonstration, not for clinical use" in sr.SeriesDescription
    assert sr.Manufacturer == ALGORITHM.manufacturer
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert (sr.ContentDate, sr.ContentTime) == (source.StudyDate, source.StudyTime)
    assert "InstanceCreationTime" not in sr  # would be the clock's
    device_uid = algorithm_device_uid(ALGORITHM)
    (item,) = [e for e in sr.ContributingEquipmentSequence if "DeviceUID" in e]
    assert item.DeviceUID == device_uid
    assert (item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions) == (
        ALGORITHM.manufacturer,
        ALGORITHM.name,
        ALGORITHM.version,
    )
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    observer = hd.sr.srread(sr_path).content.get_observer_contexts()
    assert [o.observer_identifying_attributes.uid for o in observer] == [device_uid]


def test_out_of_scope_sr_says_why_and_reports_no_finding(
    case: Case, out_of_scope_path: Path
) -> None:
    out = dsrdump(out_of_scope_path)
    sr = hd.sr.srread(out_of_scope_path)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    assert sr.content.get_image_measurement_groups() == []
    assert "Measurement Group" not in out and "Imaging Measurements" not in out
    assert '"Qualitative Evaluations"' in out
    texts = [
        item.TextValue
        for item in _walk(pydicom.dcmread(out_of_scope_path))
        if item.get("ValueType") == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert texts == [f"No findings reported: {REASON}"]
    assert "(25045-6,LN" in out  # CT unspecified body region: it may not be a chest CT
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == {ds.SOPInstanceUID for ds in case.sources}


def _comments(path: Path) -> list[str]:
    """The report's statements: the Comments outside the measurement groups (each TID 1501
    group has its finding's label as a Comment)."""
    root = pydicom.dcmread(path)
    root.ContentSequence = [
        item
        for item in root.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue != "126010"
    ]
    return [
        item.TextValue
        for item in _walk(root)
        if item.get("ValueType") == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]


def test_statements_follow_the_measurements_as_qualitative_evaluations(
    case: Case, sr_path: Path, tmp_path: Path
) -> None:
    root = pydicom.dcmread(sr_path).ContentSequence
    names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in root]
    assert names[-2:] == ["Imaging Measurements", "Qualitative Evaluations"]
    assert _comments(sr_path) == list(STATEMENTS)
    # highdicom still reads every finding's groups with the statements beside them.
    sr = hd.sr.srread(sr_path)
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == len(case.result.findings)
    # Out of scope: the reason first, then the statements, in the one container.
    path = write_sr(
        case.sources, None, None, ALGORITHM, out_of_scope_reason=REASON,
        statements=STATEMENTS, path=tmp_path / "sr.dcm", **UIDS,
    )  # fmt: skip
    assert _comments(path) == [f"No findings reported: {REASON}", *STATEMENTS]
    assert dciodvfy_errors(path) == []
    # Without statements there is no Qualitative Evaluations container at all.
    plain = write_sr(
        case.sources, case.seg, case.result, ALGORITHM, path=tmp_path / "plain.dcm", **UIDS
    )
    assert _comments(plain) == []
    with pytest.raises(ValueError, match="statement must have text"):
        build_sr(case.sources, case.seg, case.result, ALGORITHM, statements=[" "], **UIDS)


def test_each_nodules_status_since_the_prior_is_coded(case: Case, tmp_path: Path) -> None:
    tumours = [f.tracking_id for f in case.result.findings if f.tracking_id.startswith("Tumour")]
    assert len(tumours) >= 2

    def change(status: str, now: str, before: str | None) -> NoduleChange:
        volume, prior_volume = (
            (None if status == "not found" else 900.0),
            (None if status == "new" else 450.0),
        )
        return NoduleChange(status, now, "right", before, None, None, volume, prior_volume, None)

    comparison = Comparison(
        StudyInstanceUID="1.2.3",
        SeriesInstanceUID="1.2.3.4",
        StudyDate=dt.date(2026, 1, 1),
        interval_days=120,
        shift_mm=3.0,
        changes=(
            change("matched", tumours[0], "Tumour 1"),
            change("new", tumours[1], None),
            change("not found", "Tumour 3", "Tumour 3"),
        ),
    )
    sr = build_sr(
        case.sources, case.seg, case.result, ALGORITHM, comparison=comparison,
        statements=comparison.statements(), **UIDS,
    )  # fmt: skip
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    status = {}
    for group in _walk(ds):
        if group.ValueType != "CONTAINER":
            continue
        items = list(group.get("ContentSequence") or [])
        tracking = [i.TextValue for i in items if i.ValueType == "TEXT"
                    and i.ConceptNameCodeSequence[0].CodeValue == "112039"]  # fmt: skip
        coded = [i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"
                 and i.ConceptNameCodeSequence[0].CodeValue == "RF0110"]  # fmt: skip
        if tracking and coded:
            status[tracking[0]] = coded
    assert status == {tumours[0]: ["RF0111"], tumours[1]: ["RF0112"]}
    [evaluations] = [
        i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    gone = [
        i.ConceptCodeSequence[0].CodeValue
        for i in evaluations.ContentSequence
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "RF0110"
    ]
    assert gone == ["RF0113"]
    assert "99RADFUSION" in {
        s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence
    }
    assert dciodvfy_errors(path) == []


def _walk(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence") or []:
        yield item
        yield from _walk(item)


# -- behaviour ----------------------------------------------------------------------------------


def test_same_input_gives_the_same_bytes(case: Case, sr_path: Path, tmp_path: Path) -> None:
    again = write_sr(
        case.sources, case.seg, case.result, ALGORITHM, statements=STATEMENTS,
        path=tmp_path / "a.dcm", **UIDS,
    )  # fmt: skip
    assert again.read_bytes() == sr_path.read_bytes()
    # A dataset repeated per frame (as Volume.source_images holds an Enhanced CT) counts once.
    doubled = [ds for ds in case.sources for _ in range(2)]
    rebuilt = build_sr(doubled, case.seg, case.result, ALGORITHM, statements=STATEMENTS, **UIDS)
    assert _encode(rebuilt) == sr_path.read_bytes()


def test_sources_without_optional_attributes(case: Case, tmp_path: Path) -> None:
    sparse = []
    for ds in case.sources:
        copy = Dataset()
        copy.update(ds)
        copy.file_meta = ds.file_meta
        for keyword in (
            "PatientName", "AccessionNumber", "SeriesNumber", "StudyDate", "StudyTime",
            "PatientBirthDate", "PatientSex", "StudyID", "ReferringPhysicianName",
        ):  # fmt: skip
            if keyword in copy:
                delattr(copy, keyword)
        sparse.append(copy)
    path = write_sr(sparse, case.seg, case.result, ALGORITHM, path=tmp_path / "sr.dcm", **UIDS)
    assert "PatientName" not in sparse[0]  # the caller's datasets are left alone
    assert dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    assert sr.PatientName == "" and sr.AccessionNumber == ""
    assert (sr.ContentDate, sr.ContentTime) == (case.sources[0].SeriesDate, "090312")
    out = write_sr(
        sparse, None, None, ALGORITHM, out_of_scope_reason=REASON, path=tmp_path / "o.dcm", **UIDS
    )
    assert dciodvfy_errors(out) == []


def test_refuses_inconsistent_input(case: Case) -> None:
    s, seg, r, a = case.sources, case.seg, case.result, ALGORITHM
    with pytest.raises(ValueError, match="exactly one"):
        build_sr(s, seg, r, a, out_of_scope_reason=REASON, **UIDS)
    with pytest.raises(ValueError, match="exactly one"):
        build_sr(s, None, None, a, **UIDS)
    with pytest.raises(ValueError, match="needs its SEG"):
        build_sr(s, None, r, a, **UIDS)
    with pytest.raises(ValueError, match="no source images"):
        build_sr([], seg, r, a, **UIDS)
    # Copies: Dataset.update shares the (decoded) elements, and setting one would change the
    # module's SEG for the tests after this one.
    fewer = deepcopy(seg)
    fewer.SegmentSequence = seg.SegmentSequence[:2]
    with pytest.raises(ValueError, match=r"no segment\(s\) \[3, 4\]"):
        build_sr(s, fewer, r, a, **UIDS)
    other = deepcopy(seg)
    other.StudyInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="another study"):
        build_sr(s, other, r, a, **UIDS)
    with pytest.raises(ValueError, match="no findings"):
        build_sr(s, seg, SegmentationResult(labels=r.labels * 0, findings=()), a, **UIDS)
    unplaced = []
    for ds in s:
        sparse = Dataset()
        sparse.update(ds)
        del sparse.ImagePositionPatient  # removes it from the new dataset only
        unplaced.append(sparse)
    with pytest.raises(ValueError, match="lacks image position"):
        build_sr(unplaced, seg, r, a, **UIDS)


def test_references_resolve_to_the_seg_writers_seg(case: Case, tmp_path: Path) -> None:
    """With radfusion's own SEG writer (when present): same segments, same algorithm device."""
    seg_writer = pytest.importorskip("radfusion.operators.seg_writer")
    seg_path = seg_writer.write_seg(
        case.sources,
        case.result,
        ALGORITHM,
        series_instance_uid="1.2.826.0.1.3680043.10.1234.9.95",
        sop_instance_uid="1.2.826.0.1.3680043.10.1234.9.96",
        path=tmp_path / "seg.dcm",
    )
    seg = pydicom.dcmread(seg_path)
    path = write_sr(case.sources, seg, case.result, ALGORITHM, path=tmp_path / "sr.dcm", **UIDS)
    assert dciodvfy_errors(path) == []
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    for group in hd.sr.srread(path).content.get_volumetric_roi_measurement_groups():
        sop = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert sop.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert labels[int(sop.ReferencedSegmentNumber)] == group.tracking_identifier
    sr = pydicom.dcmread(path)
    device = {e.DeviceUID for e in sr.ContributingEquipmentSequence if "DeviceUID" in e}
    seg_device = {e.DeviceUID for e in seg.ContributingEquipmentSequence if "DeviceUID" in e}
    assert device == seg_device == {algorithm_device_uid(ALGORITHM)}
