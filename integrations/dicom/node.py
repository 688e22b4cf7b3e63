"""The DICOM node: a Storage and Verification SCP that spools and catalogs what it receives.

The rest of radfusion never sees sockets: it reads what arrived, and study state, from the
catalog. A C-STORE success status is
sent only after the instance is renamed into the spool and recorded in the catalog. The node
also takes the storage commitment reports (N-EVENT-REPORT) of peers radfusion asked to commit
to its results, and records them in the catalog for the exporter to act on.
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import tempfile
import threading
from pathlib import Path
from typing import cast

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    Verification,
    register_uid,
)
from pynetdicom.transport import ThreadedAssociationServer

from radfusion import audit
from radfusion.config import RadfusionConfig
from radfusion.integrations.dicom.commitment import STORAGE_COMMITMENT_PUSH_MODEL, record_report
from radfusion.integrations.dicom.guard import ConnectionGuard
from radfusion.integrations.dicom.header import (
    RECEIVED_TRANSFER_SYNTAXES,
    HeaderError,
    WireHeader,
    check_part10_structure,
    read_part10_header,
)
from radfusion.integrations.dicom.moves import INBOX, move_originator
from radfusion.integrations.dicom.pynetdicom_internals import (
    abort_undecodable_messages,
    claim,
    on_connection_open,
    receive_datasets_into_files,
    shorten_polling,
)
from radfusion.integrations.dicom.spool import Spool, SpoolFullError
from radfusion.integrations.dicom.tls import DeferredHandshake, server_context
from radfusion.integrations.store.catalog import Catalog, InstanceRecord, StoreOutcome
from radfusion.logs import uid_tag

__all__ = ["DicomNode", "Status"]

log = logging.getLogger("radfusion.node")


class Status:
    """C-STORE status codes the node returns (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210
    PROCESSING_FAILURE = 0x0110


# Every transfer syntax pydicom or pynetdicom knows: instances are stored as received.


def storage_sop_classes(extra: list[str] | None = None) -> list[str]:
    """Every standard Storage SOP Class, plus site-specific (private) ones from ``extra``."""
    from pynetdicom.service_class import StorageServiceClass

    for i, uid in enumerate(extra or []):
        register_uid(uid, f"PrivateStorage{i}", StorageServiceClass)
    return sorted(
        {*(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts), *(extra or [])}
    )


def _peer(assoc: Association) -> dict[str, str]:
    """The calling side of ``assoc`` as an audit participant."""
    primitive = assoc.requestor.primitive
    calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
    peer = {"role": "calling", "ae_title": calling, "address": assoc.requestor.address}
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if isinstance(raw, ssl.SSLSocket):
        peer["tls"] = raw.version() or ""
    return peer


def _check_identity(header: WireHeader, sop_instance: str, abstract_syntax: str) -> None:
    """The dataset's SOP Instance and SOP Class UIDs must be there and agree with the C-STORE
    request and its presentation context (PS3.4 B.2.3: 0xA900 when they do not)."""
    if not header.SOPInstanceUID:
        raise HeaderError(
            "SOP Instance UID (0008,0018) is missing",
            status=Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
    if header.SOPInstanceUID != sop_instance:
        raise HeaderError(
            "SOP Instance UID (0008,0018) differs from the request's Affected SOP Instance UID",
            status=Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
    if not header.SOPClassUID:
        raise HeaderError(
            "SOP Class UID (0008,0016) is missing", status=Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        )
    if header.SOPClassUID != abstract_syntax:
        raise HeaderError(
            f"SOP Class UID {header.SOPClassUID} differs from the presentation context's "
            f"{abstract_syntax}",
            status=Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )


class DicomNode:
    """Receives DICOM instances over the network into ``spool`` and ``catalog``.

    Args:
        config: the validated configuration (``node``, ``spool``, ``completion`` sections).
        catalog: where instances and studies are recorded.
        spool: where instance files are written.
    """

    def __init__(self, config: RadfusionConfig, catalog: Catalog, spool: Spool) -> None:
        self.config = config
        self.catalog = catalog
        self.spool = spool
        self._server: ThreadedAssociationServer | None = None
        self._guard = ConnectionGuard(config.node)
        self._tallies: dict[int, dict[str, list[int]]] = {}  # association -> study -> counts
        self._tally_lock = threading.Lock()
        ae = AE(ae_title=config.node.ae_title)
        ae.maximum_pdu_size = config.node.maximum_pdu_size
        ae.maximum_associations = config.node.max_associations
        ae.acse_timeout = config.node.acse_timeout_s
        ae.dimse_timeout = config.node.dimse_timeout_s
        ae.network_timeout = config.node.network_timeout_s
        ae.require_called_aet = True
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, RECEIVED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, RECEIVED_TRANSFER_SYNTAXES)
        # Reports of the peers asked to commit to our results; the peer may propose SCU/SCP
        # role selection (it is the Storage Commitment SCP reporting to the SCU).
        ae.add_supported_context(
            STORAGE_COMMITMENT_PUSH_MODEL, RECEIVED_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
        self._ae = ae

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> int:
        """Start listening; returns the bound port (useful when configured as 0)."""
        shorten_polling()
        # pynetdicom then writes each dataset to a temp file as its PDUs arrive; with temp
        # files in the spool's tmp/ the handler renames it into place instead of copying it.
        # tempfile.tempdir is process-wide: the node owns its process (radfusion serve).
        receive_datasets_into_files()
        abort_undecodable_messages()
        tempfile.tempdir = str(self.spool.tmp)
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, on_connection_open),
            (evt.EVT_CONN_OPEN, self._guard.on_connection_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_event_report),
        ]
        tls = self.config.node.tls
        server = self._ae.start_server(
            (self.config.node.host, self.config.node.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=DeferredHandshake(server_context(tls)) if tls else None,  # type: ignore[arg-type]
        )
        if server is None:  # only block=True returns None
            raise RuntimeError("pynetdicom returned no server")
        self._server = server
        self._guard.start()
        INBOX.node_started()
        port = int(server.server_address[1])
        log.info(
            "DICOM node %s listening on %s:%d (%s)",
            self.config.node.ae_title,
            self.config.node.host,
            port,
            "plain TCP" if tls is None else "DICOM TLS" + (", mutual" if tls.client_ca else ""),
        )
        return port

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the node is not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting associations and close the open ones."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            INBOX.node_stopped()
        self._ae.shutdown()
        self._guard.stop()

    # -- handlers ---------------------------------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        # requestor.ae_title is filled in only after negotiation; the request has it now.
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        called = str(primitive.called_ae_title).strip() if primitive is not None else ""
        address = assoc.requestor.address
        if called != self.config.node.ae_title:
            log.warning(
                "rejected association from %r at %s: called AE title %r is not ours",
                calling,
                address,
                called,
            )
            # Rejected-permanent, service user, "called AE title not recognised"
            self._reject(assoc, 0x07, f"called AE title {called!r} is not ours")
            return
        caller = self.config.node.caller(calling)
        if caller is not None and caller.permits(address):
            return
        reason = "unknown calling AE title" if caller is None else "address not allowed"
        log.warning("rejected association from %r at %s: %s", calling, address, reason)
        # Rejected-permanent, service user, "calling AE title not recognised"
        self._reject(assoc, 0x03, reason)

    @staticmethod
    def _reject(assoc: Association, diagnostic: int, reason: str) -> None:
        audit.record(
            audit.SECURITY_ALERT,
            type=audit.NODE_AUTHENTICATION,
            outcome=4,
            participants=[_peer(assoc)],
            detail=f"association rejected: {reason}",
        )
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.is_rejected = True
        assoc.kill()

    def _on_accepted(self, event: Event) -> None:
        audit.record(audit.USER_AUTHENTICATION, type=audit.LOGIN, participants=[_peer(event.assoc)])

    def _on_closed(self, event: Event) -> None:
        with self._tally_lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if not tally:
            return
        refused = sum(counts[1] for counts in tally.values())
        audit.record(
            audit.INSTANCES_TRANSFERRED,
            action="C",
            outcome=0 if not refused else 4,
            participants=[_peer(event.assoc)],
            objects=[
                {"StudyInstanceUID": uid, "stored": counts[0], "refused": counts[1]}
                for uid, counts in tally.items()
            ],
        )

    def _on_echo(self, event: Event) -> int:
        return Status.SUCCESS

    def _on_event_report(self, event: Event) -> tuple[int, None]:
        return record_report(self.catalog, event, event.assoc.requestor.ae_title.strip()), None

    def _on_store(self, event: Event) -> int:
        status, study = self._store(event)
        if study is None:
            return status  # a retrieval's copy: its audit record is the retrieval's
        with self._tally_lock:
            tally = self._tallies.setdefault(id(event.assoc), {})
            counts = tally.setdefault(study, [0, 0])
            counts[0 if status == Status.SUCCESS else 1] += 1
        return status

    @staticmethod
    def _offer_to_retrieval(
        event: Event, transfer_syntax: str, calling: str
    ) -> tuple[WireHeader | None, bool]:
        """The header (None when unreadable: refused later, with the reason) and whether a
        C-MOVE retrieval of this process took the instance (a copy of a prior, not a new
        study; asked first, as the node may have catalogued the same instances long ago).

        Raises:
            OSError: the retrieval could not keep it.
        """
        received = Path(event.dataset_path)
        try:
            header = read_part10_header(received, transfer_syntax)
        except HeaderError:
            return None, False
        kept = INBOX.deliver(header.SeriesInstanceUID, calling, move_originator(event), received)
        return header, kept is not None

    def _store(self, event: Event) -> tuple[int, str | None]:
        """Store one instance; returns its status and its study ("" when not known, None when
        it went to a C-MOVE retrieval of this process)."""
        req = cast(C_STORE, event.request)  # EVT_C_STORE: always a C-STORE request
        sop_instance = str(req.AffectedSOPInstanceUID or "").strip()
        sop_class = str(req.AffectedSOPClassUID or "").strip()
        transfer_syntax = str(event.context.transfer_syntax)
        calling = event.assoc.requestor.ae_title.strip()
        study = ""
        received = event.dataset_path  # written to spool/tmp by pynetdicom as it arrived
        written = claim(received)
        if not sop_instance:
            log.warning("C-STORE from %r without Affected SOP Instance UID", calling)
            return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, study
        if written is not None and written.error is not None:
            log.error(
                "instance %s refused with 0xA700: cannot write spool: %s",
                uid_tag(sop_instance),
                written.error.strerror or type(written.error).__name__,
            )
            return Status.OUT_OF_RESOURCES, study
        header: WireHeader | None = None
        if INBOX.expecting:
            try:
                header, kept = self._offer_to_retrieval(event, transfer_syntax, calling)
            except OSError as err:
                log.error("instance refused with 0xA700: cannot keep it for a retrieval: %s", err)
                return Status.OUT_OF_RESOURCES, study
            if kept:
                return Status.SUCCESS, None
        try:
            stored_in = self.catalog.seen_again(
                sop_instance, quiet_period_s=self.config.quiet_period_for(calling)
            )
            if stored_in is not None:
                study = stored_in
                log.debug("duplicate instance %s ignored", uid_tag(sop_instance))
                return Status.SUCCESS, study
            try:
                if header is None:  # not read for a retrieval already
                    header = read_part10_header(received, transfer_syntax)
                study = header.StudyInstanceUID
                _check_identity(header, sop_instance, str(event.context.abstract_syntax))
                check_part10_structure(received, transfer_syntax)
            except HeaderError as err:
                log.warning("instance %s from %r refused: %s", uid_tag(sop_instance), calling, err)
                return err.status, study
            path = self.spool.path_for(
                header.StudyInstanceUID, header.SeriesInstanceUID, sop_instance
            )
            size = self.spool.take(received, path)
            rec = InstanceRecord.from_header(
                header,
                SOPInstanceUID=sop_instance,
                SOPClassUID=sop_class,
                TransferSyntaxUID=transfer_syntax,
                path=path,
                size=size,
                calling_ae=calling,
            )
            outcome = self.catalog.record_instance(
                rec,
                quiet_period_s=self.config.quiet_period_for(calling),
                late_arrival=self.config.completion.late_arrival,
            )
        except SpoolFullError as err:
            log.error("instance refused with 0xA700: %s", err)
            return Status.OUT_OF_RESOURCES, study
        except OSError as err:
            log.error("instance refused with 0xA700: cannot write spool: %s", err.strerror)
            return Status.OUT_OF_RESOURCES, study
        except sqlite3.OperationalError as err:
            if err.sqlite_errorcode != sqlite3.SQLITE_FULL:
                log.exception("instance %s refused: catalog error", uid_tag(sop_instance))
                return Status.PROCESSING_FAILURE, study
            log.error("instance refused with 0xA700: catalog cannot grow: %s", err)
            return Status.OUT_OF_RESOURCES, study
        except Exception:
            log.exception("instance %s refused: internal error", uid_tag(sop_instance))
            return Status.PROCESSING_FAILURE, study
        if outcome is StoreOutcome.REOPENED:
            log.info("study %s reopened by a late instance", uid_tag(rec.StudyInstanceUID))
        elif outcome is StoreOutcome.LATE_IGNORED:
            log.warning(
                "late instance for handed-on study %s stored, study not re-run (policy ignore)",
                uid_tag(rec.StudyInstanceUID),
            )
        return Status.SUCCESS, study
