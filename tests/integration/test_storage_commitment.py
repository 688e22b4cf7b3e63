"""Storage commitment against a real Orthanc: asked after delivery, reported to a real node.

Orthanc (1.6+) is a Storage Commitment SCP of the push model: it answers the N-ACTION, checks
what it holds, and sends its N-EVENT-REPORT on a new association to the AE that asked (known
to it as a modality). The report reaches a ``radfusion serve`` process, which records it in
the catalog and settles it: committed files are deleted from the outbox, the others become a
dead letter. The exporter runs in the test, on the node's catalog.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from radfusion.config import DicomDestination, parse_config
from radfusion.integrations.dicom.export import Exporter, deliver, request_commitment
from radfusion.integrations.store.catalog import Catalog, CommitmentState
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.integration


def _instances(ct_study: Any, folder: Path, n: int) -> list[Path]:
    """``n`` instances of their own: the session's Orthanc holds other tests' instances."""
    folder.mkdir()
    out = []
    for i, source in enumerate(ct_study.files[:n]):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _node_and_exporter(
    node_factory: Any, orthanc: Any, report_port: int | None = None, wait_s: float = 60
) -> tuple[Any, Exporter, Catalog]:
    destination = orthanc.destination(timeout_s=10, storage_commitment={"wait_s": wait_s})
    node = node_factory(
        {"export": {"destinations": [destination]}, "completion": {"quiet_period_s": 60}}
    )
    # Orthanc reports to the AE that asked, at the address it knows for that AE title: this
    # node (or a port where nobody listens).
    orthanc.put(
        "/modalities/radfusion",
        {"AET": "RADFUSION", "Host": "127.0.0.1", "Port": report_port or node.port},
    )
    config = parse_config(node.config)
    catalog = Catalog(config.spool.path / "catalog.sqlite")
    exporter = Exporter(config.export, catalog, config.spool.path / "outbox", "RADFUSION")
    return node, exporter, catalog


def _settled(catalog: Catalog, transaction: str) -> bool:
    commitment = catalog.commitment(transaction)
    return commitment is not None and commitment.state is CommitmentState.SETTLED


# The node settles a request in the catalog first and then moves its files (a crash in
# between leaves files, never a second dead letter): the test waits for the files too.


def test_delivered_results_leave_the_spool_once_orthanc_commits(
    node_factory: Any, orthanc: Any, ct_study: Any, tmp_path: Path
) -> None:
    node, exporter, catalog = _node_and_exporter(node_factory, orthanc)
    files = _instances(ct_study, tmp_path / "results", 2)
    [result] = exporter.export(files, study_instance_uid=ct_study.StudyInstanceUID)
    assert result.delivered and result.commitment
    outbox = exporter.outbox_root
    # Delivered, not yet committed: the files wait in the outbox.
    pending = catalog.commitment(result.commitment)
    assert pending is not None and len(pending.instances) == 2

    wait_for(lambda: _settled(catalog, result.commitment), 30, "Orthanc's commitment report")
    wait_for(lambda: list(outbox.iterdir()) == [], 10, "the committed files' deletion")
    assert catalog.dead_letters() == []
    assert "storage commitment report" in node.log() and "recorded: 2 committed" in node.log()
    trail = [json.loads(line) for line in (Path(node.config["spool"]["path"]) / "audit.jsonl")
             .read_text().splitlines()]  # fmt: skip
    assert any("2 instance(s) committed" in e.get("detail", "") for e in trail)


def test_an_instance_orthanc_does_not_hold_is_dead_lettered_and_resent_on_retry(
    node_factory: Any, orthanc: Any, ct_study: Any, tmp_path: Path
) -> None:
    _, exporter, catalog = _node_and_exporter(node_factory, orthanc)
    held, lost = _instances(ct_study, tmp_path / "results", 2)
    dest = exporter.config.destination("pacs")
    assert isinstance(dest, DicomDestination)
    # As if both had been delivered and Orthanc had then lost one: only one is there.
    deliver(dest, [held], "RADFUSION")
    outbox = exporter.outbox_root / "pacs-manual"
    (outbox / ".sent").mkdir(parents=True)
    instances = {}
    for path in (held, lost):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        (outbox / ".sent" / path.name).write_bytes(path.read_bytes())
        instances[str(ds.SOPInstanceUID)] = (str(ds.SOPClassUID), path.name)
    transaction = generate_uid()
    catalog.add_commitment(
        transaction_uid=transaction,
        destination="pacs",
        ae_title="ORTHANC",
        outbox=outbox,
        study_instance_uid=ct_study.StudyInstanceUID,
        instances=instances,
        deadline=1e12,
    )
    request_commitment(
        dest, {k: v[0] for k, v in instances.items()}, transaction, "RADFUSION", catalog
    )

    wait_for(lambda: _settled(catalog, transaction), 30, "Orthanc's commitment report")
    [letter] = catalog.dead_letters()
    assert letter.files == 1 and letter.outbox == outbox
    assert "1 of 2 instance(s) not committed" in letter.error
    assert "no such object instance" in letter.error
    wait_for(lambda: (outbox / lost.name).exists(), 10, "the lost file back in the outbox")
    assert sorted(p.name for p in outbox.iterdir()) == [".sent", lost.name]  # to send again
    assert list((outbox / ".sent").iterdir()) == []  # the committed one is gone

    retried = exporter.retry_dead_letter(letter.id)
    assert retried.delivered and retried.commitment
    wait_for(lambda: _settled(catalog, retried.commitment), 30, "the second report")
    assert catalog.dead_letters() == []
    wait_for(lambda: not outbox.exists(), 10, "the outbox's removal")
    lost_uid = str(pydicom.dcmread(lost, stop_before_pixels=True).SOPInstanceUID)
    assert lost_uid in orthanc.instance_uids()


def test_no_report_in_time_dead_letters_everything_with_the_reason(
    node_factory: Any, orthanc: Any, ct_study: Any, tmp_path: Path
) -> None:
    # Orthanc knows this AE at a port where nobody listens: its report never arrives.
    _, exporter, catalog = _node_and_exporter(
        node_factory, orthanc, report_port=free_port(), wait_s=2
    )
    files = _instances(ct_study, tmp_path / "results", 2)
    [result] = exporter.export(files, study_instance_uid=ct_study.StudyInstanceUID)
    assert result.delivered and result.commitment

    wait_for(lambda: _settled(catalog, result.commitment), 30, "the wait to end")
    [letter] = catalog.dead_letters()
    assert letter.files == 2
    assert "no report from ORTHANC within 2 s" in letter.error
    wait_for(  # nothing lost: both back in the outbox, to be sent again
        lambda: len([p for p in letter.outbox.iterdir() if p.is_file()]) == 2,
        10,
        "both files back in the outbox",
    )
