from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from radfusion.apps import registry
from radfusion.config import parse_config
from radfusion.errors import Unavailable
from radfusion.integrations.store.catalog import InstanceRecord
from radfusion.service import Service


class _Boom:
    name = "boom"

    def __init__(self, config: Any) -> None:
        pass

    def run(self, study: Any, work_dir: Path) -> registry.AppResult:
        raise RuntimeError("model server unavailable")


class _Unavailable(Unavailable):
    pass


class _Flaky(_Boom):
    name = "flaky"

    def run(self, study: Any, work_dir: Path) -> registry.AppResult:
        raise _Unavailable("FHIR server down")


def _service(tmp_path: Path, **extra: Any) -> Service:
    return Service(
        parse_config(
            {
                "spool": {"path": str(tmp_path / "spool"), "min_free_mb": 1, "retention_days": 1},
                "export": {
                    "destinations": [{"name": "f", "type": "folder", "path": str(tmp_path / "out")}]
                },
                **extra,
            }
        )
    )


def _record(service: Service, sop: str = "1.2.3.4.1") -> None:
    f = service.spool.path_for("1.2.3", "1.2.3.4", sop)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"not read by this test")
    service.catalog.record_instance(
        InstanceRecord(
            sop,
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3.4",
            "1.2.3",
            "1.2.840.10008.1.2.1",
            f,
            21,
            1,
            "CT_1",
            attributes={"Modality": "CT"},
        ),
        quiet_period_s=0,
        late_arrival="rerun",
    )


def test_failed_job_becomes_a_dead_letter_and_retry_requeues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry._APPS, "boom", f"{__name__}:_Boom")
    service = _service(tmp_path)
    _record(service)
    [job] = service.catalog.hand_on("1.2.3", lambda series: ["boom"]) or []
    claimed = service.catalog.claim_job(["boom"])
    assert claimed is not None
    assert service.run_job(claimed) is False
    [letter] = service.catalog.dead_letters()
    assert (letter.kind, letter.job_id) == ("job", job.id)
    assert "model server unavailable" in letter.error
    assert service.catalog.study("1.2.3").state == "failed"
    service.catalog.requeue_job(job.id)
    assert service.catalog.study("1.2.3").state == "routed"
    assert service.catalog.claim_job(["boom"]).attempts == 1  # by hand: a fresh count


def test_a_transient_failure_is_queued_again_later_then_dead_lettered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry._APPS, "flaky", f"{__name__}:_Flaky")
    service = _service(tmp_path, jobs={"retry": {"attempts": 3, "initial_backoff_s": 30}})
    _record(service)
    [job] = service.catalog.hand_on("1.2.3", lambda series: ["flaky"]) or []
    clock = [time.time()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    for attempt, wait in ((1, 30), (2, 60)):
        claimed = service.catalog.claim_job(["flaky"])
        assert claimed is not None and claimed.attempts == attempt
        assert service.run_job(claimed) is False
        assert service.catalog.dead_letters() == []
        study = service.catalog.study("1.2.3")
        assert study.state == "routed" and f"retry in {wait} s" in study.detail
        assert service.catalog.claim_job(["flaky"]) is None  # not due yet
        clock[0] += wait + 1
    claimed = service.catalog.claim_job(["flaky"])
    assert claimed is not None and claimed.attempts == 3
    assert service.run_job(claimed) is False
    [letter] = service.catalog.dead_letters()
    assert (letter.job_id, letter.attempts) == (job.id, 3) and "FHIR server down" in letter.error
    assert service.catalog.study("1.2.3").state == "failed"


def test_retention_purges_finished_studies_only(tmp_path: Path) -> None:
    service = _service(tmp_path)
    _record(service)
    [job] = service.catalog.hand_on("1.2.3", lambda series: ["forward"]) or []
    assert service.purge_expired(now=time.time() + 2 * 86400) == 0  # routed: still working
    service.catalog.claim_job()
    service.catalog.finish_job(job.id, ok=True)
    assert service.purge_expired(now=time.time()) == 0  # done, but within retention
    assert service.purge_expired(now=time.time() + 2 * 86400) == 1
    assert service.catalog.study("1.2.3") is None
    assert list(service.spool.files()) == []


def test_orphan_spool_file_is_adopted_on_recovery(tmp_path: Path, ct_study: Any) -> None:
    import shutil

    service = _service(tmp_path)
    src = ct_study.files[0]
    target = service.spool.path_for(ct_study.StudyInstanceUID, ct_study.SeriesInstanceUID, "x")
    target.parent.mkdir(parents=True)
    shutil.copyfile(src, target)  # renamed into the spool, then the process died
    service.recover()
    row = service.catalog.study(ct_study.StudyInstanceUID)
    assert row is not None and row.instances == 1 and row.state == "receiving"
