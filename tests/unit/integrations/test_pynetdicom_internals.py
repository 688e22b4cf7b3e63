"""The pynetdicom internals the node relies on: still there, and missed when gone."""

from __future__ import annotations

import errno
import tempfile
import threading
from pathlib import Path

import pytest
from pynetdicom import _config

from radfusion.integrations.dicom import pynetdicom_internals


def test_the_internals_the_node_relies_on_are_still_there() -> None:
    """If this fails after a pynetdicom upgrade, see integrations/dicom/pynetdicom_internals.py:
    the node would still work, but hold each dataset in memory or poll 5x slower."""
    assert pynetdicom_internals.check() == []


def test_a_missing_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(_config, "STORE_RECV_CHUNKED_DATASET")
    assert pynetdicom_internals.check() == ["pynetdicom._config.STORE_RECV_CHUNKED_DATASET"]


def test_a_failed_write_is_kept_as_the_files_error_and_the_file_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    received = pynetdicom_internals.ReceivedFile(delete=False, mode="wb", suffix=".dcm")
    received.write(b"\0" * 132)
    received.file.flush()
    assert Path(received.name).stat().st_size == 132

    def full(data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(received._raw, "write", full)
    assert received.write(b"pixels") == 6  # swallowed: pynetdicom's thread must not see it
    received.write(b"more pixels")
    received.close()
    assert received.error is not None and received.error.errno == errno.ENOSPC
    assert not Path(received.name).exists()
    assert pynetdicom_internals.claim(received.name) is received
    assert pynetdicom_internals.claim(received.name) is None


def test_files_of_ended_threads_are_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made: list[pynetdicom_internals.ReceivedFile] = []
    thread = threading.Thread(target=lambda: made.append(pynetdicom_internals.ReceivedFile()))
    thread.start()
    thread.join()
    mine = pynetdicom_internals.ReceivedFile()  # this thread still runs: kept
    assert pynetdicom_internals.discard_orphaned() == 1
    assert not Path(made[0].name).exists()
    assert Path(mine.name).exists()
    assert pynetdicom_internals.claim(mine.name) is mine
    mine.close()
