"""The radfusion service: DICOM node → spool → study assembly → apps → export, in one process.

``Service`` wires the pieces together and owns their threads. Start-up recovers from a crash:
orphan spool files are adopted, unfinished studies get a fresh quiet period and are handed on
once, and jobs interrupted mid-run are queued again.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from pathlib import Path

import pydicom

from radfusion import __version__, audit
from radfusion.apps.registry import App, StudyInput, get_app, known_apps
from radfusion.assembler import StudyAssembler
from radfusion.config import RadfusionConfig
from radfusion.errors import Unavailable
from radfusion.integrations.dicom.export import Exporter
from radfusion.integrations.dicom.header import HeaderError, read_part10_header
from radfusion.integrations.dicom.node import DicomNode
from radfusion.integrations.dicom.spool import Spool
from radfusion.integrations.store.catalog import Catalog, InstanceRecord, Job
from radfusion.logs import RepeatedFailure, uid_tag

__all__ = ["Service", "open_catalog", "open_exporter"]

log = logging.getLogger("radfusion.service")


def open_catalog(config: RadfusionConfig) -> Catalog:
    return Catalog(config.spool.path / "catalog.sqlite", durable=config.spool.fsync)


def open_exporter(config: RadfusionConfig, catalog: Catalog) -> Exporter:
    return Exporter(config.export, catalog, config.spool.path / "outbox", config.node.ae_title)


class Service:
    """Everything ``radfusion serve`` runs.

    Args:
        config: the validated configuration.
        run_jobs: run routed jobs in this process (False: only receive and route, e.g. when
            apps run elsewhere or in a test of the node alone).
    """

    def __init__(self, config: RadfusionConfig, *, run_jobs: bool = True) -> None:
        self.config = config
        config.spool.path.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(
            config.spool.path,
            fsync=config.spool.fsync,
            min_free_bytes=config.spool.min_free_mb * 1024 * 1024,
        )
        self.catalog = open_catalog(config)
        self.exporter = open_exporter(config, self.catalog)
        self.node = DicomNode(config, self.catalog, self.spool)
        self.assembler = StudyAssembler(self.catalog, config.routing.rules)
        self.run_jobs = run_jobs
        self._apps: dict[str, App] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> int:
        """Recover, then start receiving; returns the DICOM port."""
        self._audit_start()
        self.recover()
        port = self.node.start()
        self.assembler.start()
        targets = [self._housekeeping, self._commitments]
        if self.run_jobs:
            targets.append(self._work)
        for target in targets:
            t = threading.Thread(target=target, name=target.__name__.strip("_"), daemon=True)
            t.start()
            self._threads.append(t)
        return port

    def _audit_start(self) -> None:
        trail = audit.open_trail(self.config.spool.path / "audit.jsonl", self.config.node.ae_title)
        digest = hashlib.sha256(self.config.model_dump_json().encode()).hexdigest()
        previous = trail.last(audit.APPLICATION_ACTIVITY, audit.APPLICATION_START)
        trail.record(
            audit.APPLICATION_ACTIVITY,
            type=audit.APPLICATION_START,
            detail=f"radfusion {__version__}, configuration sha256 {digest}",
        )
        if previous is not None and digest not in str(previous.get("detail", "")):
            trail.record(
                audit.SECURITY_ALERT,
                type=audit.SOFTWARE_CONFIGURATION,
                action="U",
                detail=f"configuration changed since the last start (now sha256 {digest})",
            )

    def stop(self) -> None:
        audit.record(audit.APPLICATION_ACTIVITY, type=audit.APPLICATION_STOP)
        self._stop.set()
        self.node.stop()
        self.assembler.stop()
        for t in self._threads:
            t.join(timeout=30)
        for app in self._apps.values():
            close = getattr(app, "close", None)
            if close is not None:
                close()

    def run_forever(self) -> None:
        """Start and block until stop() (e.g. from a signal handler)."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> None:
        """Make the catalog consistent with the spool after an unclean stop."""
        known = self.catalog.instance_paths()
        adopted = 0
        for path in self.spool.files():
            if str(path) in known:
                continue
            if self._adopt(path):
                adopted += 1
        reopened = self.catalog.restart_quiet_periods(
            self.config.quiet_period_for, self.config.completion.after_restart_s
        )
        requeued = self.catalog.requeue_interrupted_jobs()
        log.info(
            "recovery: %d orphan instance(s) adopted, %d study(ies) awaiting completion, "
            "%d job(s) re-queued",
            adopted,
            reopened,
            requeued,
        )

    def _adopt(self, path: Path) -> bool:
        # A file renamed into the spool whose catalog insert never ran (crash in between).
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            meta = ds.file_meta
            transfer_syntax = str(meta.TransferSyntaxUID)
            head = read_part10_header(path, transfer_syntax)
            rec = InstanceRecord.from_header(
                head,
                SOPInstanceUID=str(ds.SOPInstanceUID),
                SOPClassUID=str(ds.SOPClassUID),
                TransferSyntaxUID=transfer_syntax,
                path=path,
                size=path.stat().st_size,
                calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip(),
            )
        except (OSError, HeaderError, pydicom.errors.InvalidDicomError, AttributeError) as err:
            log.warning("spool file %s cannot be adopted: %s", path.name, err)
            return False
        self.catalog.record_instance(
            rec,
            quiet_period_s=self.config.quiet_period_for(rec.calling_ae),
            late_arrival=self.config.completion.late_arrival,
        )
        return True

    # -- jobs -------------------------------------------------------------------------------

    def _work(self) -> None:
        apps = sorted(known_apps())
        failures = RepeatedFailure(log, "reading the job queue", wait_s=0.25)
        while not self._stop.is_set():
            try:
                job = self.catalog.claim_job(apps)
            except Exception as err:
                self._stop.wait(failures.failed(err))
                continue
            failures.succeeded()
            if job is None:
                self._stop.wait(0.25)
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> bool:
        """Run one claimed job and export its results; returns True on success."""
        tag = uid_tag(job.StudyInstanceUID)
        work_dir = self.config.spool.path / "work" / f"job-{job.id}"
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        started = time.monotonic()
        try:
            rows = self.catalog.instances_of(job.StudyInstanceUID)
            record = self.catalog.study(job.StudyInstanceUID)
            if record is None:  # a job is queued for a cataloged study only
                raise LookupError(f"study {tag} is not in the catalog")
            study = StudyInput(
                job.StudyInstanceUID, tuple(Path(r["path"]) for r in rows), record.calling_ae
            )
            if job.app not in self._apps:  # one instance per app: models load once
                self._apps[job.app] = get_app(job.app, self.config)
            outcome = self._apps[job.app].run(study, work_dir)
            results = self.exporter.export(
                list(outcome.files), study_instance_uid=job.StudyInstanceUID
            )
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            delays = self.config.jobs.retry.delays()
            if isinstance(err, Unavailable) and job.attempts <= len(delays):
                delay = delays[job.attempts - 1]
                log.warning(
                    "job %d (%s) on study %s failed (attempt %d of %d), again in %g s: %s",
                    job.id, job.app, tag, job.attempts, len(delays) + 1, delay, error,
                )  # fmt: skip
                self.catalog.retry_job_later(job.id, delay_s=delay, error=error)
                return False
            log.error("job %d (%s) on study %s failed: %s", job.id, job.app, tag, error)
            self.catalog.finish_job(job.id, ok=False, error=error)
            self.catalog.add_dead_letter(
                kind="job",
                job_id=job.id,
                study_instance_uid=job.StudyInstanceUID,
                error=error,
                attempts=job.attempts,
            )
            return False
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        failed = [r for r in results if not r.delivered]
        error = "; ".join(f"{r.destination}: dead letter #{r.dead_letter_id}" for r in failed)
        self.catalog.finish_job(job.id, ok=not failed, error=error, note="; ".join(outcome.notes))
        log.info(
            "job %d (%s) on study %s %s in %.1f s",
            job.id,
            job.app,
            tag,
            "failed" if failed else "done",
            time.monotonic() - started,
        )
        return not failed

    # -- storage commitment -----------------------------------------------------------------

    def _commitments(self) -> None:
        failures = RepeatedFailure(log, "settling storage commitments", wait_s=1)
        while not self._stop.wait(1):
            try:
                self.exporter.settle_commitments()
            except Exception as err:
                self._stop.wait(failures.failed(err))
            else:
                failures.succeeded()

    # -- retention --------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        purge_failures = RepeatedFailure(log, "retention purge", wait_s=60)
        while not self._stop.wait(60):
            try:
                self.purge_expired()
            except Exception as err:
                purge_failures.failed(err)
            else:
                purge_failures.succeeded()

    def purge_expired(self, now: float | None = None) -> int:
        """Delete finished and unrouted studies older than the retention period."""
        now = time.time() if now is None else now
        cutoff = now - self.config.spool.retention_days * 86400
        expired = self.catalog.expired_studies(cutoff)
        for uid in expired:
            self.spool.remove(self.catalog.forget_study(uid))
            log.info("study %s purged after retention period", uid_tag(uid))
        return len(expired)
