"""The audit trail: security-relevant events as JSON lines, in the spirit of IHE ATNA and the
DICOM Audit Message (PS3.15 Annex A.5).

One line per event, appended to ``<spool>/audit.jsonl`` (mode 0600) and never rewritten::

    {"time": "2026-12-06T23:10:04.123456+00:00", "event": ["110114", "User Authentication"],
     "type": ["110122", "Login"], "action": "E", "outcome": 0, "node": "RADFUSION",
     "participants": [{"role": "calling", "ae_title": "CT_1", "address": "10.0.0.5"}],
     "objects": [], "detail": ""}

- ``event`` / ``type``: DICOM Controlled Terminology (DCM) codes and meanings, as in the audit
  message's EventID and EventTypeCode.
- ``action``: C create, R read, U update, D delete, E execute (EventActionCode).
- ``outcome``: 0 success, 4 minor failure, 8 serious failure, 12 major failure
  (EventOutcomeIndicator).
- ``participants``: the peers (AE title, address, TLS certificate name, URL).
- ``objects``: what the event was about: Study Instance UIDs with instance counts, the FHIR
  resource types queried. No patient names, IDs or birth dates: the study UID links an event to
  the PACS's own records.

Events recorded: the application starting and stopping (with the configuration's SHA-256, and a
Software Configuration alert when it differs from the last start's), associations accepted and
refused, connections closed by the node's limits or a failed TLS handshake, instances received
per association, results delivered or not per destination, and FHIR queries.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "APPLICATION_ACTIVITY",
    "EXPORT",
    "INSTANCES_TRANSFERRED",
    "QUERY",
    "SECURITY_ALERT",
    "USER_AUTHENTICATION",
    "AuditTrail",
    "open_trail",
    "record",
]

log = logging.getLogger("radfusion.audit")

Code = tuple[str, str]
APPLICATION_ACTIVITY: Code = ("110100", "Application Activity")
INSTANCES_TRANSFERRED: Code = ("110104", "DICOM Instances Transferred")
EXPORT: Code = ("110106", "Export")
QUERY: Code = ("110112", "Query")
SECURITY_ALERT: Code = ("110113", "Security Alert")
USER_AUTHENTICATION: Code = ("110114", "User Authentication")

APPLICATION_START: Code = ("110120", "Application Start")
APPLICATION_STOP: Code = ("110121", "Application Stop")
LOGIN: Code = ("110122", "Login")
NODE_AUTHENTICATION: Code = ("110126", "Node Authentication")
SOFTWARE_CONFIGURATION: Code = ("110131", "Software Configuration")
RESTRICTED_FUNCTION: Code = ("110132", "Use of Restricted Function")


class AuditTrail:
    """An append-only JSON-lines file of audit events; safe to use from any thread.

    Args:
        path: the file; created with mode 0600, appended to, never truncated.
        node: our AE title, written into every event.
    """

    def __init__(self, path: Path, node: str) -> None:
        self.path = Path(path)
        self.node = node
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.chmod(self.path, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        self._failed = False

    def record(
        self,
        event: Code,
        *,
        type: Code | None = None,
        action: str = "E",
        outcome: int = 0,
        participants: Sequence[Mapping[str, str]] = (),
        objects: Sequence[Mapping[str, Any]] = (),
        detail: str = "",
    ) -> None:
        """Append one event. A write that fails is logged once and never raised: auditing
        must not stop the node from receiving."""
        line = json.dumps(
            {
                "time": dt.datetime.now(dt.UTC).isoformat(),
                "event": list(event),
                "type": list(type) if type else None,
                "action": action,
                "outcome": outcome,
                "node": self.node,
                "participants": list(participants),
                "objects": list(objects),
                "detail": detail,
            },
            ensure_ascii=True,  # peer-controlled text arrives escaped, one line per event
        )
        with self._lock:
            try:
                self._file.write(line + "\n")
                self._file.flush()
                self._failed = False
            except OSError as err:
                if not self._failed:
                    log.error("audit trail %s cannot be written: %s", self.path, err.strerror)
                self._failed = True

    def last(self, event: Code, type: Code | None = None) -> dict[str, Any] | None:
        """The most recent event of this kind in the file (None if there is none)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        for text in reversed(lines):
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if entry.get("event") == list(event) and (
                type is None or entry.get("type") == list(type)
            ):
                return dict(entry)
        return None

    def close(self) -> None:
        with self._lock:
            self._file.close()


_trail: AuditTrail | None = None


def open_trail(path: Path, node: str) -> AuditTrail:
    """Open the process's audit trail; :func:`record` writes to it from then on."""
    global _trail
    if _trail is not None:
        _trail.close()
    _trail = AuditTrail(path, node)
    return _trail


def record(event: Code, **fields: Any) -> None:
    """Record an event in the process's audit trail (nothing before :func:`open_trail`:
    library use and unit tests run without one)."""
    if _trail is not None:
        _trail.record(event, **fields)
