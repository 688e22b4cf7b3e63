"""C-MOVE retrieval: the PACS sends a prior's images to the node's AE title, and they go to the
retrieval that asked for them, not to the spool.

C-MOVE (PS3.4 C.4.2) is the retrieval every PACS supports: on our request it opens its own
association to the move destination and C-STOREs the images there. The destination is the
node's AE title, which the PACS already knows (it sends studies there), so a site configures
nothing new. Those images are copies of an earlier study, not new work: they must not start a
job, and the node may have catalogued the same instances months ago. :data:`INBOX` is where a
retrieval says which series it waits for; the node hands matching instances to it before
anything else. With no node listening in this process (``radfusion run``), the retrieval
listens on the node's address itself while it lasts, as dcmtk's movescu does.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    StudyRootQueryRetrieveInformationModelMove,
)

from radfusion import audit
from radfusion.config import DicomDestination, NodeConfig
from radfusion.integrations.dicom.association import NoAssociation, associate
from radfusion.integrations.dicom.header import RECEIVED_TRANSFER_SYNTAXES
from radfusion.integrations.dicom.pynetdicom_internals import claim
from radfusion.integrations.dicom.query import (
    RETRIEVED_SOP_CLASSES,
    DimseQuery,
    QueryError,
    archive_participant,
    series_identifier,
)

__all__ = ["INBOX", "DimseMoveQuery", "MoveInbox", "move_originator", "retrieve_series_by_move"]

log = logging.getLogger("radfusion.moves")

_WAIT_FOR_SERIES_S = 300.0  # another retrieval of the same series finishes first
_STATUS_MEANING = {
    0xA701: "out of resources: unable to calculate the number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown (register this AE title, host and port in the PACS)",
    0xA900: "identifier does not match SOP class",
    0xC000: "unable to process",
    0xFE00: "cancelled",
}


@dataclass
class _Waiting:
    folder: Path
    peer_ae_title: str
    originator_ae_title: str
    files: list[Path] = field(default_factory=list)


class MoveInbox:
    """The series that retrievals in this process wait for, and where each goes.

    Thread-safe: the node's association threads deliver while jobs wait.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._waiting: dict[str, _Waiting] = {}
        self._listeners = 0

    @property
    def listening(self) -> bool:
        """True while a node of this process receives C-STOREs (and so delivers here)."""
        with self._lock:
            return self._listeners > 0

    def node_started(self) -> None:
        with self._lock:
            self._listeners += 1

    def node_stopped(self) -> None:
        with self._lock:
            self._listeners = max(0, self._listeners - 1)

    @property
    def expecting(self) -> bool:
        """True while some retrieval waits (the node's cheap test before reading a header)."""
        return bool(self._waiting)

    @contextlib.contextmanager
    def expect(
        self,
        series_instance_uids: Sequence[str],
        folder: Path,
        peer_ae_title: str,
        originator_ae_title: str,
    ) -> Iterator[list[Path]]:
        """Within the block, instances of these series sent by ``peer_ae_title``, or whose
        C-STORE names ``originator_ae_title`` as its Move Originator (a PACS may send from
        another AE title than it is asked on), are written into ``folder``; yields the list of
        files written (filled as they come).

        Raises:
            QueryError: another retrieval of one of these series did not finish in time.
        """
        folder.mkdir(parents=True, exist_ok=True)
        waiting = _Waiting(folder, peer_ae_title.strip(), originator_ae_title.strip())
        with self._lock:
            busy = lambda: any(uid in self._waiting for uid in series_instance_uids)  # noqa: E731
            if not self._lock.wait_for(lambda: not busy(), timeout=_WAIT_FOR_SERIES_S):
                raise QueryError("another retrieval of the same series is still running")
            for uid in series_instance_uids:
                self._waiting[uid] = waiting
        try:
            yield waiting.files
        finally:
            with self._lock:
                for uid in series_instance_uids:
                    self._waiting.pop(uid, None)
                self._lock.notify_all()

    def deliver(
        self,
        series_instance_uid: str,
        calling_ae_title: str,
        move_originator_ae_title: str,
        encoded: bytes | Path,
    ) -> Path | None:
        """Keep an instance for the retrieval that waits for its series (``encoded``: the
        Part 10 bytes, or a file that is moved); returns where it went, or None when no
        retrieval waits for it from that sender (the caller handles it as usual).

        Raises:
            OSError: it could not be written (not kept: the caller refuses it).
        """
        with self._lock:
            waiting = self._waiting.get(series_instance_uid)
            if waiting is None or (
                waiting.peer_ae_title != calling_ae_title.strip()
                and waiting.originator_ae_title != move_originator_ae_title.strip()
            ):
                return None
            path = waiting.folder / f"{len(waiting.files):05d}.dcm"
            waiting.files.append(path)
        try:
            if isinstance(encoded, Path):
                shutil.move(encoded, path)
            else:
                path.write_bytes(encoded)
        except OSError:
            with self._lock:
                waiting.files.remove(path)
            raise
        return path


def move_originator(event: Event) -> str:
    """The Move Originator AE Title of a C-STORE request ("" when the sender gives none)."""
    value = getattr(event.request, "MoveOriginatorApplicationEntityTitle", None)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


INBOX = MoveInbox()
"""The process's one inbox: the node delivers to it, retrievals wait on it."""


def retrieve_series_by_move(
    peer: DicomDestination,
    node: NodeConfig,
    study_instance_uid: str,
    series_instance_uids: Sequence[str],
    folder: Path,
) -> list[Path]:
    """C-MOVE the series to the node's AE title and return the files that came, in ``folder``.

    The PACS must know the node's AE title with its host and port (it does when it sends
    studies to the node). Sent as the node's AE title.

    Raises:
        QueryError: no association, the PACS refused or failed, the node's port is taken by
            another process (with no node in this one), or nothing came.
    """
    with INBOX.expect(series_instance_uids, folder, peer.ae_title, node.ae_title) as files:
        with _receiver(node) if not INBOX.listening else contextlib.nullcontext():
            _move(peer, node.ae_title, study_instance_uid, series_instance_uids)
        received = list(files)
    if not received:
        raise QueryError(f"{peer.name}: C-MOVE brought no images")
    audit.record(
        audit.INSTANCES_TRANSFERRED,
        action="R",
        participants=[archive_participant(peer)],
        objects=[{"StudyInstanceUID": study_instance_uid, "retrieved": len(received)}],
        detail="C-MOVE of a prior",
    )
    return received


def _move(
    peer: DicomDestination,
    ae_title: str,
    study_instance_uid: str,
    series_instance_uids: Sequence[str],
) -> None:
    try:
        assoc = associate(
            peer,
            ae_title,
            [
                (
                    StudyRootQueryRetrieveInformationModelMove,
                    ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
                )
            ],
        )
    except NoAssociation as err:
        raise QueryError(str(err)) from None
    try:
        for series in series_instance_uids:
            query = series_identifier(study_instance_uid, series)
            last: int | None = None
            failed = 0
            for status, _ in assoc.send_c_move(
                query, ae_title, StudyRootQueryRetrieveInformationModelMove
            ):
                last = getattr(status, "Status", None)
                failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
            if last in (0x0000, 0xB000):
                if failed:
                    log.warning("%s: C-MOVE: %d image(s) of a series failed", peer.name, failed)
                continue
            if last is None:
                raise QueryError(f"{peer.name}: C-MOVE of a series failed: no response")
            meaning = _STATUS_MEANING.get(last, "failed")
            raise QueryError(
                f"{peer.name}: C-MOVE to {ae_title} failed: status 0x{last:04X} ({meaning})"
            )
    finally:
        if assoc.is_established:
            assoc.release()


@contextlib.contextmanager
def _receiver(node: NodeConfig) -> Iterator[None]:
    """A storage SCP on the node's address for the length of one retrieval: it keeps what
    the inbox expects and refuses anything else."""

    def on_store(event: Event) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        # A node started earlier in this process makes pynetdicom receive into files (ours
        # to move when claimed; otherwise pynetdicom deletes it after this handler).
        path = getattr(event.request, "_dataset_path", None)
        received: bytes | Path
        if path is None:
            received = event.encoded_dataset(include_meta=True)
        elif claim(path) is not None:
            received = Path(path)
        else:
            received = Path(path).read_bytes()
        try:
            series = str(event.dataset.SeriesInstanceUID)
        except Exception:
            return 0xC000  # cannot understand
        try:
            kept = INBOX.deliver(series, calling, move_originator(event), received)
        except OSError:
            return 0xA700  # out of resources
        return 0x0000 if kept is not None else 0xC000

    ae = AE(ae_title=node.ae_title)
    ae.require_called_aet = True
    for uid in RETRIEVED_SOP_CLASSES:
        ae.add_supported_context(uid, RECEIVED_TRANSFER_SYNTAXES)
    try:
        server = ae.start_server(
            (node.host, node.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
    except OSError as err:
        raise QueryError(
            f"C-MOVE needs the node's address {node.host}:{node.port} to receive the images, "
            f"and it is in use ({err.strerror}); is `radfusion serve` running? Retrieve by "
            "C-GET, or run the app in that service"
        ) from None
    if server is None:  # only block=True returns None
        raise RuntimeError("pynetdicom returned no server")
    try:
        yield
    finally:
        server.shutdown()
        ae.shutdown()


@dataclass(frozen=True)
class DimseMoveQuery(DimseQuery):
    """A DICOM peer as a :class:`~radfusion.integrations.dicom.query.PriorSource` that
    retrieves by C-MOVE to ``node`` (C-FIND as :class:`DimseQuery`)."""

    node: NodeConfig

    def retrieve_series(
        self, study_instance_uid: str, series_instance_uids: Sequence[str], folder: Path
    ) -> list[Path]:
        return retrieve_series_by_move(
            self.peer, self.node, study_instance_uid, series_instance_uids, folder
        )
