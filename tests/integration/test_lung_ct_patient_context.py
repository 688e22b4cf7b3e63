"""The lung CT service with a real FHIR server (Medplum) behind a fault proxy: the SR says
whether the patient's clinical and genomic data were found and, when not, why; ``radfusion
status`` shows why too (without PHI); under ``on_unavailable: hold`` the study's job is queued
again (``jobs.retry``) until the server is back, and nothing is written meanwhile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest

from radfusion.config import parse_config
from radfusion.logs import uid_tag
from tests.conftest import storescu, wait_for
from tests.fhir_support import cohort_patients, operation_outcome

pytestmark = pytest.mark.integration

COMMENT = ("121106", "DCM")


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return cohort_patients(
        tmp_path_factory.mktemp("cohort"), patients=3, seed=23, slices=60, size=128
    )


def _config(base_url: str, results: Path, **fhir: Any) -> dict[str, Any]:
    return {
        "routing": {"rules": [{"name": "chest", "when": {"Modality": "CT"}, "apps": ["lung-ct"]}]},
        "export": {"destinations": [{"name": "results", "type": "folder", "path": str(results)}]},
        "fhir": {
            "base_url": base_url,
            "timeout_s": 5,
            "retry": {"attempts": 2, "initial_backoff_s": 0.05},
            **fhir,
        },
    }


def _sr(folder: Path, study_uid: str, series_number: int = 902) -> pydicom.Dataset | None:
    """The study's lung-ct SR (902) or fusion SR (903) in the PACS folder."""
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        if (
            ds.StudyInstanceUID == study_uid
            and ds.Modality == "SR"
            and ds.get("SeriesNumber") == series_number
        ):
            return ds
    return None


def _context_comments(sr: pydicom.Dataset) -> list[str]:
    """The patient-context and imaging-only sentences (the app's own, e.g. the series
    analysed, come first; the pointer to the fusion SR last)."""
    comments = _comments(sr)
    start = next(i for i, c in enumerate(comments) if c.startswith("Clinical and genomic"))
    return comments[start : start + 2]


def _tumour_groups(sr: pydicom.Dataset) -> list[str]:
    """The tracking identifiers of the measurement SR's tumours."""
    found = []
    for item in sr.ContentSequence:
        for group in item.get("ContentSequence", []):
            for child in group.get("ContentSequence", []):
                text = str(child.get("TextValue", ""))
                tracking = child.ConceptNameCodeSequence[0].CodeValue == "112039"
                if tracking and text.startswith("Tumour"):
                    found.append(text)
    return sorted(set(found))


def _fusion_items(sr: pydicom.Dataset) -> dict[str, list[Any]]:
    """The fusion SR's private items by code: NUM values, CODE values, TEXT values."""
    found: dict[str, list[Any]] = {}

    def walk(ds: pydicom.Dataset) -> None:
        for item in ds.get("ContentSequence", []):
            name = item.ConceptNameCodeSequence[0]
            if name.CodingSchemeDesignator == "99RADFUSION":
                if item.ValueType == "NUM":
                    value: Any = float(item.MeasuredValueSequence[0].NumericValue)
                elif item.ValueType == "CODE":
                    value = str(item.ConceptCodeSequence[0].CodeMeaning)
                else:
                    value = str(item.TextValue)
                found.setdefault(str(name.CodeMeaning), []).append(value)
            walk(item)

    walk(sr)
    return found


def _comments(sr: pydicom.Dataset) -> list[str]:
    """The TEXT "Comment" items of the report's Qualitative Evaluations."""
    found = []
    for item in sr.ContentSequence:
        for child in item.get("ContentSequence", []):
            name = child.ConceptNameCodeSequence[0]
            if (name.CodeValue, name.CodingSchemeDesignator) == COMMENT:
                found.append(str(child.TextValue))
    return found


def _status(node: Any) -> dict[str, dict[str, Any]]:
    """``radfusion status --json`` by study tag."""
    out = node.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    return {row["study"]: row for row in json.loads(out.stdout)}


def test_sr_and_status_say_whether_patient_context_was_found(
    node_factory: Any,
    fhir_tenant: Any,
    fhir_proxy: Any,
    patients: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    for patient in patients:
        fhir_tenant.post(patient["bundle"])
    proxy = fhir_proxy(fhir_tenant)
    results = tmp_path / "results"
    node = node_factory(_config(proxy.base_url, results))
    found, down, refused = patients

    # Found: the SR says so, names the tested genes, and that the model uses imaging only.
    storescu(node.port, found["files"])
    wait_for(lambda: _sr(results, found["StudyInstanceUID"]) is not None, 180, "the first SR")
    sr = _sr(results, found["StudyInstanceUID"])
    assert sr is not None
    context, imaging_only = _context_comments(sr)
    assert _comments(sr)[0].startswith("Series analysed: series "), _comments(sr)
    study_date = found["truth"]["study_date"]
    assert context.startswith(
        f"Clinical and genomic data (FHIR): available as of the study date {study_date}"
    ), context
    tested = sorted(
        gene
        for gene, result in found["truth"]["context"]["genomics"]["genes"].items()
        if result["status"] != "untested"
    )
    assert f"genes tested: {', '.join(tested)}" in context
    assert imaging_only == "This algorithm uses imaging only."
    # SEG, SR, fusion SR and its summary image: findings are not held back
    wait_for(lambda: len(list(results.rglob("*.dcm"))) == 4, 60, "the fusion SR and image")
    # The fusion used the record read from the real FHIR server, and names what it read.
    fusion = _sr(results, found["StudyInstanceUID"], 903)
    assert fusion is not None
    items = _fusion_items(fusion)
    assert "Clinical record" in items["Input modality used"]
    assert "Genomic results" in items["Input modality used"]
    (probability,) = items["Probability of progression within 12 months"]
    assert 0.0 < probability < 1.0
    (used,) = items["FHIR resources used"]
    assert "Patient/" in used and "/_history/" in used

    # Down: imaging-only results, and the SR and status say why.
    proxy.down = True
    storescu(node.port, down["files"])
    wait_for(lambda: _sr(results, down["StudyInstanceUID"]) is not None, 180, "the second SR")
    sr = _sr(results, down["StudyInstanceUID"])
    assert sr is not None
    (context, _) = _context_comments(sr)
    assert context.startswith(
        "Clinical and genomic data (FHIR): unavailable, the FHIR server could not be reached"
    ), context
    assert proxy.base_url in context
    # The record is out of reach: the fusion has the image at most. This phantom's tumours are
    # below what its slices resolve; a reported finding (the detection's operating point allows
    # about one false positive per scan) is fused on imaging alone, and with none there is
    # nothing to fuse and no fusion SR (nothing invented).
    if _tumour_groups(sr):
        wait_for(lambda: _sr(results, down["StudyInstanceUID"], 903) is not None, 60, "fusion")
        fusion = _sr(results, down["StudyInstanceUID"], 903)
        assert fusion is not None
        assert _fusion_items(fusion)["Input modality used"] == ["Imaging (tumour radiomics)"]
    else:
        assert _sr(results, down["StudyInstanceUID"], 903) is None

    # Refused with an OperationOutcome: its codes, never its text, reach the SR and status.
    proxy.down = False
    secret = f"Patient {refused['PatientID']} is restricted"
    proxy.fail_next(1, status=403, body=operation_outcome("forbidden", secret))
    storescu(node.port, refused["files"])
    wait_for(lambda: _sr(results, refused["StudyInstanceUID"]) is not None, 180, "the third SR")
    sr = _sr(results, refused["StudyInstanceUID"])
    assert sr is not None
    (context, _) = _context_comments(sr)
    assert "refused the request" in context and "forbidden" in context, context
    assert secret not in context
    # The fusion ran on the image alone and says why the rest is missing.
    assert _tumour_groups(sr)
    wait_for(lambda: _sr(results, refused["StudyInstanceUID"], 903) is not None, 60, "fusion SR")
    fusion = _sr(results, refused["StudyInstanceUID"], 903)
    assert fusion is not None
    items = _fusion_items(fusion)
    assert items["Input modality used"] == ["Imaging (tumour radiomics)"]
    reasons = items["Why an input modality is missing"]
    assert any(r.startswith("clinical: ") and "refused the request" in r for r in reasons)
    assert any(r.startswith("genomic: ") and "refused the request" in r for r in reasons)
    assert all(secret not in r for r in reasons)
    assert "FHIR resources used" not in items

    status = _status(node)
    assert status[uid_tag(found["StudyInstanceUID"])]["detail"] == ""
    assert {row["state"] for row in status.values()} == {"done"}
    assert "could not be reached" in status[uid_tag(down["StudyInstanceUID"])]["detail"]
    assert "forbidden" in status[uid_tag(refused["StudyInstanceUID"])]["detail"]
    for patient in patients:
        assert patient["PatientID"] not in json.dumps(status, default=str)
    assert secret not in node.log()
    assert found["PatientID"] not in node.log()


def test_hold_keeps_the_study_until_the_fhir_server_is_back(
    node_factory: Any,
    fhir_tenant: Any,
    fhir_proxy: Any,
    patients: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    patient = patients[0]
    uid = patient["StudyInstanceUID"]
    fhir_tenant.post(patient["bundle"])
    proxy = fhir_proxy(fhir_tenant)
    proxy.down = True
    results = tmp_path / "results"
    config = _config(proxy.base_url, results, on_unavailable="hold")
    config["jobs"] = {"retry": {"attempts": 50, "initial_backoff_s": 0.5, "max_backoff_s": 1}}
    node = node_factory(config)
    from radfusion.service import open_catalog

    catalog = open_catalog(parse_config(node.config))

    def retries() -> list[str]:
        return [d for e, d in catalog.events_of(uid) if e == "job-retry-scheduled"]

    # The job is queued again while the server is down; nothing is written or sent meanwhile.
    storescu(node.port, patient["files"])
    wait_for(lambda: len(retries()) >= 2, 180, "two scheduled retries")
    assert "ContextUnavailable" in retries()[0] and proxy.base_url in retries()[0]
    assert not results.exists() or not list(results.rglob("*.dcm"))
    row = _status(node)[uid_tag(uid)]
    assert row["state"] == "routed" and "retry in" in row["detail"]
    assert patient["PatientID"] not in row["detail"]

    # The server is back: the next attempt produces the results, with the context; no dead letter.
    proxy.down = False
    wait_for(lambda: _sr(results, uid) is not None, 180, "the SR")
    sr = _sr(results, uid)
    assert sr is not None
    assert "available as of the study date" in _context_comments(sr)[0]
    assert not [d for d in catalog.dead_letters() if d.StudyInstanceUID == uid]
    wait_for(lambda: _status(node)[uid_tag(uid)]["state"] == "done", 30, "the study done")
