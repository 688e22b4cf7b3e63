"""The DICOM node against real senders: dcmtk storescu/echoscu and pynetdicom."""

from __future__ import annotations

import json
import sqlite3
import struct
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import echoscu, storescu, wait_for

pytestmark = pytest.mark.integration

FORWARD_ALL = {"rules": [{"name": "all-ct", "when": {"Modality": "CT"}, "apps": ["forward"]}]}


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and File Meta."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


def catalog(node: Any) -> sqlite3.Connection:
    db = sqlite3.connect(node.spool / "catalog.sqlite")
    db.row_factory = sqlite3.Row
    return db


def study_row(node: Any, uid: str) -> sqlite3.Row | None:
    return (
        catalog(node).execute("SELECT * FROM studies WHERE StudyInstanceUID=?", (uid,)).fetchone()
    )


def jobs(node: Any, uid: str) -> list[sqlite3.Row]:
    return (
        catalog(node)
        .execute("SELECT * FROM jobs WHERE StudyInstanceUID=? ORDER BY id", (uid,))
        .fetchall()
    )


def state_is(node: Any, uid: str, *states: str) -> bool:
    row = study_row(node, uid)
    return row is not None and row["state"] in states


def test_storescu_study_is_spooled_byte_identical(node_factory: Any, ct_study: Any) -> None:
    node = node_factory({"routing": FORWARD_ALL})
    r = storescu(node.port, list(ct_study.files))
    assert r.returncode == 0, r.stderr
    db = catalog(node)
    rows = {r["SOPInstanceUID"]: r for r in db.execute("SELECT * FROM instances")}
    assert len(rows) == len(ct_study.files)
    for f in ct_study.files:
        sent = pydicom.dcmread(f, stop_before_pixels=True)
        row = rows[str(sent.SOPInstanceUID)]
        assert row["StudyInstanceUID"] == ct_study.StudyInstanceUID
        assert row["SeriesInstanceUID"] == ct_study.SeriesInstanceUID
        assert row["TransferSyntaxUID"] == str(sent.file_meta.TransferSyntaxUID)
        spooled = Path(row["path"])
        assert dataset_bytes(spooled) == dataset_bytes(f)
        meta = pydicom.dcmread(spooled, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    series = db.execute("SELECT * FROM series").fetchall()
    assert [(s["Modality"], s["images"]) for s in series] == [("CT", len(ct_study.files))]


def test_study_completes_after_quiet_period_and_is_handed_on_once(
    node_factory: Any, ct_study: Any
) -> None:
    node = node_factory({"routing": FORWARD_ALL})
    half = len(ct_study.files) // 2
    assert storescu(node.port, list(ct_study.files[:half])).returncode == 0
    assert state_is(node, ct_study.StudyInstanceUID, "receiving")
    assert storescu(node.port, list(ct_study.files[half:])).returncode == 0
    wait_for(lambda: state_is(node, ct_study.StudyInstanceUID, "done"), 30, "study done")
    js = jobs(node, ct_study.StudyInstanceUID)
    assert [(j["app"], j["state"], j["generation"]) for j in js] == [("forward", "done", 1)]
    status = json.loads(node.cli("status", "--json").stdout)
    assert status[0]["state"] == "done"
    assert status[0]["instances"] == len(ct_study.files)
    assert ct_study.StudyInstanceUID not in node.cli("status").stdout  # UIDs only hashed


def _late_instance(src: Path, out: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(src), "late"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 9999
    ds.save_as(out)
    return out


@pytest.mark.parametrize("policy", ["rerun", "ignore"])
def test_late_arrival_policy(node_factory: Any, ct_study: Any, tmp_path: Path, policy: str) -> None:
    node = node_factory({"routing": FORWARD_ALL, "completion": {"late_arrival": policy}})
    uid = ct_study.StudyInstanceUID
    assert storescu(node.port, list(ct_study.files)).returncode == 0
    wait_for(lambda: state_is(node, uid, "done"), 30, "study done")
    late = _late_instance(ct_study.files[0], tmp_path / "late.dcm")
    assert storescu(node.port, [late]).returncode == 0
    if policy == "rerun":
        wait_for(lambda: len(jobs(node, uid)) == 2, 30, "the re-run job")
        wait_for(lambda: state_is(node, uid, "done"), 30, "study done again")
        assert [j["generation"] for j in jobs(node, uid)] == [1, 2]
    else:
        wait_for(
            lambda: "late-ignored" in node.log() or _has_event(node, uid, "late-ignored"),
            10,
            "late arrival logged",
        )
        assert len(jobs(node, uid)) == 1
        assert state_is(node, uid, "done")
    assert study_row(node, uid)["instances"] == len(ct_study.files) + 1  # stored either way


def _has_event(node: Any, uid: str, event: str) -> bool:
    return (
        catalog(node)
        .execute("SELECT 1 FROM events WHERE StudyInstanceUID=? AND event=?", (uid, event))
        .fetchone()
        is not None
    )


def test_duplicates_are_idempotent(node_factory: Any, ct_study: Any) -> None:
    node = node_factory({"routing": FORWARD_ALL})
    files = list(ct_study.files[:5])
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files).returncode == 0  # the same instances again: success
    db = catalog(node)
    assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 5
    assert db.execute("SELECT images FROM series").fetchone()[0] == 5
    assert study_row(node, ct_study.StudyInstanceUID)["instances"] == 5


def test_unknown_calling_ae_is_rejected(node_factory: Any, ct_study: Any) -> None:
    node = node_factory({"node": {"allowed_callers": [{"ae_title": "CT_1"}]}})
    r = storescu(node.port, [ct_study.files[0]], calling="INTRUDER")
    assert r.returncode != 0
    assert "Association Rejected" in r.stderr or "rejected" in r.stderr.lower(), r.stderr
    assert storescu(node.port, [ct_study.files[0]], calling="CT_1").returncode == 0
    assert "rejected association from 'INTRUDER'" in node.log()
    assert catalog(node).execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1


def test_caller_bound_to_other_address_is_rejected(node_factory: Any, ct_study: Any) -> None:
    node = node_factory(
        {
            "node": {
                "allowed_callers": [
                    {"ae_title": "CT_FAR", "addresses": ["10.99.0.0/16"]},
                    {"ae_title": "CT_NEAR", "addresses": ["127.0.0.0/8"]},
                ]
            }
        }
    )
    assert storescu(node.port, [ct_study.files[0]], calling="CT_FAR").returncode != 0
    assert "address not allowed" in node.log()
    assert storescu(node.port, [ct_study.files[0]], calling="CT_NEAR").returncode == 0


def _send_raw(port: int, path: Path) -> int:
    """Send a Part 10 file's dataset bytes as they are (no re-encoding), return the status."""
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFUSION")
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(status.Status)


def _part10(path: Path, dataset: bytes, sop_uid: str = "1.2.3.4.5.6.7") -> Path:
    meta = Dataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset(meta)
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes() + dataset)
    return path


def test_malformed_datasets_get_failure_status_and_node_lives(
    node_factory: Any, ct_study: Any, tmp_path: Path
) -> None:
    node = node_factory()
    # An element whose length runs far past the end of the data.
    garbage = b"\x08\x00\x18\x00UI\xff\x7f" + b"1.2.3" + b"\x10\x00\x10\x00PN"
    status = _send_raw(node.port, _part10(tmp_path / "garbage.dcm", garbage))
    assert status in (0xC210, 0xA900), hex(status)
    # Parseable, but without Study/Series Instance UID.
    no_uids = Dataset()
    no_uids.Modality = "CT"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, no_uids)
    status = _send_raw(node.port, _part10(tmp_path / "nouids.dcm", buf.getvalue(), "1.2.3.9"))
    assert status == 0xA900, hex(status)
    assert echoscu(node.port)
    assert storescu(node.port, [ct_study.files[0]]).returncode == 0
    assert catalog(node).execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1


def test_disk_reserve_refuses_with_a700_and_node_lives(node_factory: Any, ct_study: Any) -> None:
    node = node_factory({"spool": {"min_free_mb": 1 << 40}})  # more than any disk has
    r = storescu(node.port, [ct_study.files[0]], extra=["-v"])
    assert r.returncode != 0
    assert "Refused: OutOfResources" in r.stderr, r.stderr  # dcmtk names 0xA7xx so
    assert "0xA700" in node.log()
    assert echoscu(node.port)
    assert catalog(node).execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    assert list((node.spool / "tmp").iterdir()) == []


def test_kill_9_mid_study_loses_nothing_acknowledged_and_hands_on_once(
    node_factory: Any, ct_study: Any
) -> None:
    node = node_factory(
        {"routing": FORWARD_ALL, "completion": {"quiet_period_s": 2, "after_restart_s": 4}}
    )
    files = list(ct_study.files)
    acknowledged: list[str] = []

    def scanner() -> None:
        ae = AE(ae_title="CT_1")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RADFUSION")
        for f in files:
            if not assoc.is_established:
                return
            ds = pydicom.dcmread(f)
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # the node died under us: that is the point of the test
                return
            if getattr(status, "Status", None) == 0x0000:
                acknowledged.append(str(ds.SOPInstanceUID))
        if assoc.is_established:
            assoc.release()

    sender = threading.Thread(target=scanner)
    sender.start()
    wait_for(lambda: len(acknowledged) >= len(files) // 3, 60, "a third of the study")
    node.kill()
    sender.join(30)
    acked = set(acknowledged)
    assert 0 < len(acked) < len(files)
    # Everything acknowledged is in the spool and catalog before anything is resent.
    rows = {
        r["SOPInstanceUID"]: r["path"]
        for r in catalog(node).execute("SELECT SOPInstanceUID, path FROM instances")
    }
    assert acked <= set(rows)
    for uid in acked:
        assert Path(rows[uid]).stat().st_size > 0
    node.start()
    assert storescu(node.port, files, calling="CT_1").returncode == 0  # the scanner resends all
    uid = ct_study.StudyInstanceUID
    wait_for(lambda: state_is(node, uid, "done"), 30, "study done after restart")
    assert [(j["app"], j["generation"]) for j in jobs(node, uid)] == [("forward", 1)]
    db = catalog(node)
    assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == len(files)
    handed = db.execute(
        "SELECT COUNT(*) FROM events WHERE StudyInstanceUID=? AND event='routed'", (uid,)
    ).fetchone()[0]
    assert handed == 1


def test_unrouted_study_is_kept_and_logged(node_factory: Any, ct_study: Any) -> None:
    node = node_factory(
        {
            "routing": {
                "rules": [{"name": "mr-only", "when": {"Modality": "MR"}, "apps": ["forward"]}]
            }
        }
    )
    assert storescu(node.port, list(ct_study.files[:3])).returncode == 0
    uid = ct_study.StudyInstanceUID
    wait_for(lambda: state_is(node, uid, "unrouted"), 30, "study unrouted")
    assert jobs(node, uid) == []
    # The catalog's state can be read before the line that says so reaches the log file.
    wait_for(lambda: "no routing rule matched" in node.log(), 10, "the log line")
    assert catalog(node).execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 3


def test_max_associations_rejects_the_extra_one(node_factory: Any, ct_study: Any) -> None:
    node = node_factory({"node": {"max_associations": 1}})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    held = ae.associate("127.0.0.1", node.port, ae_title="RADFUSION")
    assert held.is_established
    try:
        r = storescu(node.port, [ct_study.files[0]])
        assert r.returncode != 0 and "Rejected" in r.stderr, r.stderr
    finally:
        held.release()
    assert storescu(node.port, [ct_study.files[0]]).returncode == 0


def test_forwarded_study_arrives_in_orthanc_and_logs_hold_no_phi(
    node_factory: Any, ct_study: Any, orthanc: Any
) -> None:
    node = node_factory(
        {
            "routing": FORWARD_ALL,
            "export": {"destinations": [orthanc.destination()]},
        }
    )
    r = storescu(node.port, list(ct_study.files))
    assert r.returncode == 0, r.stderr + node.log()
    wait_for(lambda: state_is(node, ct_study.StudyInstanceUID, "done"), 60, "study done")
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ct_study.files}
    assert sent <= orthanc.instance_uids()
    log = node.log()
    head = pydicom.dcmread(ct_study.files[0], stop_before_pixels=True)
    for phi in (
        str(head.PatientID),
        str(head.PatientName),
        str(head.PatientBirthDate),
        ct_study.StudyInstanceUID,
    ):
        assert phi not in log
    assert "u:" in log  # studies are logged by hashed tag
