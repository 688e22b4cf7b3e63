"""Export: deliver result files to the configured destinations, durably.

Files are first staged in an outbox folder (hard links, or copies across filesystems), one per
destination, so a delivery that fails survives restarts and can be retried later. A delivery
is tried with the retry policy's backoff; files a destination confirms are taken out of the
outbox, so a retry sends only what is still pending. When every attempt fails, or a failure
that retrying cannot mend (refused, a conflict, wrong credentials), the outbox becomes a
dead-letter record that says why; ``radfusion deadletter list`` shows it and ``radfusion
deadletter retry`` re-sends it.

A DICOM destination with ``storage_commitment`` is asked, once it has everything, to commit
to storing it (:mod:`radfusion.integrations.dicom.commitment`). The delivered files then wait
in the outbox's ``.sent`` folder until the peer's report reaches the node: committed files
are deleted, the rest (and everything, when no report came in time) become a dead letter.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.association import Association

from radfusion import audit
from radfusion.config import (
    DicomDestination,
    DicomWebDestination,
    ExportConfig,
    FolderDestination,
    RetryPolicy,
    StorageCommitment,
)
from radfusion.errors import RadfusionError
from radfusion.integrations.dicom.association import NoAssociation, associate
from radfusion.integrations.dicom.commitment import (
    REQUEST_STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    commitment_request,
    describe_failures,
    record_report,
)
from radfusion.integrations.dicom.pynetdicom_internals import (
    send_datasets_from_files,
)
from radfusion.integrations.dicomweb.stow import StowError, stow
from radfusion.integrations.store.catalog import Catalog, Commitment, CommitmentState
from radfusion.logs import uid_tag

__all__ = ["DeliveryError", "ExportResult", "Exporter", "deliver", "request_commitment"]

log = logging.getLogger("radfusion.export")

_UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
# C-STORE statuses that mean "stored": success and the Storage Service warnings.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_VERIFICATION = "1.2.840.10008.1.1"
_SENT = ".sent"  # in an outbox: delivered, awaiting the peer's storage commitment


class DeliveryError(RadfusionError, RuntimeError):
    """A destination did not accept every file; the message names the destination and why.

    Attributes:
        pending: the files still to deliver (None: all of them).
        retryable: whether trying again may succeed without a person acting.
    """

    def __init__(
        self, message: str, pending: Sequence[Path] | None = None, retryable: bool = True
    ) -> None:
        super().__init__(message)
        self.pending = None if pending is None else tuple(pending)
        self.retryable = retryable


@dataclass(frozen=True)
class ExportResult:
    destination: str
    delivered: bool
    attempts: int
    error: str = ""
    dead_letter_id: int | None = None
    commitment: str = ""  # the Transaction UID of the storage commitment awaited, if any


def _send_dicom(dest: DicomDestination, files: Sequence[Path], calling_ae_title: str) -> None:
    heads = []
    for f in files:
        head = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        heads.append((f, str(head.SOPClassUID), str(head.file_meta.TransferSyntaxUID)))
    # One context per stored syntax, so a receiver that takes it cannot pick another, and one
    # with the uncompressed syntaxes to fall back on for a compressed one.
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for _, sop_class, ts in heads:
        if ts in _UNCOMPRESSED:
            wanted[sop_class, (ts, *(u for u in _UNCOMPRESSED if u != ts))] = None
        else:
            wanted[sop_class, (ts,)] = None
            wanted[sop_class, tuple(_UNCOMPRESSED)] = None
    if len(wanted) > 128:
        raise DeliveryError(f"{dest.name}: more than 128 presentation contexts in one delivery")
    send_datasets_from_files()
    assoc = _associate(dest, calling_ae_title, wanted)
    accepted = {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
    }
    try:
        for i, (f, sop_class, ts) in enumerate(heads):
            status = assoc.send_c_store(_as_accepted(f, (sop_class, ts) in accepted))
            code = getattr(status, "Status", None)
            if code not in _STORED:
                shown = "no response" if code is None else f"status 0x{code:04X}"
                raise DeliveryError(
                    f"{dest.name}: C-STORE of {f.name} failed: {shown}",
                    pending=[h[0] for h in heads[i:]],
                )
    finally:
        if assoc.is_established:
            assoc.release()


def _associate(
    dest: DicomDestination, calling_ae_title: str, contexts: dict[tuple[str, tuple[str, ...]], None]
) -> Association:
    try:
        return associate(dest, calling_ae_title, contexts)
    except NoAssociation as err:
        raise DeliveryError(str(err)) from None


def request_commitment(
    dest: DicomDestination,
    instances: dict[str, str],
    transaction_uid: str,
    calling_ae_title: str,
    catalog: Catalog,
) -> None:
    """Ask ``dest`` to commit to storing ``instances`` (SOP Instance UID -> SOP Class UID)
    under ``transaction_uid``, which must be in ``catalog``. The report usually comes later,
    to the node; one the peer sends on this association is recorded in ``catalog`` too.

    Raises:
        DeliveryError: no association, the peer does not offer storage commitment, or it
            refused the request (not retryable: the peer's configuration must change).
    """
    # Verification too: a peer that accepts nothing else still establishes the association,
    # so "no storage commitment here" is told apart from "unreachable".
    contexts = {
        (STORAGE_COMMITMENT_PUSH_MODEL, tuple(_UNCOMPRESSED)): None,
        (_VERIFICATION, tuple(_UNCOMPRESSED)): None,
    }
    assoc = _associate(dest, calling_ae_title, contexts)
    assoc.bind(
        evt.EVT_N_EVENT_REPORT,
        lambda event: (record_report(catalog, event, dest.ae_title), None),
    )
    try:
        offered = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        if STORAGE_COMMITMENT_PUSH_MODEL not in offered:
            raise DeliveryError(
                f"{dest.name}: the peer does not accept storage commitment requests",
                pending=(),
                retryable=False,
            )
        status, _ = assoc.send_n_action(
            commitment_request(instances, transaction_uid),
            REQUEST_STORAGE_COMMITMENT,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
        )
        code = getattr(status, "Status", None)
        if code is None:
            raise DeliveryError(
                f"{dest.name}: no response to the storage commitment request", pending=()
            )
        if code != 0x0000:
            raise DeliveryError(
                f"{dest.name}: storage commitment request refused: status 0x{code:04X}",
                pending=(),
                retryable=False,
            )
    finally:
        if assoc.is_established:
            assoc.release()


def _as_accepted(path: Path, stored_syntax_accepted: bool) -> Path | Dataset:
    """What to hand pynetdicom for one file: the file itself when the receiver accepted its
    stored transfer syntax (its bytes are sent as they are, never decoded); else the decoded
    dataset, decompressed if need be, which pynetdicom encodes in an uncompressed syntax the
    receiver accepted."""
    if stored_syntax_accepted:
        return path
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)  # the same instance, decoded
    return ds


def _copy_to_folder(dest: FolderDestination, files: Sequence[Path]) -> None:
    try:
        for f in files:
            ds = pydicom.dcmread(
                f, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"]
            )
            target = dest.path / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
            shutil.copyfile(f, tmp)
            os.replace(tmp, target)
    except OSError as err:
        raise DeliveryError(f"{dest.name}: cannot write to {dest.path}: {err.strerror}") from None


def _send_stow(dest: DicomWebDestination, files: Sequence[Path]) -> None:
    try:
        stow(dest, files)
    except StowError as err:
        raise DeliveryError(str(err), pending=err.pending, retryable=err.retryable) from None
    except ValueError as err:  # the secret cannot be read: configuration, not the network
        raise DeliveryError(f"{dest.name}: {err}", retryable=False) from None


def deliver(
    dest: DicomDestination | DicomWebDestination | FolderDestination,
    files: Sequence[Path],
    calling_ae_title: str,
) -> None:
    """Deliver ``files`` to ``dest`` once.

    Raises:
        DeliveryError: not every file was delivered; says which are pending and whether
            trying again can help.
    """
    if isinstance(dest, DicomDestination):
        _send_dicom(dest, files, dest.calling_ae_title or calling_ae_title)
    elif isinstance(dest, DicomWebDestination):
        _send_stow(dest, files)
    else:
        _copy_to_folder(dest, files)


def _audit_delivery(
    dest: DicomDestination | DicomWebDestination | FolderDestination,
    study_instance_uid: str,
    files: int,
    outcome: int,
    detail: str,
) -> None:
    where = {"role": "destination", "name": dest.name}
    event = audit.INSTANCES_TRANSFERRED
    if isinstance(dest, FolderDestination):
        event, where["path"] = audit.EXPORT, str(dest.path)
    elif isinstance(dest, DicomWebDestination):
        where["url"] = dest.url
    else:
        where |= {"ae_title": dest.ae_title, "address": f"{dest.host}:{dest.port}"}
    audit.record(
        event,
        action="R",
        outcome=outcome,
        participants=[where],
        objects=[{"StudyInstanceUID": study_instance_uid, "files": files}],
        detail=detail,
    )


def _stage(files: Sequence[Path], outbox: Path) -> list[Path]:
    outbox.mkdir(parents=True)
    staged = []
    for i, f in enumerate(files):
        target = outbox / f"{i:05d}_{f.name}"
        try:
            os.link(f, target)
        except OSError:
            shutil.copyfile(f, target)
        staged.append(target)
    return staged


def _keep_pending(
    staged: list[Path], pending: Sequence[Path] | None, sent: Path | None = None
) -> list[Path]:
    """Take what was delivered out of the outbox, so that neither a retry nor the dead
    letter sends it twice (into ``sent`` when a storage commitment must still cover it);
    returns what is left."""
    if pending is None:
        return staged
    keep = set(pending)
    for f in staged:
        if f not in keep:
            if sent is None:
                f.unlink(missing_ok=True)
            elif f.exists():
                sent.mkdir(exist_ok=True)
                f.replace(sent / f.name)
    return [f for f in staged if f in keep]


def _pending_files(outbox: Path) -> list[Path]:
    """The files of an outbox still to deliver (not those awaiting commitment)."""
    return sorted(f for f in outbox.glob("*") if f.is_file())


class Exporter:
    """Delivers files to destinations with retries, dead-lettering what cannot be delivered.

    Args:
        config: the ``export`` configuration section.
        catalog: where dead letters are recorded.
        outbox_root: folder for staged deliveries (on the spool's filesystem).
        calling_ae_title: our AE title towards DICOM destinations.
        sleep: how to wait between attempts (tests pass a fake clock).
    """

    def __init__(
        self,
        config: ExportConfig,
        catalog: Catalog,
        outbox_root: Path,
        calling_ae_title: str,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.outbox_root = Path(outbox_root)
        self.calling_ae_title = calling_ae_title
        self._sleep = sleep

    def export(
        self,
        files: Sequence[Path],
        *,
        study_instance_uid: str = "",
        destinations: Sequence[str] | None = None,
    ) -> list[ExportResult]:
        """Deliver ``files`` to each destination (default: all configured ones).

        Never raises for delivery failures: each failure ends in a dead-letter record, named
        in the returned results. Raises KeyError for an unknown destination name.
        """
        names = (
            destinations if destinations is not None else [d.name for d in self.config.destinations]
        )
        targets = [self.config.destination(n) for n in names]
        results = []
        for dest in targets:
            outbox = self.outbox_root / f"{dest.name}-{uuid.uuid4().hex}"
            staged = _stage(files, outbox)
            results.append(self._attempt(dest, staged, outbox, study_instance_uid))
        return results

    def _attempt(
        self,
        dest: DicomDestination | DicomWebDestination | FolderDestination,
        staged: list[Path],
        outbox: Path,
        study_instance_uid: str,
        policy: RetryPolicy | None = None,
    ) -> ExportResult:
        policy = policy or self.config.retry
        delays = [*policy.delays(), None]
        error = ""
        total = len(staged)
        attempt = 0
        commit = _commitment_of(dest)
        for attempt, delay in enumerate(delays, start=1):
            try:
                transaction = self._deliver(dest, staged, outbox, study_instance_uid)
            except DeliveryError as err:
                error = str(err)
                staged = _keep_pending(staged, err.pending, outbox / _SENT if commit else None)
                log.warning(
                    "delivery to %s failed (attempt %d/%d%s): %s",
                    dest.name,
                    attempt,
                    policy.attempts,
                    "" if err.retryable else ", not retryable",
                    error,
                )
                if not err.retryable:
                    break
                if delay is not None:
                    self._sleep(delay)
                continue
            _audit_delivery(dest, study_instance_uid, total, 0, "")
            log.info(
                "delivered %d file(s) of %s to %s%s",
                total,
                uid_tag(study_instance_uid) if study_instance_uid else "-",
                dest.name,
                f"; storage commitment {uid_tag(transaction)} requested" if transaction else "",
            )
            return ExportResult(dest.name, True, attempt, commitment=transaction)
        # With storage commitment, delivered files wait in .sent: they are in the letter too.
        files = len(staged) + (len(list((outbox / _SENT).glob("*"))) if commit else 0)
        dl = self.catalog.add_dead_letter(
            kind="export",
            destination=dest.name,
            outbox=outbox,
            files=files,
            study_instance_uid=study_instance_uid,
            error=error,
            attempts=attempt,
        )
        log.error("delivery to %s dead-lettered as #%d: %s", dest.name, dl, error)
        _audit_delivery(dest, study_instance_uid, files, 8, f"dead letter #{dl}: {error}")
        return ExportResult(dest.name, False, attempt, error, dl)

    def _deliver(
        self,
        dest: DicomDestination | DicomWebDestination | FolderDestination,
        staged: list[Path],
        outbox: Path,
        study_instance_uid: str,
    ) -> str:
        """Deliver ``staged`` (the outbox's pending files) once; then, when ``dest`` wants
        storage commitment, ask for it over everything delivered from ``outbox``. Returns
        the commitment's Transaction UID ("" without one). The outbox is gone once nothing
        more needs it.

        Raises:
            DeliveryError: as :func:`deliver` (what was delivered is no longer pending).
        """
        if staged:
            deliver(dest, staged, self.calling_ae_title)
        commit = _commitment_of(dest)
        if commit is None:
            shutil.rmtree(outbox, ignore_errors=True)
            return ""
        assert isinstance(dest, DicomDestination)  # only DICOM peers commit
        sent = outbox / _SENT
        _keep_pending(staged, (), sent)
        # Everything is delivered now: whatever fails from here on, nothing is to be sent
        # again (pending=()); the request is what a retry repeats.
        transaction = generate_uid()
        try:
            instances: dict[str, tuple[str, str]] = {}
            for f in sorted(sent.glob("*")):
                ds = pydicom.dcmread(
                    f, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
                )
                instances[str(ds.SOPInstanceUID)] = (str(ds.SOPClassUID), f.name)
            self.catalog.add_commitment(
                transaction_uid=transaction,
                destination=dest.name,
                ae_title=dest.ae_title,
                outbox=outbox,
                study_instance_uid=study_instance_uid,
                instances=instances,
                deadline=time.time() + commit.wait_s,
            )
        except (OSError, sqlite3.Error, pydicom.errors.InvalidDicomError) as err:
            raise DeliveryError(
                f"{dest.name}: storage commitment not requested: {type(err).__name__}: {err}",
                pending=(),
            ) from None
        try:
            request_commitment(
                dest,
                {uid: sop_class for uid, (sop_class, _) in instances.items()},
                transaction,
                self.calling_ae_title,
                self.catalog,
            )
        except DeliveryError as err:
            self.catalog.drop_commitment(transaction)
            raise DeliveryError(str(err), pending=(), retryable=err.retryable) from None
        return transaction

    def retry_dead_letter(self, dead_letter_id: int) -> ExportResult:
        """Re-send a dead letter once (no backoff loop); resolves it on success (for a
        destination with storage commitment: once the commitment is asked for again).

        Raises:
            KeyError: no such dead letter, it is already resolved, or its destination is no
                longer configured.
        """
        dl = self.catalog.dead_letter(dead_letter_id)
        if dl is None:
            raise KeyError(f"no dead letter #{dead_letter_id}")
        if dl.resolved is not None:
            raise KeyError(f"dead letter #{dead_letter_id} was already delivered")
        dest = self.config.destination(dl.destination)
        staged = _pending_files(dl.outbox)
        try:
            transaction = self._deliver(dest, staged, dl.outbox, dl.StudyInstanceUID)
        except DeliveryError as err:
            _keep_pending(staged, err.pending, dl.outbox / _SENT if _commitment_of(dest) else None)
            self.catalog.update_dead_letter(dead_letter_id, resolved=False, error=str(err))
            return ExportResult(dest.name, False, 1, str(err), dead_letter_id)
        self.catalog.update_dead_letter(dead_letter_id, resolved=True)
        return ExportResult(dest.name, True, 1, "", dead_letter_id, commitment=transaction)

    # -- storage commitment -----------------------------------------------------------------

    def settle_commitments(self, now: float | None = None) -> int:
        """Act on the storage commitment reports the node recorded, and on requests whose
        wait ended without one: committed files are deleted, the others dead-lettered
        (moved back to be sent again on retry). Returns how many were settled."""
        due = self.catalog.commitments_to_settle(now)
        for commitment in due:
            self._settle(commitment)
        return len(due)

    def _settle(self, c: Commitment) -> None:
        tag = uid_tag(c.TransactionUID)
        if c.state is CommitmentState.REQUESTED:
            failed = dict.fromkeys(c.instances, 0)
            waited = round(c.deadline - c.requested, 3)  # two clock reads: 1.99999 is 2
            why = (
                f"storage commitment {tag}: no report from {c.ae_title} within {waited:g} s "
                f"({len(failed)} instance(s) not known to be committed)"
            )
        else:
            failed = dict(c.failed)
            why = f"storage commitment {tag} by {c.ae_title}: " + describe_failures(
                failed, len(c.instances)
            )
        if failed:
            detail = why
        else:
            detail = f"storage commitment {tag}: {len(c.instances)} instance(s) committed"
        # Settled (with its dead letter) before any file moves: a report recorded meanwhile
        # wins, and a crash after this leaves files in the outbox, never a second letter.
        settled, dead_letter = self.catalog.settle_commitment(
            c.TransactionUID,
            expected=c.state,
            detail=detail,
            dead_letter_error=why if failed else None,
            dead_letter_files=len(failed),
        )
        if not settled:
            return
        sent = c.outbox / _SENT
        for uid, (_, name) in c.instances.items():
            f = sent / name
            if uid in failed:
                if f.exists():
                    f.replace(c.outbox / name)
            else:
                f.unlink(missing_ok=True)
        if failed:
            log.error("%s; dead-lettered as #%d", why, dead_letter)
            detail = f"dead letter #{dead_letter}: {why}"
        else:
            shutil.rmtree(c.outbox, ignore_errors=True)
            log.info("%s by %s", detail, c.ae_title)
        audit.record(
            audit.INSTANCES_TRANSFERRED,
            action="R",
            outcome=8 if failed else 0,
            participants=[{"role": "destination", "name": c.destination, "ae_title": c.ae_title}],
            objects=[{"StudyInstanceUID": c.StudyInstanceUID, "files": len(c.instances)}],
            detail=detail,
        )


def _commitment_of(
    dest: DicomDestination | DicomWebDestination | FolderDestination,
) -> StorageCommitment | None:
    return dest.storage_commitment if isinstance(dest, DicomDestination) else None
