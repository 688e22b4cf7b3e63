"""Logging without PHI.

radfusion never logs patient names, IDs or birth dates. UIDs are logged as short, stable
hashes (``uid_tag``) so that log lines about one study can be joined without revealing it;
``radfusion status`` shows the same tags.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import sys
import time

__all__ = ["RepeatedFailure", "configure_logging", "escape_controls", "uid_tag"]


def uid_tag(uid: str) -> str:
    """A short, stable, non-reversible tag for a UID, e.g. ``'u:3fa2c1d0'``."""
    return "u:" + hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:8]


# Control characters (C0, DEL, C1) written as escapes: a peer's AE title or a UID with a
# newline in it must not forge a log line of its own.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_ESCAPES |= {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (one line, printable)."""
    return text.translate(_ESCAPES)


class _OneLineFormatter(logging.Formatter):
    """Formats each record's message on one line with control characters escaped; only a
    traceback of radfusion's own code may add lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class _NoPeerTracebacks(logging.Filter):
    """pynetdicom logs a traceback for every malformed PDU or DIMSE message a peer sends;
    on a hostile network that is a log flood. Keep the one line, with the error's type."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom"):
            return True
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(err).__name__}: {err})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr with timestamps, one line per record, control characters escaped;
    pynetdicom's own chatter is kept at WARNING, without tracebacks.

    pynetdicom at INFO/DEBUG logs dataset contents (patient names and IDs), so it is never
    raised above WARNING here.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_NoPeerTracebacks())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-module copy chatter
    # httpx logs request URLs at INFO; FHIR search URLs carry patient identifiers.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _is_resource_error(err: BaseException) -> bool:
    if isinstance(err, sqlite3.OperationalError):
        return err.sqlite_errorcode in (
            sqlite3.SQLITE_FULL,
            sqlite3.SQLITE_IOERR,
            sqlite3.SQLITE_BUSY,
        )
    return isinstance(err, OSError)


class RepeatedFailure:
    """Logging and back-off for a loop that must outlive its failures (a full disk, a locked
    database): the first failure is logged, the same one again only once per ``every_s``
    with a count, and :meth:`failed` returns how long to wait before the next try, doubling
    up to ``max_wait_s``. Resource errors (OSError, a full or locked database) are logged as
    one line; anything else once with its traceback.

    Args:
        logger: where to log.
        what: what failed, e.g. ``"study assembly"``.
        wait_s: the first wait, and the wait once the loop succeeds again.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        wait_s: float,
        max_wait_s: float = 30.0,
        every_s: float = 60.0,
    ) -> None:
        self.logger = logger
        self.what = what
        self.wait_s = wait_s
        self.max_wait_s = max_wait_s
        self.every_s = every_s
        self._count = 0
        self._last_logged = 0.0
        self._last_kind = ""

    def failed(self, err: BaseException) -> float:
        """Record one failure; returns the seconds to wait before trying again."""
        self._count += 1
        kind = f"{type(err).__name__}: {err}"
        now = time.monotonic()
        if kind != self._last_kind or now - self._last_logged >= self.every_s:
            repeat = f" ({self._count} failures so far)" if self._count > 1 else ""
            if _is_resource_error(err):
                self.logger.error("%s failed: %s; retrying%s", self.what, kind, repeat)
            else:
                self.logger.exception("%s failed; retrying%s", self.what, repeat)
            self._last_kind, self._last_logged = kind, now
        return float(min(self.max_wait_s, self.wait_s * 2 ** min(self._count, 16)))

    def succeeded(self) -> None:
        """Record a success: logs the recovery after failures and resets the back-off."""
        if self._count:
            self.logger.info("%s works again after %d failure(s)", self.what, self._count)
        self._count = 0
        self._last_kind = ""
