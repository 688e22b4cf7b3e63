"""Storage commitment requests and reports (PS3.4 Annex J), without a network."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event

from radfusion.config import DicomDestination
from radfusion.integrations.dicom.commitment import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    ReportError,
    commitment_request,
    describe_failures,
    read_report,
)
from radfusion.integrations.dicom.export import request_commitment
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
