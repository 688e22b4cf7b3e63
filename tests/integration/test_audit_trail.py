"""The audit trail of a real ``radfusion serve``: who associated, what was received, who was
refused, and configuration changes between starts, without patient data."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from tests.conftest import storescu, wait_for

pytestmark = pytest.mark.integration


def trail(node: Any) -> list[dict[str, Any]]:
    path = node.spool / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def named(entries: list[dict[str, Any]], code: str, type_code: str | None = None) -> list[Any]:
    return [
        e for e in entries
        if e["event"][0] == code and (type_code is None or (e["type"] or [None])[0] == type_code)
    ]  # fmt: skip


def test_associations_instances_and_refusals_are_audited(node_factory: Any, ct_study: Any) -> None:
    node = node_factory(
        {"node": {"allowed_callers": [{"ae_title": "CT_1"}, {"ae_title": "PROBE"}]}}
    )
    assert storescu(node.port, ct_study.files[:3], calling="CT_1").returncode == 0
    assert storescu(node.port, ct_study.files[:1], calling="INTRUDER").returncode != 0
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFFF))
        sock.recv(10)
    study = str(pydicom.dcmread(ct_study.files[0]).StudyInstanceUID)
    wait_for(lambda: named(trail(node), "110104"), 10, "the transfer in the audit trail")
    wait_for(lambda: len(named(trail(node), "110113")) >= 2, 10, "the alerts in the trail")
    entries = trail(node)
    assert named(entries, "110100", "110120"), "application start"
    logins = [e["participants"][0]["ae_title"] for e in named(entries, "110114", "110122")]
    assert "CT_1" in logins and "INTRUDER" not in logins
    [transfer] = named(entries, "110104")
    assert transfer["action"] == "C" and transfer["outcome"] == 0
    assert transfer["objects"] == [{"StudyInstanceUID": study, "stored": 3, "refused": 0}]
    refusal = named(entries, "110113", "110126")
    assert refusal[0]["participants"][0]["ae_title"] == "INTRUDER"
    assert "unknown calling AE title" in refusal[0]["detail"]
    pdu = named(entries, "110113", "110132")
    assert "PDU of 4294967295 bytes" in pdu[0]["detail"]
    text = (node.spool / "audit.jsonl").read_text()
    assert "RF-TEST-1" not in text  # the Patient ID never enters the trail
    assert (node.spool / "audit.jsonl").stat().st_mode & 0o777 == 0o600


def test_a_configuration_change_between_starts_is_an_alert(node_factory: Any) -> None:
    node = node_factory()
    node.stop()
    node.start()  # same configuration: no alert
    assert not named(trail(node), "110113", "110131")
    node.stop()
    config = yaml.safe_load(Path(node.config_path).read_text())
    config["node"]["max_associations"] = 3
    Path(node.config_path).write_text(yaml.safe_dump(config))
    node.start()
    starts = named(trail(node), "110100", "110120")
    assert len(starts) == 3
    [alert] = named(trail(node), "110113", "110131")
    assert "configuration changed since the last start" in alert["detail"]
    assert named(trail(node), "110100", "110121"), "application stop"
