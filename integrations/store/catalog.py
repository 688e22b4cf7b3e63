"""The catalog: a SQLite (WAL) record of every received instance, series, study and job.

It is the single source of truth for study state. State changes that must happen together
(an instance and its study's timer; a study's completion and its jobs) happen in one
transaction, which is what makes hand-off exactly-once across crashes.

Study states::

    receiving ──quiet period──▶ routed (jobs created) ──▶ done | failed
              └──no rule matched──▶ unrouted
    routed/done/failed/unrouted ──late instance, policy 'rerun'──▶ receiving (generation + 1)
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from radfusion.routing import SERIES_ATTRIBUTES, SeriesFacts

if TYPE_CHECKING:
    from radfusion.integrations.dicom.header import WireHeader

__all__ = [
    "Catalog",
    "Commitment",
    "CommitmentState",
    "DeadLetter",
    "InstanceRecord",
    "Job",
    "JobState",
    "StoreOutcome",
    "StudyRow",
    "StudyState",
]

# Keywords are the standard's (letters only): safe to put in SQL as column names.
_ATTRIBUTE_COLUMNS = ", ".join(SERIES_ATTRIBUTES)
_ATTRIBUTE_SLOTS = ",".join("?" * len(SERIES_ATTRIBUTES))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    StudyInstanceUID TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    calling_ae TEXT NOT NULL,
    PatientID TEXT NOT NULL DEFAULT '',
    IssuerOfPatientID TEXT NOT NULL DEFAULT '',
    StudyDate TEXT NOT NULL DEFAULT '',
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    quiet_until REAL NOT NULL,
    handed_on_at REAL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state, quiet_until);
CREATE TABLE IF NOT EXISTS series (
    SeriesInstanceUID TEXT PRIMARY KEY,
    StudyInstanceUID TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    images INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_study ON series(StudyInstanceUID);
CREATE TABLE IF NOT EXISTS instances (
    SOPInstanceUID TEXT PRIMARY KEY,
    SOPClassUID TEXT NOT NULL,
    SeriesInstanceUID TEXT NOT NULL,
    StudyInstanceUID TEXT NOT NULL,
    TransferSyntaxUID TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(StudyInstanceUID);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    StudyInstanceUID TEXT NOT NULL,
    generation INTEGER NOT NULL,
    app TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    not_before REAL NOT NULL DEFAULT 0,
    UNIQUE (StudyInstanceUID, generation, app)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE TABLE IF NOT EXISTS deadletter (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    job_id INTEGER,
    destination TEXT NOT NULL,
    outbox TEXT NOT NULL,
    files INTEGER NOT NULL,
    StudyInstanceUID TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    resolved REAL
);
CREATE TABLE IF NOT EXISTS commitments (
    TransactionUID TEXT PRIMARY KEY,
    destination TEXT NOT NULL,
    ae_title TEXT NOT NULL,
    outbox TEXT NOT NULL,
    StudyInstanceUID TEXT NOT NULL DEFAULT '',
    instances TEXT NOT NULL,
    requested REAL NOT NULL,
    deadline REAL NOT NULL,
    state TEXT NOT NULL,
    failed TEXT NOT NULL DEFAULT '{}',
    reported REAL,
    settled REAL,
    dead_letter_id INTEGER
);
CREATE INDEX IF NOT EXISTS commitments_state ON commitments(state, deadline);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    StudyInstanceUID TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_study ON events(StudyInstanceUID);
"""


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    ROUTED = "routed"
    UNROUTED = "unrouted"
    DONE = "done"
    FAILED = "failed"


class JobState(enum.StrEnum):
    """A job's state, stored as its text in the catalog."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # its study was reopened by late arrivals before it ran


class CommitmentState(enum.StrEnum):
    """A storage commitment request's state, stored as its text in the catalog."""

    REQUESTED = "requested"  # N-ACTION sent; the report is awaited
    REPORTED = "reported"  # the peer's N-EVENT-REPORT is recorded; not yet acted on
    SETTLED = "settled"  # committed files deleted, the rest dead-lettered


_HANDED_ON = (StudyState.ROUTED, StudyState.UNROUTED, StudyState.DONE, StudyState.FAILED)


class StoreOutcome(enum.Enum):
    """What recording an instance did."""

    NEW = "new"
    DUPLICATE = "duplicate"
    REOPENED = "reopened"  # late arrival, study reopened (policy 'rerun')
    LATE_IGNORED = "late-ignored"  # late arrival, study left as it was (policy 'ignore')


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as the node read it off the wire."""

    SOPInstanceUID: str
    SOPClassUID: str
    SeriesInstanceUID: str
    StudyInstanceUID: str
    TransferSyntaxUID: str
    path: Path
    size: int
    frames: int
    calling_ae: str
    PatientID: str = ""
    IssuerOfPatientID: str = ""
    StudyDate: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)  # SERIES_ATTRIBUTES' values

    @classmethod
    def from_header(
        cls,
        header: WireHeader,
        *,
        SOPInstanceUID: str,
        SOPClassUID: str,
        TransferSyntaxUID: str,
        path: Path,
        size: int,
        calling_ae: str,
    ) -> InstanceRecord:
        """The record of an instance whose header the node read (on receipt or, after a
        crash, from the spool), stored at ``path``."""
        return cls(
            SOPInstanceUID=SOPInstanceUID,
            SOPClassUID=SOPClassUID,
            SeriesInstanceUID=header.SeriesInstanceUID,
            StudyInstanceUID=header.StudyInstanceUID,
            TransferSyntaxUID=TransferSyntaxUID,
            path=path,
            size=size,
            frames=header.frames,
            calling_ae=calling_ae,
            PatientID=header.PatientID,
            IssuerOfPatientID=header.IssuerOfPatientID,
            StudyDate=header.StudyDate,
            attributes=header.attributes,
        )


@dataclass(frozen=True)
class StudyRow:
    StudyInstanceUID: str
    state: StudyState
    generation: int
    calling_ae: str
    instances: int
    series: int
    first_received: float
    last_received: float
    handed_on_at: float | None
    detail: str
    apps: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    id: int
    StudyInstanceUID: str
    generation: int
    app: str
    state: JobState
    attempts: int
    error: str


@dataclass(frozen=True)
class DeadLetter:
    """Work that failed after its retries: an undelivered export or a failed job."""

    id: int
    kind: str  # "export" (retry re-sends the outbox) or "job" (retry re-queues the job)
    job_id: int | None
    destination: str
    outbox: Path
    files: int
    StudyInstanceUID: str
    error: str
    attempts: int
    created: float
    resolved: float | None


@dataclass(frozen=True)
class Commitment:
    """A storage commitment request: what was asked of whom, and what the peer reported.

    ``instances`` maps each SOP Instance UID asked about to its SOP Class UID and its file's
    name in ``outbox``; ``failed`` maps those the peer did not commit to the Failure Reason it
    gave (PS3.3 C.14.1.1; 0 when it did not mention them).
    """

    TransactionUID: str
    destination: str
    ae_title: str  # the peer that must report
    outbox: Path
    StudyInstanceUID: str
    instances: Mapping[str, tuple[str, str]]
    requested: float
    deadline: float
    state: CommitmentState
    failed: Mapping[str, int]
    dead_letter_id: int | None


class Catalog:
    """Thread-safe access to the catalog database at ``path``.

    Each thread gets its own connection; writers serialise through SQLite's lock
    (``BEGIN IMMEDIATE``), so no state change interleaves with another.
    """

    def __init__(self, path: Path, *, durable: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._durable = durable
        self._local = threading.local()
        db = self._connection()
        db.executescript(_SCHEMA)
        self.path.chmod(0o600)  # Patient IDs: the catalog is for radfusion's user only
        # Catalogs made before jobs could wait for a retry lack the column (checked again in
        # the transaction: another process may be opening the same catalog).
        with self._tx() as tx:
            if "not_before" not in {r["name"] for r in tx.execute("PRAGMA table_info(jobs)")}:
                tx.execute("ALTER TABLE jobs ADD COLUMN not_before REAL NOT NULL DEFAULT 0")
            # One column per routing attribute, added when the table gains one (catalogs
            # made before keep their rows; the new attribute reads as empty there).
            have = {r["name"] for r in tx.execute("PRAGMA table_info(series)")}
            for keyword in SERIES_ATTRIBUTES:
                if keyword not in have:
                    tx.execute(f"ALTER TABLE series ADD COLUMN {keyword} TEXT NOT NULL DEFAULT ''")

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL survives a killed process (WAL is in the page cache); FULL also survives
            # power loss and goes with the spool's fsync mode.
            db.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
            db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- instances --------------------------------------------------------------------------

    def seen_again(self, sop_instance_uid: str, *, quiet_period_s: float) -> str | None:
        """The Study Instance UID of the instance when it is stored already (a duplicate),
        else None. A duplicate is the sender
        at work (resending a study after a broken association), so it restarts the quiet
        period of its study if the study is still arriving: completing it mid-resend would
        hand on half a study and re-run it when the rest arrives."""
        db = self._connection()
        row = db.execute(
            "SELECT StudyInstanceUID FROM instances WHERE SOPInstanceUID=?", (sop_instance_uid,)
        ).fetchone()
        if row is None:
            return None
        with self._tx() as tx:
            tx.execute(
                "UPDATE studies SET quiet_until=MAX(quiet_until, ?) "
                "WHERE StudyInstanceUID=? AND state=?",
                (time.time() + quiet_period_s, row[0], StudyState.RECEIVING),
            )
        return str(row[0])

    def instance_paths(self) -> set[str]:
        return {r[0] for r in self._connection().execute("SELECT path FROM instances")}

    def record_instance(
        self, rec: InstanceRecord, *, quiet_period_s: float, late_arrival: str
    ) -> StoreOutcome:
        """Record a spooled instance and restart its study's quiet period.

        Must be called after the file is in place; the caller acknowledges the C-STORE only
        after this returns.
        """
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    rec.SOPInstanceUID,
                    rec.SOPClassUID,
                    rec.SeriesInstanceUID,
                    rec.StudyInstanceUID,
                    rec.TransferSyntaxUID,
                    str(rec.path),
                    rec.size,
                    rec.frames,
                    now,
                ),
            )
            if cur.rowcount == 0:
                return StoreOutcome.DUPLICATE
            db.execute(
                f"INSERT INTO series (SeriesInstanceUID, StudyInstanceUID, calling_ae, images, "
                f"{_ATTRIBUTE_COLUMNS}) VALUES (?,?,?,?,{_ATTRIBUTE_SLOTS}) "
                "ON CONFLICT(SeriesInstanceUID) DO UPDATE SET images = images + excluded.images",
                (
                    rec.SeriesInstanceUID,
                    rec.StudyInstanceUID,
                    rec.calling_ae,
                    rec.frames,
                    *(rec.attributes.get(k, "") for k in SERIES_ATTRIBUTES),
                ),
            )
            study = db.execute(
                "SELECT state, generation FROM studies WHERE StudyInstanceUID=?",
                (rec.StudyInstanceUID,),
            ).fetchone()
            outcome = StoreOutcome.NEW
            if study is None:
                db.execute(
                    "INSERT INTO studies (StudyInstanceUID, state, calling_ae, PatientID, "
                    "IssuerOfPatientID, StudyDate, instances, first_received, last_received, "
                    "quiet_until) VALUES (?,?,?,?,?,?,1,?,?,?)",
                    (
                        rec.StudyInstanceUID,
                        StudyState.RECEIVING,
                        rec.calling_ae,
                        rec.PatientID,
                        rec.IssuerOfPatientID,
                        rec.StudyDate,
                        now,
                        now,
                        now + quiet_period_s,
                    ),
                )
                self._event(db, rec.StudyInstanceUID, "receiving", f"from {rec.calling_ae}")
                return outcome
            state = StudyState(study["state"])
            generation = study["generation"]
            if state in _HANDED_ON:
                if late_arrival == "rerun":
                    outcome = StoreOutcome.REOPENED
                    state, generation = StudyState.RECEIVING, generation + 1
                    self._event(db, rec.StudyInstanceUID, "reopened", f"generation {generation}")
                else:
                    outcome = StoreOutcome.LATE_IGNORED
                    self._event(db, rec.StudyInstanceUID, "late-ignored", rec.SOPInstanceUID)
            db.execute(
                "UPDATE studies SET state=?, generation=?, instances=instances+1, "
                "last_received=?, quiet_until=MAX(quiet_until, ?) WHERE StudyInstanceUID=?",
                (state, generation, now, now + quiet_period_s, rec.StudyInstanceUID),
            )
            return outcome

    def instances_of(self, study_instance_uid: str) -> list[sqlite3.Row]:
        return (
            self._connection()
            .execute(
                "SELECT * FROM instances WHERE StudyInstanceUID=? ORDER BY SeriesInstanceUID, path",
                (study_instance_uid,),
            )
            .fetchall()
        )

    def series_facts(self, study_instance_uid: str) -> list[SeriesFacts]:
        db = self._connection()
        facts = []
        for s in db.execute(
            "SELECT * FROM series WHERE StudyInstanceUID=?", (study_instance_uid,)
        ).fetchall():
            classes = frozenset(
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT SOPClassUID FROM instances WHERE SeriesInstanceUID=?",
                    (s["SeriesInstanceUID"],),
                )
            )
            facts.append(
                SeriesFacts(
                    {k: s[k] for k in SERIES_ATTRIBUTES},
                    CallingAETitle=s["calling_ae"],
                    SOPClassUIDs=classes,
                    slices=s["images"],
                )
            )
        return facts

    # -- study completion -------------------------------------------------------------------

    def restart_quiet_periods(
        self, quiet_period_for: Callable[[str], float], at_least_s: float = 0.0
    ) -> int:
        """After a restart, give every unfinished study a fresh quiet period, at least
        ``at_least_s`` long.

        Senders interrupted by the outage need time to reconnect and resume; completing their
        studies at once would hand on half a study and then re-run it. Returns the count.
        """
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT StudyInstanceUID, calling_ae FROM studies WHERE state=?",
                (StudyState.RECEIVING,),
            ).fetchall()
            for r in rows:
                db.execute(
                    "UPDATE studies SET quiet_until=? WHERE StudyInstanceUID=?",
                    (
                        now + max(quiet_period_for(r["calling_ae"]), at_least_s),
                        r["StudyInstanceUID"],
                    ),
                )
        return len(rows)

    def due_studies(self, now: float | None = None) -> list[str]:
        """Studies whose quiet period has passed, oldest first."""
        now = time.time() if now is None else now
        return [
            r[0]
            for r in self._connection().execute(
                "SELECT StudyInstanceUID FROM studies WHERE state=? AND quiet_until<=? "
                "ORDER BY quiet_until",
                (StudyState.RECEIVING, now),
            )
        ]

    def hand_on(
        self, study_instance_uid: str, route: Callable[[list[SeriesFacts]], list[str]]
    ) -> list[Job] | None:
        """Complete a due study: route it and create its jobs, atomically.

        ``route`` maps the study's series to app names. Returns the jobs created (empty when no
        rule matched: the study becomes 'unrouted'), or None when the study is not due any more
        (an instance arrived in the meantime) — so each completion hands on exactly once.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT generation FROM studies WHERE StudyInstanceUID=? AND state=? "
                "AND quiet_until<=?",
                (study_instance_uid, StudyState.RECEIVING, now),
            ).fetchone()
            if row is None:
                return None
            generation = row["generation"]
            apps = route(self.series_facts(study_instance_uid))
            state = StudyState.ROUTED if apps else StudyState.UNROUTED
            db.execute(
                "UPDATE studies SET state=?, handed_on_at=?, detail=? WHERE StudyInstanceUID=?",
                (state, now, "" if apps else "no routing rule matched", study_instance_uid),
            )
            jobs = []
            for app in apps:
                cur = db.execute(
                    "INSERT INTO jobs (StudyInstanceUID, generation, app, state, created, "
                    "updated) VALUES (?,?,?,?,?,?)",
                    (study_instance_uid, generation, app, JobState.QUEUED, now, now),
                )
                jobs.append(
                    Job(
                        cur.lastrowid or 0,
                        study_instance_uid,
                        generation,
                        app,
                        JobState.QUEUED,
                        0,
                        "",
                    )
                )
            self._event(db, study_instance_uid, state.value, ",".join(apps))
            return jobs

    # -- jobs -------------------------------------------------------------------------------

    def requeue_interrupted_jobs(self) -> int:
        """Jobs left 'running' by a crash go back to the queue."""
        with self._tx() as db:
            return db.execute(
                "UPDATE jobs SET state=?, updated=? WHERE state=?",
                (JobState.QUEUED, time.time(), JobState.RUNNING),
            ).rowcount

    def claim_job(self, apps: Sequence[str] | None = None) -> Job | None:
        """Take the oldest queued job that is due (for one of ``apps``, if given) and mark it
        running."""
        with self._tx() as db:
            # A job of an earlier generation (the study was reopened by late arrivals while it
            # waited) would process a study that is no longer the one it was made for.
            db.execute(
                "UPDATE jobs SET state=?, updated=? WHERE state=? AND "
                "generation < (SELECT generation FROM studies s WHERE "
                "s.StudyInstanceUID=jobs.StudyInstanceUID)",
                (JobState.SUPERSEDED, time.time(), JobState.QUEUED),
            )
            query = "SELECT * FROM jobs WHERE state=? AND not_before <= ?"
            args: list[object] = [JobState.QUEUED, time.time()]
            if apps is not None:
                query += f" AND app IN ({','.join('?' * len(apps))})"
                args.extend(apps)
            row = db.execute(query + " ORDER BY id LIMIT 1", args).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state=?, attempts=attempts+1, updated=? WHERE id=?",
                (JobState.RUNNING, time.time(), row["id"]),
            )
            return Job(
                row["id"],
                row["StudyInstanceUID"],
                row["generation"],
                row["app"],
                JobState.RUNNING,
                row["attempts"] + 1,
                "",
            )

    def finish_job(self, job_id: int, *, ok: bool, error: str = "", note: str = "") -> None:
        """Record a job's end; the study is done when all its current jobs are.

        ``note``: what the app said of the study (no PHI); with ``error``, the study's detail.
        """
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, error=?, updated=? WHERE id=?",
                (JobState.DONE if ok else JobState.FAILED, error, now, job_id),
            )
            job = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            uid, generation = job["StudyInstanceUID"], job["generation"]
            states = [
                r[0]
                for r in db.execute(
                    "SELECT state FROM jobs WHERE StudyInstanceUID=? AND generation=?",
                    (uid, generation),
                )
            ]
            detail = "; ".join(part for part in (error, note) if part)
            self._event(db, uid, f"job-{'done' if ok else 'failed'}", f"{job['app']} {detail}")
            if all(s in (JobState.DONE, JobState.FAILED) for s in states):
                done = all(s == JobState.DONE for s in states)
                final = StudyState.DONE if done else StudyState.FAILED
                db.execute(
                    "UPDATE studies SET state=?, detail=? WHERE StudyInstanceUID=? AND "
                    "generation=? AND state=?",
                    (final, detail, uid, generation, StudyState.ROUTED),
                )

    def retry_job_later(self, job_id: int, *, delay_s: float, error: str) -> None:
        """Queue a running job again, to be claimed no sooner than ``delay_s`` from now (a
        server it needs was unavailable); the study stays 'routed' and its detail says why."""
        self._queue_again(job_id, delay_s=delay_s, error=error)

    def requeue_job(self, job_id: int) -> None:
        """Put a failed job back in the queue (its study returns to 'routed'), with a fresh
        count of attempts: retried by hand, it gets the whole ``jobs.retry`` policy again."""
        self._queue_again(job_id)

    def _queue_again(self, job_id: int, *, delay_s: float = 0, error: str = "") -> None:
        now = time.time()
        with self._tx() as db:
            job = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if job is None:
                raise KeyError(f"no job #{job_id}")
            db.execute(
                "UPDATE jobs SET state=?, error=?, not_before=?, updated=?, attempts=? WHERE id=?",
                (
                    JobState.QUEUED,
                    error,
                    now + delay_s if delay_s else 0,
                    now,
                    job["attempts"] if error else 0,
                    job_id,
                ),
            )
            if error:
                event = "job-retry-scheduled"
                attempt = job["attempts"]
                detail = f"{job['app']}: attempt {attempt} failed, retry in {delay_s:g} s: {error}"
            else:
                event, detail = "job-requeued", ""
            db.execute(
                "UPDATE studies SET state=?, detail=? WHERE StudyInstanceUID=? AND generation=?",
                (StudyState.ROUTED, detail, job["StudyInstanceUID"], job["generation"]),
            )
            self._event(db, job["StudyInstanceUID"], event, detail or job["app"])

    def jobs_of(self, study_instance_uid: str) -> list[Job]:
        return [
            Job(
                r["id"],
                r["StudyInstanceUID"],
                r["generation"],
                r["app"],
                JobState(r["state"]),
                r["attempts"],
                r["error"],
            )
            for r in self._connection().execute(
                "SELECT * FROM jobs WHERE StudyInstanceUID=? ORDER BY id", (study_instance_uid,)
            )
        ]

    # -- studies ----------------------------------------------------------------------------

    def study(self, study_instance_uid: str) -> StudyRow | None:
        rows = self._studies("WHERE s.StudyInstanceUID=?", (study_instance_uid,))
        return rows[0] if rows else None

    def recent_studies(self, limit: int = 50) -> list[StudyRow]:
        return self._studies("ORDER BY s.last_received DESC LIMIT ?", (limit,))

    def _studies(self, tail: str, args: tuple[object, ...]) -> list[StudyRow]:
        db = self._connection()
        out = []
        for r in db.execute(
            "SELECT s.*, (SELECT COUNT(*) FROM series WHERE StudyInstanceUID=s.StudyInstanceUID)"
            f" AS nseries FROM studies s {tail}",
            args,
        ).fetchall():
            apps = tuple(
                a[0]
                for a in db.execute(
                    "SELECT app FROM jobs WHERE StudyInstanceUID=? AND generation=? ORDER BY id",
                    (r["StudyInstanceUID"], r["generation"]),
                )
            )
            out.append(
                StudyRow(
                    r["StudyInstanceUID"],
                    StudyState(r["state"]),
                    r["generation"],
                    r["calling_ae"],
                    r["instances"],
                    r["nseries"],
                    r["first_received"],
                    r["last_received"],
                    r["handed_on_at"],
                    r["detail"],
                    apps,
                )
            )
        return out

    def expired_studies(self, older_than: float) -> list[str]:
        """Finished or unrouted studies last touched before ``older_than`` (epoch seconds)."""
        return [
            r[0]
            for r in self._connection().execute(
                "SELECT StudyInstanceUID FROM studies WHERE state IN (?,?,?) AND "
                "last_received < ? AND (handed_on_at IS NULL OR handed_on_at < ?)",
                (StudyState.DONE, StudyState.UNROUTED, StudyState.FAILED, older_than, older_than),
            )
        ]

    def forget_study(self, study_instance_uid: str) -> list[str]:
        """Remove a study's rows; returns the instance paths so the caller can delete them."""
        with self._tx() as db:
            paths = [
                r[0]
                for r in db.execute(
                    "SELECT path FROM instances WHERE StudyInstanceUID=?", (study_instance_uid,)
                )
            ]
            for table in ("instances", "series", "studies"):
                db.execute(f"DELETE FROM {table} WHERE StudyInstanceUID=?", (study_instance_uid,))
            self._event(db, study_instance_uid, "purged", f"{len(paths)} instances")
            return paths

    def events_of(self, study_instance_uid: str) -> list[tuple[str, str]]:
        return [
            (r[0], r[1])
            for r in self._connection().execute(
                "SELECT event, detail FROM events WHERE StudyInstanceUID=? ORDER BY id",
                (study_instance_uid,),
            )
        ]

    # -- dead letters -----------------------------------------------------------------------

    def add_dead_letter(
        self,
        *,
        kind: str,
        study_instance_uid: str,
        error: str,
        attempts: int,
        destination: str = "",
        outbox: Path | None = None,
        files: int = 0,
        job_id: int | None = None,
    ) -> int:
        with self._tx() as db:
            return self._insert_dead_letter(
                db, kind, job_id, destination, outbox, files, study_instance_uid, error, attempts
            )

    def _insert_dead_letter(
        self,
        db: sqlite3.Connection,
        kind: str,
        job_id: int | None,
        destination: str,
        outbox: Path | str | None,
        files: int,
        study_instance_uid: str,
        error: str,
        attempts: int,
    ) -> int:
        now = time.time()
        cur = db.execute(
            "INSERT INTO deadletter (kind, job_id, destination, outbox, files, "
            "StudyInstanceUID, error, attempts, created, updated) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                kind,
                job_id,
                destination,
                str(outbox or ""),
                files,
                study_instance_uid,
                error,
                attempts,
                now,
                now,
            ),
        )
        if study_instance_uid:
            self._event(db, study_instance_uid, "dead-letter", f"{destination}: {error}")
        return cur.lastrowid or 0

    def dead_letters(self, *, include_resolved: bool = False) -> list[DeadLetter]:
        where = "" if include_resolved else "WHERE resolved IS NULL"
        return [
            self._dead_letter(r)
            for r in self._connection().execute(f"SELECT * FROM deadletter {where} ORDER BY id")
        ]

    def dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        r = (
            self._connection()
            .execute("SELECT * FROM deadletter WHERE id=?", (dead_letter_id,))
            .fetchone()
        )
        return None if r is None else self._dead_letter(r)

    def update_dead_letter(self, dead_letter_id: int, *, resolved: bool, error: str = "") -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE deadletter SET attempts=attempts+1, updated=?, resolved=?, "
                "error=CASE WHEN ?='' THEN error ELSE ? END WHERE id=?",
                (now, now if resolved else None, error, error, dead_letter_id),
            )

    @staticmethod
    def _dead_letter(r: sqlite3.Row) -> DeadLetter:
        return DeadLetter(
            r["id"],
            r["kind"],
            r["job_id"],
            r["destination"],
            Path(r["outbox"]),
            r["files"],
            r["StudyInstanceUID"],
            r["error"],
            r["attempts"],
            r["created"],
            r["resolved"],
        )

    # -- storage commitment ----------------------------------------------------------------

    def add_commitment(
        self,
        *,
        transaction_uid: str,
        destination: str,
        ae_title: str,
        outbox: Path,
        study_instance_uid: str,
        instances: Mapping[str, tuple[str, str]],
        deadline: float,
    ) -> None:
        """Record a storage commitment request before it is sent, so that however early the
        report comes, and after a crash, it finds its request."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO commitments (TransactionUID, destination, ae_title, outbox, "
                "StudyInstanceUID, instances, requested, deadline, state) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    transaction_uid,
                    destination,
                    ae_title,
                    str(outbox),
                    study_instance_uid,
                    json.dumps({k: list(v) for k, v in instances.items()}),
                    now,
                    deadline,
                    CommitmentState.REQUESTED,
                ),
            )

    def drop_commitment(self, transaction_uid: str) -> None:
        """Forget a request that was never sent (its N-ACTION failed)."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM commitments WHERE TransactionUID=? AND state=?",
                (transaction_uid, CommitmentState.REQUESTED),
            )

    def record_commitment_report(
        self,
        transaction_uid: str,
        *,
        reported_by: str,
        committed: Sequence[str],
        failed: Mapping[str, int],
    ) -> str:
        """Record a peer's report: the instances it ``committed`` and those it ``failed``
        with their Failure Reason. An instance asked about and in neither list counts as not
        committed (reason 0); an instance not asked about is ignored.

        Returns "recorded", "again" (this transaction was already reported: nothing
        changed), "unknown" (no such request) or "wrong peer" (``reported_by`` is not the
        AE title the request went to).
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT ae_title, state, instances FROM commitments WHERE TransactionUID=?",
                (transaction_uid,),
            ).fetchone()
            if row is None:
                return "unknown"
            if row["ae_title"] != reported_by:
                return "wrong peer"
            if row["state"] != CommitmentState.REQUESTED:
                return "again"
            asked = json.loads(row["instances"])
            done = set(committed) - set(failed)
            not_committed = {
                uid: int(failed.get(uid, 0)) for uid in asked if uid not in done or uid in failed
            }
            db.execute(
                "UPDATE commitments SET state=?, failed=?, reported=? WHERE TransactionUID=?",
                (
                    CommitmentState.REPORTED,
                    json.dumps(not_committed),
                    time.time(),
                    transaction_uid,
                ),
            )
            return "recorded"

    def commitments_to_settle(self, now: float | None = None) -> list[Commitment]:
        """Requests with a report to act on, and those whose wait ended without one."""
        now = time.time() if now is None else now
        return [
            self._commitment(r)
            for r in self._connection().execute(
                "SELECT * FROM commitments WHERE state=? OR (state=? AND deadline<?) "
                "ORDER BY requested",
                (CommitmentState.REPORTED, CommitmentState.REQUESTED, now),
            )
        ]

    def commitment(self, transaction_uid: str) -> Commitment | None:
        r = (
            self._connection()
            .execute("SELECT * FROM commitments WHERE TransactionUID=?", (transaction_uid,))
            .fetchone()
        )
        return None if r is None else self._commitment(r)

    def commitments(self) -> list[Commitment]:
        """Every request not yet settled, oldest first."""
        return [
            self._commitment(r)
            for r in self._connection().execute(
                "SELECT * FROM commitments WHERE state!=? ORDER BY requested",
                (CommitmentState.SETTLED,),
            )
        ]

    def settle_commitment(
        self,
        transaction_uid: str,
        *,
        expected: CommitmentState,
        detail: str,
        dead_letter_error: str | None = None,
        dead_letter_files: int = 0,
    ) -> tuple[bool, int | None]:
        """Mark a request settled, in one transaction with its dead letter when
        ``dead_letter_error`` is given, if it is still in the state ``expected`` (a report
        recorded meanwhile, or another settler, wins: nothing changes). Returns whether it
        was settled here and the dead letter's id."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT state, destination, outbox, StudyInstanceUID FROM commitments "
                "WHERE TransactionUID=?",
                (transaction_uid,),
            ).fetchone()
            if row is None or row["state"] != expected:
                return False, None
            dead_letter = None
            if dead_letter_error is not None:
                dead_letter = self._insert_dead_letter(
                    db,
                    "export",
                    None,
                    row["destination"],
                    row["outbox"],
                    dead_letter_files,
                    row["StudyInstanceUID"],
                    dead_letter_error,
                    1,
                )
            db.execute(
                "UPDATE commitments SET state=?, settled=?, dead_letter_id=? "
                "WHERE TransactionUID=?",
                (CommitmentState.SETTLED, now, dead_letter, transaction_uid),
            )
            if row["StudyInstanceUID"]:
                self._event(db, row["StudyInstanceUID"], "storage-commitment", detail)
            return True, dead_letter

    @staticmethod
    def _commitment(r: sqlite3.Row) -> Commitment:
        return Commitment(
            r["TransactionUID"],
            r["destination"],
            r["ae_title"],
            Path(r["outbox"]),
            r["StudyInstanceUID"],
            {k: (v[0], v[1]) for k, v in json.loads(r["instances"]).items()},
            r["requested"],
            r["deadline"],
            CommitmentState(r["state"]),
            {k: int(v) for k, v in json.loads(r["failed"]).items()},
            r["dead_letter_id"],
        )

    @staticmethod
    def _event(db: sqlite3.Connection, uid: str, event: str, detail: str = "") -> None:
        db.execute(
            "INSERT INTO events (time, StudyInstanceUID, event, detail) VALUES (?,?,?,?)",
            (time.time(), uid, event, detail),
        )
