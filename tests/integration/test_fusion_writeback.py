"""FHIR write-back of the fusion result against the real FHIR server (Medplum) behind a fault
proxy: the resources land linked to the Patient and an ImagingStudy and cite the fusion SR;
reprocessing updates them and never duplicates; a refusal (403, 422) or an outage leaves the
DICOM results written and is reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from radfusion.apps.lung_ct.app import LungCTRunner
from radfusion.apps.lung_ct.writeback import IDENTIFIER_SYSTEM
from radfusion.config import FhirConfig, parse_config
from radfusion.integrations.fhir.provider import PatientContextProvider
from tests.fhir_support import cohort_patients, operation_outcome

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # Seed 23's third patient: tumours the app finds, an NGS panel in the record.
    (*_, chosen) = cohort_patients(
        tmp_path_factory.mktemp("cohort"), patients=3, seed=23, slices=60, size=128
    )
    return chosen


def _runner(tenant: Any, proxy: Any) -> LungCTRunner:
    """The context is read from the server directly; the write-back goes through the proxy
    (so faults hit the write-back only)."""
    config = parse_config(
        {"fhir": {"base_url": proxy.base_url, "writeback": True, "retry": {"attempts": 1}}}
    )
    lookup = PatientContextProvider(FhirConfig(base_url=tenant.base_url))
    return LungCTRunner(config, lookup=lookup)


def _ours(tenant: Any, kind: str, study_uid: str) -> list[dict[str, Any]]:
    return [
        r
        for r in tenant.search(f"{kind}?_count=100")
        if any(
            i.get("system") == IDENTIFIER_SYSTEM and i.get("value", "").startswith(study_uid)
            for i in r.get("identifier", [])
        )
    ]


def test_written_linked_citing_the_sr_and_updated_not_duplicated(
    fhir_tenant: Any, fhir_proxy: Any, patient: dict[str, Any], tmp_path: Path
) -> None:
    fhir_tenant.post(patient["bundle"])
    proxy = fhir_proxy(fhir_tenant)
    uid = patient["StudyInstanceUID"]
    with _runner(fhir_tenant, proxy) as runner:
        first = runner.process(patient["files"], tmp_path / "a")
        assert not [n for n in first.notes if "write-back" in n], first.notes
        (fusion_path,) = [p for p in first.files if p.name == "fusion_sr.dcm"]
        sr_uid = pydicom.dcmread(fusion_path, stop_before_pixels=True).SOPInstanceUID

        (risk,) = _ours(fhir_tenant, "RiskAssessment", uid)
        (report,) = _ours(fhir_tenant, "DiagnosticReport", uid)
        observations = _ours(fhir_tenant, "Observation", uid)
        studies = [
            s
            for s in fhir_tenant.search("ImagingStudy?_count=100")
            if {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"} in s["identifier"]
        ]
        assert len(studies) == 1
        imaging = f"ImagingStudy/{studies[0]['id']}"
        patient_ref = studies[0]["subject"]["reference"]
        assert patient_ref.startswith("Patient/")
        for resource in (risk, report, *observations):
            assert resource["subject"]["reference"] == patient_ref
            assert {"system": "urn:dicom:uid", "value": f"urn:oid:{sr_uid}"} in resource[
                "identifier"
            ]
            assert resource["status"] == "preliminary"
        assert report["imagingStudy"] == [{"reference": imaging}]
        assert sorted(r["reference"] for r in report["result"]) == sorted(
            f"Observation/{o['id']}" for o in observations
        )
        assert risk["parent"] == {"reference": f"DiagnosticReport/{report['id']}"}
        probability = risk["prediction"][0]["probabilityDecimal"]
        assert 0 < probability < 1
        assert "not for clinical use" in risk["note"][0]["text"]
        kinds = {i["value"].rsplit(":", 1)[1] for o in observations for i in o["identifier"]
                 if i["system"] == IDENTIFIER_SYSTEM}  # fmt: skip
        assert {"volume", "diameter"} <= kinds
        # EGFR was tested in this record: the test is the answer, no prediction is written.
        assert "egfr" not in kinds

        # Reprocessing: the same resources are updated in place, none is added.
        runner.process(patient["files"], tmp_path / "b")
        (again,) = _ours(fhir_tenant, "RiskAssessment", uid)
        assert again["id"] == risk["id"] and again["meta"]["versionId"] != risk["meta"]["versionId"]
        assert len(_ours(fhir_tenant, "DiagnosticReport", uid)) == 1
        assert len(_ours(fhir_tenant, "Observation", uid)) == len(observations)


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, "forbidden", "refused"),
        (422, "processing", "refused"),
        (503, "transient", "unavailable"),
    ],
)
def test_a_refusal_or_outage_leaves_the_dicom_results_and_is_reported(
    fhir_tenant: Any,
    fhir_proxy: Any,
    patient: dict[str, Any],
    tmp_path: Path,
    status: int,
    code: str,
    expected: str,
) -> None:
    fhir_tenant.post(patient["bundle"])
    proxy = fhir_proxy(fhir_tenant)
    secret = f"Patient {patient['PatientID']} may not be written"
    proxy.fail_next(50, status=status, body=operation_outcome(code, secret))
    with _runner(fhir_tenant, proxy) as runner:
        result = runner.process(patient["files"], tmp_path / "out")
    assert [p.name for p in result.files] == [
        "seg.dcm",
        "sr.dcm",
        "fusion_sr.dcm",
        "fusion_summary.dcm",
    ]
    assert all(p.is_file() for p in result.files)
    (note,) = [n for n in result.notes if "write-back" in n]
    assert note.startswith(f"FHIR write-back {expected}: ") and str(status) in note
    assert secret not in note and patient["PatientID"] not in note
    assert _ours(fhir_tenant, "RiskAssessment", patient["StudyInstanceUID"]) == []
