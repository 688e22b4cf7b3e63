"""Storage commitment requests and reports (PS3.4 Annex J), without a network."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event

from radfusion.config import DicomDestination, parse_config
from radfusion.integrations.dicom import export
from radfusion.integrations.dicom.commitment import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    ReportError,
    commitment_request,
    describe_failures,
    read_report,
)
from radfusion.integrations.dicom.export import Exporter, request_commitment
from radfusion.integrations.store.catalog import Catalog
from tests.conftest import free_port


def _item(uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    item.ReferencedSOPInstanceUID = uid
    if reason is not None:
        item.FailureReason = reason
    return item


def test_the_request_names_the_transaction_and_every_instance_with_its_class() -> None:
    ds = commitment_request({"1.1": "1.2.840.10008.5.1.4.1.1.66.4", "1.2": "1.2.3"}, "9.1")
    assert ds.TransactionUID == "9.1"
    assert [
        (i.ReferencedSOPInstanceUID, i.ReferencedSOPClassUID) for i in ds.ReferencedSOPSequence
    ] == [
        ("1.1", "1.2.840.10008.5.1.4.1.1.66.4"),
        ("1.2", "1.2.3"),
    ]


def test_a_report_with_failures_gives_each_reason() -> None:
    info = Dataset()
    info.TransactionUID = "9.1"
    info.ReferencedSOPSequence = [_item("1.1")]
    info.FailedSOPSequence = [_item("1.2", 0x0112), _item("1.3")]
    report = read_report(2, info)
    assert report.TransactionUID == "9.1" and report.committed == ("1.1",)
    assert report.failed == {"1.2": 0x0112, "1.3": 0}
    text = describe_failures(report.failed, 3)
    assert text.startswith("2 of 3 instance(s) not committed")
    assert "no such object instance" in text and "not in the report" in text
    assert "1.2" not in text.replace("1.2.840", "")  # UIDs shown as tags only


@pytest.mark.parametrize(
    ("event_type", "keywords", "message"),
    [
        (3, {"TransactionUID": "9.1"}, "event type 3"),
        (1, {}, "no Transaction UID"),
        (1, {"TransactionUID": "9.1", "FailedSOPSequence": [_item("1.2", 0x0110)]}, "lists failed"),
        (2, {"TransactionUID": "9.1", "ReferencedSOPSequence": [Dataset()]}, "no Referenced SOP"),
    ],
)
def test_a_report_that_is_not_one_says_why(
    event_type: int, keywords: dict[str, object], message: str
) -> None:
    info = Dataset()
    for keyword, value in keywords.items():
        setattr(info, keyword, value)
    with pytest.raises(ReportError, match=message):
        read_report(event_type, info)


def test_a_report_on_the_requests_own_association_is_recorded(tmp_path: Path) -> None:
    """Some archives answer on the association of the request (PS3.4 J.3.3); Orthanc does
    not, so a pynetdicom peer plays that part here."""

    def on_action(event: Event) -> tuple[int, None]:
        info = event.action_information
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        report.ReferencedSOPSequence = info.ReferencedSOPSequence
        status, _ = event.assoc.send_n_event_report(
            report, 1, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE
        )
        replies.append(int(status.Status))
        return 0x0000, None

    replies: list[int] = []
    peer = AE(ae_title="ARCHIVE")
    peer.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
    port = free_port()
    server = peer.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_ACTION, on_action)]
    )
    try:
        catalog = Catalog(tmp_path / "c.sqlite")
        catalog.add_commitment(
            transaction_uid="9.1",
            destination="archive",
            ae_title="ARCHIVE",
            outbox=tmp_path / "outbox",
            study_instance_uid="1.2.3",
            instances={"1.1": ("1.2.840.10008.5.1.4.1.1.66.4", "00000_seg.dcm")},
            deadline=1e12,
        )
        dest = DicomDestination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=port)
        request_commitment(
            dest, {"1.1": "1.2.840.10008.5.1.4.1.1.66.4"}, "9.1", "RADFUSION", catalog
        )
    finally:
        server.shutdown()
    assert replies == [0x0000]
    [due] = catalog.commitments_to_settle()
    assert due.TransactionUID == "9.1" and due.failed == {}


@pytest.fixture
def store_only_peer(tmp_path: Path) -> Iterator[tuple[int, list[str]]]:
    """A C-STORE (and Verification) SCP that offers no storage commitment."""
    stored: list[str] = []

    def on_store(event: Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    peer = AE(ae_title="ARCHIVE")
    peer.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    peer.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = peer.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    yield port, stored
    server.shutdown()


def _exporter(tmp_path: Path, port: int) -> Exporter:
    config = parse_config(
        {
            "node": {"allowed_callers": [{"ae_title": "ARCHIVE"}]},
            "export": {
                "destinations": [
                    {
                        "name": "archive",
                        "type": "dicom",
                        "ae_title": "ARCHIVE",
                        "host": "127.0.0.1",
                        "port": port,
                        "storage_commitment": {"wait_s": 60},
                    }
                ],
                "retry": {"attempts": 2, "initial_backoff_s": 0},
            },
        }
    )
    return Exporter(config.export, Catalog(tmp_path / "c.sqlite"), tmp_path / "outbox", "RF")


def _ct_files(folder: Path, n: int) -> list[Path]:
    from radfusion.synth.ct_series import synth_ct

    return list(synth_ct(folder, slices=n, rows=32, columns=32, seed=9, tumours=0).files)


def test_a_peer_without_storage_commitment_leaves_a_dead_letter_of_everything(
    tmp_path: Path, store_only_peer: tuple[int, list[str]]
) -> None:
    port, stored = store_only_peer
    exporter = _exporter(tmp_path, port)
    files = _ct_files(tmp_path / "ct", 2)
    [result] = exporter.export(files, study_instance_uid="1.2.3")
    assert len(stored) == 2  # delivered once, not again on the second attempt
    assert not result.delivered and result.attempts == 1  # not retryable
    assert "does not accept storage commitment" in result.error
    [letter] = exporter.catalog.dead_letters()
    assert letter.files == 2 and len(list((letter.outbox / ".sent").iterdir())) == 2
    assert exporter.catalog.commitments() == []


def test_a_lost_association_to_ask_for_commitment_loses_no_file(
    tmp_path: Path, store_only_peer: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unit test of the exporter's bookkeeping: the request fails as an unreachable peer
    makes it fail (DeliveryError with nothing pending named)."""
    port, stored = store_only_peer

    def unreachable(*args: object) -> None:
        raise export.DeliveryError("archive: no association (peer unreachable or aborted)")

    monkeypatch.setattr(export, "request_commitment", unreachable)
    exporter = _exporter(tmp_path, port)
    [result] = exporter.export(_ct_files(tmp_path / "ct", 2), study_instance_uid="1.2.3")
    assert len(stored) == 2 and not result.delivered and result.attempts == 2
    [letter] = exporter.catalog.dead_letters()
    assert letter.files == 2 and len(list((letter.outbox / ".sent").iterdir())) == 2
