"""DICOM Storage Commitment, push model (PS3.4 Annex J): the request and the peer's report.

After results are stored, the SCU asks the peer to take responsibility for them: an N-ACTION
(Action Type 1) naming a Transaction UID and each SOP Instance. The peer answers later with an
N-EVENT-REPORT of that transaction, usually on a new association to the SCU (IHE RAD-10):
Event Type 1 when it committed every instance, 2 when some failed, each failure with a
reason. This module builds the request, and reads and records the report (the node calls
:func:`record_report` for reports on its own associations, the exporter for one that comes on
the request's association); :mod:`radfusion.integrations.dicom.export` acts on it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.events import Event

from radfusion.errors import RadfusionError
from radfusion.integrations.store.catalog import Catalog
from radfusion.logs import uid_tag

__all__ = [
    "ALL_COMMITTED",
    "FAILURES_EXIST",
    "REQUEST_STORAGE_COMMITMENT",
    "STORAGE_COMMITMENT_PUSH_MODEL",
    "STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE",
    "CommitmentReport",
    "ReportError",
    "commitment_request",
    "describe_failures",
    "read_report",
    "record_report",
]

log = logging.getLogger("radfusion.commitment")

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
"""The well-known SOP Instance every request and report names (PS3.4 J.3.1)."""

REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type IDs
_SUCCESS, _PROCESSING_FAILURE = 0x0000, 0x0110  # N-EVENT-REPORT statuses (PS3.7 C)
_NO_SUCH_EVENT_TYPE, _INVALID_ARGUMENT_VALUE = 0x0113, 0x0115

FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class-instance conflict",
    0x0122: "referenced SOP Class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}
"""Failure Reason (0008,1197) values of PS3.3 C.14.1.1; 0 here: the report did not say."""


class ReportError(RadfusionError, ValueError):
    """An N-EVENT-REPORT that is not a storage commitment report we can act on; the message
    says what is wrong."""


@dataclass(frozen=True)
class CommitmentReport:
    """What a peer reported about one transaction."""

    TransactionUID: str
    committed: tuple[str, ...]  # SOP Instance UIDs
    failed: Mapping[str, int]  # SOP Instance UID -> Failure Reason


def commitment_request(instances: Mapping[str, str], transaction_uid: str) -> Dataset:
    """The N-ACTION information: ``instances`` maps SOP Instance UID to SOP Class UID."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_instance, sop_class in instances.items():
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = DicomSequence(items)
    return ds


def read_report(event_type_id: int | None, info: Dataset | None) -> CommitmentReport:
    """The report in an N-EVENT-REPORT's Event Type ID and Event Information.

    Raises:
        ReportError: not event type 1 or 2, no Transaction UID, an item without its SOP
            Instance UID, or event type 1 with failures.
    """
    if event_type_id not in (ALL_COMMITTED, FAILURES_EXIST):
        raise ReportError(f"event type {event_type_id} is not a storage commitment result")
    if info is None or not str(info.get("TransactionUID", "") or "").strip():
        raise ReportError("no Transaction UID (0008,1195) in the report")

    def uids(keyword: str) -> list[tuple[str, Dataset]]:
        out = []
        for item in info.get(keyword, None) or []:
            uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
            if not uid:
                raise ReportError(f"an item of {keyword} has no Referenced SOP Instance UID")
            out.append((uid, item))
        return out

    failed = {}
    for uid, item in uids("FailedSOPSequence"):
        reason = item.get("FailureReason", 0)
        failed[uid] = int(reason) if isinstance(reason, int) else 0
    if event_type_id == ALL_COMMITTED and failed:
        raise ReportError("event type 1 (all committed) lists failed instances")
    return CommitmentReport(
        str(info.TransactionUID).strip(),
        tuple(uid for uid, _ in uids("ReferencedSOPSequence")),
        failed,
    )


def describe_failures(failed: Mapping[str, int], asked: int) -> str:
    """E.g. ``1 of 2 instance(s) not committed: u:3fa2c1d0 (no such object instance)``;
    UIDs are shown as tags (they may identify a patient's study)."""

    def reason_of(code: int) -> str:
        if not code:
            return "not in the report"
        return FAILURE_REASONS.get(code, f"reason 0x{code:04X}")

    shown = ", ".join(
        f"{uid_tag(uid)} ({reason_of(code)})" for uid, code in list(failed.items())[:5]
    )
    more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
    return f"{len(failed)} of {asked} instance(s) not committed: {shown}{more}"


def record_report(catalog: Catalog, event: Event, peer: str) -> int:
    """Record the storage commitment report of an EVT_N_EVENT_REPORT from the AE ``peer``
    in ``catalog`` before it is acknowledged; returns the N-EVENT-REPORT status to answer.
    A report for no request of ours, or from another AE than the one asked, is refused."""
    req = cast(N_EVENT_REPORT, event.request)
    if req.EventTypeID not in (ALL_COMMITTED, FAILURES_EXIST):
        log.warning("commitment report from %r: event type %s", peer, req.EventTypeID)
        return _NO_SUCH_EVENT_TYPE
    try:
        report = read_report(req.EventTypeID, event.event_information)
    except Exception as err:  # ReportError, or an undecodable Event Information
        log.warning("storage commitment report from %r refused: %s", peer, err)
        return _INVALID_ARGUMENT_VALUE
    tag = uid_tag(report.TransactionUID)
    try:
        outcome = catalog.record_commitment_report(
            report.TransactionUID,
            reported_by=peer,
            committed=report.committed,
            failed=report.failed,
        )
    except sqlite3.Error as err:
        log.error("storage commitment report %s not recorded: %s", tag, err)
        return _PROCESSING_FAILURE
    if outcome in ("unknown", "wrong peer"):
        log.warning(
            "storage commitment report %s from %r refused: %s",
            tag,
            peer,
            "no such request" if outcome == "unknown" else "the request went to another AE",
        )
        return _PROCESSING_FAILURE
    log.info(
        "storage commitment report %s from %r %s: %d committed%s",
        tag,
        peer,
        "recorded" if outcome == "recorded" else "received again",
        len(report.committed),
        f", {describe_failures(report.failed, len(report.committed) + len(report.failed))}"
        if report.failed
        else "",
    )
    return _SUCCESS
