"""The audit trail: one JSON line per event, append-only, 0600, no peer bytes unescaped; and
the events the exporter and the FHIR client write into it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.data import get_testdata_file

from radfusion import audit
from radfusion.config import FhirConfig, parse_config
from radfusion.integrations.dicom.export import Exporter
from radfusion.integrations.fhir.client import FhirClient, FhirError
from radfusion.integrations.store.catalog import Catalog


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "audit" / "audit.jsonl"
    opened = audit.open_trail(path, "RADFUSION")
    yield path
    opened.close()
    audit._trail = None


def test_events_are_appended_as_json_lines_readable_by_the_owner_only(trail: Path) -> None:
    audit.record(
        audit.USER_AUTHENTICATION,
        type=audit.LOGIN,
        participants=[{"role": "calling", "ae_title": "X\nFAKE", "address": "10.0.0.1"}],
    )
    audit.record(audit.SECURITY_ALERT, type=audit.NODE_AUTHENTICATION, outcome=4, detail="no")
    assert trail.stat().st_mode & 0o777 == 0o600
    lines = trail.read_text().splitlines()
    assert len(lines) == 2 and "FAKE" in lines[0]  # the newline is escaped inside the JSON
    first, second = events(trail)
    assert first["event"] == ["110114", "User Authentication"]
    assert first["type"] == ["110122", "Login"]
    assert first["participants"][0]["ae_title"] == "X\nFAKE"
    assert first["node"] == "RADFUSION" and first["outcome"] == 0
    assert second["outcome"] == 4 and second["detail"] == "no"
    reopened = audit.open_trail(trail, "RADFUSION")  # a restart appends, never truncates
    reopened.record(audit.APPLICATION_ACTIVITY, type=audit.APPLICATION_START)
    assert len(events(trail)) == 3
    last = reopened.last(audit.SECURITY_ALERT)
    assert last is not None and last["detail"] == "no"


def test_without_a_trail_recording_is_a_no_op() -> None:
    audit._trail = None
    audit.record(audit.QUERY)  # nothing to write to, nothing raised


def test_deliveries_are_audited_with_their_study_and_outcome(trail: Path, tmp_path: Path) -> None:
    config = parse_config(
        {
            "export": {
                "destinations": [
                    {"name": "folder", "type": "folder", "path": str(tmp_path / "out")},
                    {"name": "gone", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                     "port": 9, "timeout_s": 1},
                ],
                "retry": {"attempts": 1, "initial_backoff_s": 0},
            }
        }
    )  # fmt: skip
    result = tmp_path / "ct.dcm"
    result.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    exporter = Exporter(
        config.export, Catalog(tmp_path / "catalog.sqlite"), tmp_path / "outbox", "RADFUSION"
    )
    exporter.export([result], study_instance_uid="1.2.3", destinations=["folder"])
    [delivered] = events(trail)
    assert delivered["event"] == ["110106", "Export"] and delivered["outcome"] == 0
    assert delivered["objects"] == [{"StudyInstanceUID": "1.2.3", "files": 1}]
    assert delivered["participants"][0]["name"] == "folder"
    exporter.export([result], study_instance_uid="1.2.3", destinations=["gone"])
    failed = events(trail)[-1]
    assert failed["event"] == ["110104", "DICOM Instances Transferred"]
    assert failed["outcome"] == 8 and failed["detail"].startswith("dead letter #")


def test_fhir_searches_are_audited_without_their_parameters(trail: Path) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/Observation"):
            return httpx.Response(403, json={"resourceType": "OperationOutcome"})
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"})

    config = FhirConfig(base_url="http://127.0.0.1:1/fhir")
    with FhirClient(config, transport=httpx.MockTransport(answer)) as client:
        client.search("Patient", {"identifier": "urn:oid:1.2|PATIENT-42"})
        with pytest.raises(FhirError):
            client.search("Observation", {"patient": "Patient/PATIENT-42"})
    found, refused = events(trail)
    assert found["event"] == ["110112", "Query"] and found["outcome"] == 0
    assert found["objects"] == [{"resource": "Patient"}]
    assert refused["outcome"] == 8 and refused["objects"] == [{"resource": "Observation"}]
    assert "PATIENT-42" not in trail.read_text()


def test_prior_queries_are_audited_without_the_patient(trail: Path) -> None:
    from radfusion.config import DicomDestination
    from radfusion.integrations.dicom.query import DimseQuery, QueryError
    from tests.conftest import free_port

    pacs = DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())
    with pytest.raises(QueryError):
        DimseQuery(pacs, "RADFUSION").find_studies("PATIENT-42", "HOSPITAL-A")
    [refused] = events(trail)
    assert refused["event"] == ["110112", "Query"] and refused["outcome"] == 8
    assert refused["objects"] == [{"QueryRetrieveLevel": "STUDY"}]
    assert refused["participants"][0]["ae_title"] == "PACS"
    assert "PATIENT-42" not in trail.read_text() and "HOSPITAL-A" not in trail.read_text()
