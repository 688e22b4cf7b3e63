from __future__ import annotations

import time
from pathlib import Path

from radfusion.integrations.store.catalog import (
    Catalog,
    CommitmentState,
    InstanceRecord,
    StoreOutcome,
)


def rec(
    sop: str, study: str = "1.2.3", series: str = "1.2.3.1", modality: str = "CT"
) -> InstanceRecord:
    return InstanceRecord(
        SOPInstanceUID=sop,
        SOPClassUID="1.2.840.10008.5.1.4.1.1.2",
        SeriesInstanceUID=series,
        StudyInstanceUID=study,
        TransferSyntaxUID="1.2.840.10008.1.2.1",
        path=Path(f"/s/{sop}"),
        size=10,
        frames=1,
        calling_ae="CT_1",
        attributes={"Modality": modality},
    )


def route_ct(series: list) -> list[str]:
    return ["forward"] if any(s.values("Modality") == ("CT",) for s in series) else []


def test_duplicate_instance_counts_once(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    assert cat.record_instance(rec("1"), quiet_period_s=0, late_arrival="rerun") is (
        StoreOutcome.NEW
    )
    assert cat.record_instance(rec("1"), quiet_period_s=0, late_arrival="rerun") is (
        StoreOutcome.DUPLICATE
    )
    study = cat.study("1.2.3")
    assert study is not None and study.instances == 1
    assert cat.series_facts("1.2.3")[0].slices == 1


def test_hand_on_is_exactly_once_and_respects_quiet_period(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    cat.record_instance(rec("1"), quiet_period_s=60, late_arrival="rerun")
    assert cat.due_studies() == []
    assert cat.hand_on("1.2.3", route_ct) is None  # not due yet
    assert cat.due_studies(now=time.time() + 61) == ["1.2.3"]
    cat2 = Catalog(tmp_path / "d.sqlite")
    cat2.record_instance(rec("1"), quiet_period_s=0, late_arrival="rerun")
    jobs = cat2.hand_on("1.2.3", route_ct)
    assert jobs is not None and [j.app for j in jobs] == ["forward"]
    assert cat2.hand_on("1.2.3", route_ct) is None  # a second completer finds nothing to do
    assert cat2.study("1.2.3").state == "routed"


def test_late_arrival_rerun_and_ignore(tmp_path: Path) -> None:
    for policy, outcome, generation in (
        ("rerun", StoreOutcome.REOPENED, 2),
        ("ignore", StoreOutcome.LATE_IGNORED, 1),
    ):
        cat = Catalog(tmp_path / f"{policy}.sqlite")
        cat.record_instance(rec("1"), quiet_period_s=0, late_arrival=policy)
        [job] = cat.hand_on("1.2.3", route_ct) or []
        cat.claim_job()
        cat.finish_job(job.id, ok=True)
        assert cat.study("1.2.3").state == "done"
        assert cat.record_instance(rec("2"), quiet_period_s=0, late_arrival=policy) is outcome
        study = cat.study("1.2.3")
        assert study.generation == generation
        assert study.state == ("receiving" if policy == "rerun" else "done")


def test_unrouted_and_job_failure_and_requeue(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    cat.record_instance(
        rec("1", study="9", series="9.1", modality="MR"), quiet_period_s=0, late_arrival="rerun"
    )
    assert cat.hand_on("9", route_ct) == []
    assert cat.study("9").state == "unrouted"
    cat.record_instance(rec("2"), quiet_period_s=0, late_arrival="rerun")
    [job] = cat.hand_on("1.2.3", route_ct) or []
    claimed = cat.claim_job(["forward"])
    assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
    assert cat.claim_job() is None
    cat.finish_job(job.id, ok=False, error="boom")
    assert cat.study("1.2.3").state == "failed"
    cat.requeue_job(job.id)
    assert cat.study("1.2.3").state == "routed"
    assert cat.claim_job().attempts == 1  # by hand: a fresh count


def test_interrupted_jobs_are_requeued(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    cat.record_instance(rec("1"), quiet_period_s=0, late_arrival="rerun")
    cat.hand_on("1.2.3", route_ct)
    cat.claim_job()
    assert cat.claim_job() is None
    assert Catalog(tmp_path / "c.sqlite").requeue_interrupted_jobs() == 1
    assert cat.claim_job() is not None


def test_dead_letters(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    dl = cat.add_dead_letter(
        kind="export",
        destination="pacs",
        outbox=tmp_path,
        files=2,
        study_instance_uid="1.2.3",
        error="down",
        attempts=5,
    )
    [letter] = cat.dead_letters()
    assert (letter.id, letter.destination, letter.files, letter.attempts) == (dl, "pacs", 2, 5)
    cat.update_dead_letter(dl, resolved=False, error="still down")
    assert cat.dead_letter(dl).error == "still down" and cat.dead_letter(dl).attempts == 6
    cat.update_dead_letter(dl, resolved=True)
    assert cat.dead_letters() == [] and len(cat.dead_letters(include_resolved=True)) == 1


def test_an_apps_note_becomes_the_studys_detail(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    cat.record_instance(rec("1"), quiet_period_s=0, late_arrival="rerun")
    [job] = cat.hand_on("1.2.3", route_ct) or []
    cat.claim_job()
    cat.finish_job(job.id, ok=True, note="clinical data unavailable")
    study = cat.study("1.2.3")
    assert (study.state, study.detail) == ("done", "clinical data unavailable")
    assert ("job-done", "forward clinical data unavailable") in cat.events_of("1.2.3")


def test_a_catalog_from_before_job_retries_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    Catalog(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN not_before")
    db.commit()
    db.close()
    cat = Catalog(path)
    cat.record_instance(rec("1"), quiet_period_s=0, late_arrival="rerun")
    [job] = cat.hand_on("1.2.3", route_ct) or []
    assert cat.claim_job() is not None
    cat.retry_job_later(job.id, delay_s=3600, error="TritonUnavailable: down")
    assert cat.claim_job() is None  # not due for an hour
    cat.requeue_job(job.id)  # by hand: due at once
    assert cat.claim_job() is not None


def test_a_catalog_from_before_a_routing_attribute_gains_its_column(tmp_path: Path) -> None:
    """A catalog whose series table predates StationName keeps its rows; the attribute reads
    as empty for them and is recorded for new series."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    cat = Catalog(path)
    cat.record_instance(rec("1"), quiet_period_s=3600, late_arrival="rerun")
    cat.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE series DROP COLUMN StationName")
    db.commit()
    db.close()
    cat = Catalog(path)
    station = InstanceRecord(
        **{**rec("2", series="1.2.3.2").__dict__, "attributes": {"StationName": "CT01"}}
    )
    cat.record_instance(station, quiet_period_s=3600, late_arrival="rerun")
    facts = sorted(cat.series_facts("1.2.3"), key=lambda f: f.values("StationName"))
    assert [f.values("StationName") for f in facts] == [("",), ("CT01",)]
    assert facts[0].values("Modality") == ("CT",)


def test_a_waiting_job_of_a_reopened_study_is_superseded(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    cat.record_instance(rec("1"), quiet_period_s=0, late_arrival="rerun")
    [job] = cat.hand_on("1.2.3", route_ct) or []
    cat.claim_job()
    cat.retry_job_later(job.id, delay_s=0, error="TritonUnavailable: down")
    # A late instance reopens the study (generation 2) before the retry runs.
    assert cat.record_instance(rec("2"), quiet_period_s=0, late_arrival="rerun") is (
        StoreOutcome.REOPENED
    )
    assert cat.claim_job() is None  # the generation-1 job does not run on the new study
    assert [j.state for j in cat.jobs_of("1.2.3")] == ["superseded"]
    [new] = cat.hand_on("1.2.3", route_ct) or []
    claimed = cat.claim_job()
    assert claimed is not None and claimed.id == new.id and claimed.generation == 2


def test_a_duplicate_keeps_its_arriving_study_open_but_not_a_finished_one(tmp_path: Path) -> None:
    """A sender resending a whole study after a broken association sends duplicates first:
    the study must not complete under it (it did, in benchmarks/load.py --faults, and was
    run again when the rest arrived)."""
    cat = Catalog(tmp_path / "c.sqlite")
    cat.record_instance(rec("1"), quiet_period_s=0, late_arrival="rerun")
    assert cat.due_studies() == ["1.2.3"]
    assert cat.seen_again("1", quiet_period_s=60) == "1.2.3"
    assert cat.due_studies() == []  # the resend restarted the quiet period
    assert cat.seen_again("2", quiet_period_s=60) is None  # not stored: a new instance
    cat.record_instance(rec("9", "7.7", "7.7.1"), quiet_period_s=0, late_arrival="rerun")
    assert cat.hand_on("7.7", route_ct) is not None
    assert cat.seen_again("9", quiet_period_s=60) == "7.7"
    assert cat.study("7.7").state == "routed"  # a finished study is not reopened by it


def test_after_a_restart_arriving_studies_wait_at_least_the_grace(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    cat.record_instance(rec("1"), quiet_period_s=0, late_arrival="rerun")
    assert cat.restart_quiet_periods(lambda ae: 2.0, at_least_s=30) == 1
    assert cat.due_studies(now=time.time() + 10) == []
    assert cat.due_studies(now=time.time() + 31) == ["1.2.3"]


def _asked(cat: Catalog, transaction: str = "9.1", deadline: float = 1e12) -> None:
    cat.add_commitment(
        transaction_uid=transaction,
        destination="pacs",
        ae_title="ORTHANC",
        outbox=Path("/outbox/pacs-1"),
        study_instance_uid="1.2.3",
        instances={"1.1": ("1.2.840.10008.5.1.4.1.1.66.4", "00000_seg.dcm"), "1.2": ("c", "f")},
        deadline=deadline,
    )


def test_a_commitment_report_is_recorded_once_and_only_from_the_peer_asked(
    tmp_path: Path,
) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    _asked(cat)
    report = {"committed": ["1.1"], "failed": {"1.2": 0x0112}}
    assert cat.record_commitment_report("9.9", reported_by="ORTHANC", **report) == "unknown"
    assert cat.record_commitment_report("9.1", reported_by="OTHER", **report) == "wrong peer"
    assert cat.commitments_to_settle() == []  # neither changed anything
    assert cat.record_commitment_report("9.1", reported_by="ORTHANC", **report) == "recorded"
    again = {"committed": ["1.1", "1.2"], "failed": {}}
    assert cat.record_commitment_report("9.1", reported_by="ORTHANC", **again) == "again"
    [due] = cat.commitments_to_settle()
    assert due.failed == {"1.2": 0x0112}  # the first report stands
    assert due.instances["1.1"] == ("1.2.840.10008.5.1.4.1.1.66.4", "00000_seg.dcm")
    requested = CommitmentState.REQUESTED  # as a settler that read it before the report
    assert cat.settle_commitment("9.1", expected=requested, detail="x") == (False, None)
    done, letter = cat.settle_commitment(
        "9.1",
        expected=CommitmentState.REPORTED,
        detail="1 of 2 not committed",
        dead_letter_error="1 of 2 not committed",
        dead_letter_files=1,
    )
    assert done and letter is not None
    again = cat.settle_commitment("9.1", expected=CommitmentState.REPORTED, detail="x")
    assert again == (False, None)  # a second settler changes nothing
    assert cat.commitments_to_settle() == [] and cat.commitments() == []
    settled = cat.commitment("9.1")
    assert settled is not None and settled.dead_letter_id == letter
    [dead] = cat.dead_letters()
    assert dead.id == letter and dead.files == 1 and dead.outbox == Path("/outbox/pacs-1")
    assert ("storage-commitment", "1 of 2 not committed") in cat.events_of("1.2.3")


def test_an_instance_the_report_leaves_out_is_not_committed(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    _asked(cat)
    # "1.2" in neither list; "7.7" was never asked about.
    cat.record_commitment_report("9.1", reported_by="ORTHANC", committed=["1.1", "7.7"], failed={})
    [due] = cat.commitments_to_settle()
    assert due.failed == {"1.2": 0}


def test_a_request_without_report_is_due_when_its_wait_ends(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    _asked(cat, deadline=time.time() + 100)
    assert cat.commitments_to_settle() == []
    [due] = cat.commitments_to_settle(now=time.time() + 101)
    assert due.state.value == "requested" and due.failed == {}
    cat.drop_commitment("9.1")  # as when its N-ACTION was refused
    assert cat.commitment("9.1") is None
