"""What 3D Slicer's QuantitativeReporting reads of our SEG and SR, read with dcmqi.

Slicer itself is not installed here; its QuantitativeReporting extension imports DICOM SEG with
dcmqi's ``segimage2itkimage`` and TID 1500 SR with ``tid1500reader``, the same programs the
``dcmqi`` wheel ships. Asserted: every segment comes back as an image with its label, the same
voxels in the same place in the patient as our SEG holds (read independently with highdicom);
every finding of the SR comes back with its segment, source series and values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from radfusion.evaluation import seg_label_volume
from radfusion.operators.volume import assemble_volume, read_series
from tests.conftest import require_tool
from tests.viewer.ohif_check import run_lung_ct

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from radfusion.synth.ct_series import synth_ct

    root = tmp_path_factory.mktemp("dcmqi")
    synth_ct(root / "ct", slices=60, rows=128, columns=128, seed=3)
    run_lung_ct(root / "ct", root / "results")
    return root / "ct", root / "results"


def _dcmqi(program: str) -> str:
    """A dcmqi program: the wheel puts it beside this Python (else it must be on PATH)."""
    beside = Path(sys.executable).with_name(program)
    return str(beside) if beside.exists() else require_tool(program)


def _centroid_lps(mask_kji: np.ndarray, affine: np.ndarray) -> np.ndarray:
    k, r, c = np.argwhere(mask_kji).mean(axis=0)
    return (affine @ np.array([c, r, k, 1.0]))[:3]


def test_every_segment_reads_back_with_its_label_voxels_and_place(
    analysed: tuple[Path, Path], tmp_path: Path
) -> None:
    ct, results = analysed
    subprocess.run(
        [_dcmqi("segimage2itkimage"), "--inputDICOM", str(results / "seg.dcm"),
         "--outputDirectory", str(tmp_path), "--outputType", "nrrd"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    ct_files = sorted(ct.glob("*.dcm"))
    labels, names = seg_label_volume(results / "seg.dcm", ct_files)
    volume = assemble_volume(read_series(ct_files))
    meta = json.loads((tmp_path / "meta.json").read_text())
    read = {
        int(a["labelID"]): a["SegmentLabel"] for group in meta["segmentAttributes"] for a in group
    }
    assert sorted(read.values()) == sorted(names.values())
    for number, label in names.items():
        [file_number] = [n for n, name in read.items() if name == label]
        image = sitk.ReadImage(str(tmp_path / f"{file_number}.nrrd"))
        array = sitk.GetArrayFromImage(image)  # [z, y, x]
        theirs = np.argwhere(array > 0)
        ours = labels == number
        assert len(theirs) == int(ours.sum()), label
        z, y, x = theirs.mean(axis=0)
        where = np.array(image.TransformContinuousIndexToPhysicalPoint((x, y, z)))  # LPS
        assert np.allclose(where, _centroid_lps(ours, volume.affine), atol=0.5), label


def _sr_groups(sr: pydicom.Dataset) -> dict[str, dict[str, Any]]:
    """Our SR's volumetric groups by tracking identifier: segment number and values."""
    out: dict[str, dict[str, Any]] = {}

    def walk(items: Any) -> None:
        for item in items:
            children = list(item.get("ContentSequence") or [])
            tracking = [c.TextValue for c in children if c.ValueType == "TEXT"
                        and c.ConceptNameCodeSequence[0].CodeValue == "112039"]  # fmt: skip
            segment = [c for c in children if c.ValueType == "IMAGE" and
                       "ReferencedSegmentNumber" in c.ReferencedSOPSequence[0]]  # fmt: skip
            if tracking and segment:
                numbers = [float(c.MeasuredValueSequence[0].NumericValue)
                           for c in children if c.ValueType == "NUM"]  # fmt: skip
                out[tracking[0]] = {
                    "segment": int(segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber),
                    "values": numbers,
                }
            walk(children)

    walk(sr.ContentSequence)
    return out


def test_every_finding_reads_back_with_its_segment_and_values(
    analysed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, results = analysed
    out = tmp_path / "sr.json"
    subprocess.run(
        [_dcmqi("tid1500reader"), "--inputDICOM", str(results / "sr.dcm"),
         "--outputMetadata", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    read = json.loads(out.read_text())
    seg = pydicom.dcmread(results / "seg.dcm", stop_before_pixels=True)
    ours = _sr_groups(pydicom.dcmread(results / "sr.dcm"))
    assert len(ours) >= 3  # both lungs and a tumour
    theirs = {m["TrackingIdentifier"]: m for m in read["Measurements"] if "ReferencedSegment" in m}
    assert set(theirs) == set(ours)
    for name, group in ours.items():
        measurement = theirs[name]
        assert measurement["ReferencedSegment"] == group["segment"], name
        assert measurement["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
        source = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert measurement["SourceSeriesForImageSegmentation"] == source
        values = [float(item["value"]) for item in measurement["measurementItems"]]
        assert values == pytest.approx(group["values"]), name
