"""Priors: a follow-up chest CT compared with the prior that a real Orthanc holds.

The prior is the same synthetic patient 120 days earlier with every tumour at 0.7 of its
radius (0.343 of its volume) and lying 16.5 mm elsewhere in the scanner; the app finds it by
C-FIND or QIDO-RS, retrieves it by C-GET or WADO-RS, analyses it alike, registers the lungs
and must report each nodule matched, with a volume doubling time within 15 % of the phantoms'
true one.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from radfusion.apps.lung_ct.app import run_folder
from radfusion.config import parse_config
from radfusion.synth.ct_series import synth_ct
from tests.conftest import free_port, require_tool, sr_texts

pytestmark = pytest.mark.integration

PATIENT = "RF-IT-PRIOR"
GEOMETRY = {
    "slices": 100,
    "rows": 256,
    "columns": 256,
    "pixel_spacing": 1.4,
    "slice_thickness": 2.5,
    "seed": 6100,
    "tumours": 3,
    "patient_id": PATIENT,
}


@pytest.fixture(scope="module", params=["c-get", "c-move", "dicomweb"])
def follow_up(
    orthanc: Any, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Any:
    """The follow-up analysed with priors from Orthanc by C-FIND + C-GET, C-FIND + C-MOVE (to
    the node's AE title: with no node in this process, the retrieval listens on the node's
    port while it lasts), or QIDO-RS + WADO-RS through its DICOMweb plugin."""
    root = tmp_path_factory.mktemp("priors")
    prior = synth_ct(
        root / "prior",
        **GEOMETRY,
        tumour_scale=0.7,
        study_date="20260101",
        position_offset_mm=(6.0, -9.0, 12.5),
    )
    current = synth_ct(root / "current", **GEOMETRY, study_date="20260501")
    subprocess.run(
        [
            require_tool("storescu"),
            "-aec",
            "ORTHANC",
            "127.0.0.1",
            str(orthanc.dicom_port),
            *map(str, prior.files),
        ],
        check=True,
        capture_output=True,
    )
    # Orthanc answers C-FIND and C-GET from AE titles it knows, and C-MOVEs to their address.
    port = free_port()
    orthanc.put("/modalities/radfusion", {"AET": "RADFUSION", "Host": "127.0.0.1", "Port": port})
    pacs = orthanc.destination()
    priors: dict[str, Any] = {"enabled": True, "pacs": "pacs"}
    if request.param == "dicomweb":
        pacs = {"name": "pacs", "type": "dicomweb", "url": f"{orthanc.url}/dicom-web"}
    else:
        priors["retrieve"] = request.param
    config = parse_config(
        {
            "node": {"host": "127.0.0.1", "port": port},
            "export": {"destinations": [pacs]},
            "apps": {"lung_ct": {"priors": priors}},
        }
    )
    written = run_folder(current.directory, root / "out", config)
    return prior, current, written


def test_each_nodule_is_matched_with_its_prior_and_its_doubling_time_is_right(
    follow_up: Any,
) -> None:
    prior, current, written = follow_up
    sr = pydicom.dcmread(next(p for p in written if p.name == "sr.dcm"))
    lines = sr_texts(sr)
    summary = next(line for line in lines if line.startswith("Compared with the prior CT"))
    assert "of 2026-01-01 (120 days earlier" in summary
    assert "3 nodule(s) matched, 0 new, 0 prior nodule(s) not found again" in summary
    volumes = [
        [t["volume_mm3"] for t in json.loads(study.truth_json.read_text())["tumours"]]
        for study in (current, prior)
    ]
    truth_vdt = sorted(
        120 * math.log(2) / math.log(now / then) for now, then in zip(*volumes, strict=True)
    )
    reported = sorted(
        float(m) for line in lines for m in re.findall(r"volume doubling time (\d+) days", line)
    )
    assert len(reported) == 3
    for ours, true in zip(reported, truth_vdt, strict=True):
        assert abs(ours - true) <= 0.15 * true, (reported, truth_vdt)
    # The same values, coded, in each nodule's TID 1411 group (99RADFUSION declared).
    coded = sorted(
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _items(sr)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeValue == "RF0101"
    )
    assert [round(v) for v in coded] == reported
    status = [
        item.ConceptCodeSequence[0].CodeValue
        for item in _items(sr)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "RF0110"
    ]
    assert status == ["RF0111"] * 3  # each present on the prior, none new or gone
    assert "99RADFUSION" in {
        s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence
    }


def test_the_sr_cites_the_prior_images_and_stays_valid(follow_up: Any) -> None:
    prior, _, written = follow_up
    sr_path = next(p for p in written if p.name == "sr.dcm")
    sr = pydicom.dcmread(sr_path)
    [study] = sr.PertinentOtherEvidenceSequence
    first = pydicom.dcmread(prior.files[0], stop_before_pixels=True)
    assert study.StudyInstanceUID == first.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    cited = {item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence}
    assert cited == {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in prior.files
    }
    out = subprocess.run(
        [require_tool("dciodvfy"), str(sr_path)], capture_output=True, text=True, check=False
    )
    assert [ln for ln in (out.stdout + out.stderr).splitlines() if "Error" in ln] == []


@pytest.mark.parametrize("pacs_up", [True, False])
def test_without_a_prior_the_sr_says_why_and_the_results_are_written(
    orthanc: Any, tmp_path: Path, pacs_up: bool
) -> None:
    study = synth_ct(
        tmp_path / "ct",
        slices=60,
        rows=128,
        columns=128,
        seed=6101,
        tumours=1,
        patient_id="RF-IT-NO-PRIOR",
    )
    orthanc.put("/modalities/radfusion", {"AET": "RADFUSION", "Host": "127.0.0.1", "Port": 1})
    pacs = orthanc.destination(timeout_s=5)
    if not pacs_up:
        pacs["port"] = free_port()  # nobody listens there
    config = parse_config(
        {
            "export": {"destinations": [pacs]},
            "apps": {"lung_ct": {"priors": {"enabled": True, "pacs": "pacs"}}},
        }
    )
    written = run_folder(study.directory, tmp_path / "out", config)
    assert [p.name for p in written][:2] == ["seg.dcm", "sr.dcm"]
    lines = sr_texts(pydicom.dcmread(written[1]))
    [reason] = [line for line in lines if line.startswith("No comparison with prior CT")]
    if pacs_up:
        assert "no earlier CT of this patient in pacs" in reason
    else:
        assert "the PACS could not be asked" in reason


def _items(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []

    def walk(items: Any) -> None:
        for item in items:
            out.append(item)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


def _rewrite(files: Any, **attributes: str | None) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            if value is not None:
                setattr(ds, keyword, value)
            elif keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("abdomen", "no earlier chest CT of this patient (other body parts: 2026-01-01)"),
        ("other-patient", "1 study(ies) of another patient with this ID left out"),
        ("two-issuers", "holds 2 patients with this Patient ID (their issuers differ)"),
    ],
)
def test_a_prior_that_is_not_this_patients_chest_ct_is_not_compared(
    orthanc: Any, tmp_path: Path, case: str, reason: str
) -> None:
    patient = f"RF-IT-{case.upper()}"
    small = {"slices": 60, "rows": 128, "columns": 128, "patient_id": patient}
    earlier = synth_ct(
        tmp_path / "earlier", **small, seed=6102, tumours=0, study_date="20260101",
        chest=case != "abdomen",
    )  # fmt: skip
    current = synth_ct(tmp_path / "current", **small, seed=6103, tumours=1, study_date="20260501")
    if case == "other-patient":
        _rewrite(earlier.files, PatientBirthDate="19400101")
        _rewrite(current.files, PatientBirthDate="19600101")
    sent = [earlier.files]
    if case == "two-issuers":
        namesake = synth_ct(
            tmp_path / "namesake", **small, seed=6104, tumours=0, study_date="20251201"
        )
        _rewrite(earlier.files, IssuerOfPatientID="HOSPITAL-A")
        _rewrite(namesake.files, IssuerOfPatientID="HOSPITAL-B")
        _rewrite(current.files, IssuerOfPatientID=None)
        sent.append(namesake.files)
    for files in sent:
        subprocess.run(
            [require_tool("storescu"), "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port),
             *map(str, files)],
            check=True, capture_output=True,
        )  # fmt: skip
    orthanc.put("/modalities/radfusion", {"AET": "RADFUSION", "Host": "127.0.0.1", "Port": 1})
    config = parse_config(
        {
            "export": {"destinations": [orthanc.destination(timeout_s=10)]},
            "apps": {"lung_ct": {"priors": {"enabled": True, "pacs": "pacs"}}},
        }
    )
    written = run_folder(current.directory, tmp_path / "out", config)
    lines = sr_texts(pydicom.dcmread(written[1]))
    [said] = [line for line in lines if line.startswith("No comparison with prior CT")]
    assert reason in said
