"""Log lines a peer cannot forge, and loops whose failures do not flood the log."""

from __future__ import annotations

import errno
import logging
import sqlite3

import pytest

from radfusion.logs import RepeatedFailure, configure_logging, escape_controls


def test_control_characters_are_escaped() -> None:
    assert escape_controls("A\nB\rC\tD\x1b[31m\x85E é") == "A\\nB\\rC\\tD\\x1b[31m\\x85E é"


def test_a_logged_message_stays_on_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    logging.getLogger("radfusion.test").warning("calling %s", "X\n2026-01-01 INFO forged")
    logging.getLogger("pynetdicom.dul").error("peer sent %s", "Y\r\nforged too")
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("calling X\\n2026-01-01 INFO forged")
    assert lines[1].endswith("peer sent Y\\r\\nforged too")


def test_pynetdicom_tracebacks_become_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    try:
        raise AttributeError("'Dataset' object has no attribute 'CommandField'")
    except AttributeError as err:
        logging.getLogger("pynetdicom.fsm").exception(err)
        logging.getLogger("radfusion.test").exception("ours")
    err_text = capfd.readouterr().err
    first, rest = err_text.split("\n", 1)
    assert first.endswith("(AttributeError: 'Dataset' object has no attribute 'CommandField')")
    assert rest.count("Traceback") == 1  # radfusion's own keeps its traceback


def test_repeated_failure_logs_once_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("radfusion.test")
    failures = RepeatedFailure(log, "study assembly", wait_s=0.25, max_wait_s=30)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    with caplog.at_level(logging.INFO, logger="radfusion.test"):
        waits = [failures.failed(full) for _ in range(12)]
        failures.failed(OSError(errno.ENOSPC, "No space left on device"))
        failures.succeeded()
    assert waits[0] == 0.5 and waits[1] == 1.0 and waits[-1] == 30
    messages = [r.getMessage() for r in caplog.records]
    assert (
        messages[0] == "study assembly failed: OperationalError: database or disk is full; retrying"
    )
    assert len(messages) == 3, messages  # the first, the changed error, the recovery
    assert "13 failures so far" in messages[1]
    assert messages[2] == "study assembly works again after 13 failure(s)"
    assert all(r.exc_info is None for r in caplog.records)  # resource errors: no traceback
