"""Logging without PHI.

radfusion never logs patient names, IDs or birth dates. UIDs are logged as short, stable
hashes (``uid_tag``) so that log lines about one study can be joined without revealing it;
``radfusion status`` shows the same tags.
"""

from __future__ import annotations

import hashlib
import logging
import sys

__all__ = ["configure_logging", "uid_tag"]


def uid_tag(uid: str) -> str:
    """A short, stable, non-reversible tag for a UID, e.g. ``'u:3fa2c1d0'``."""
    return "u:" + hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:8]


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr with timestamps; pynetdicom's own chatter is kept at WARNING.

    pynetdicom at INFO/DEBUG logs dataset contents (patient names and IDs), so it is never
    raised above WARNING here.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-module copy chatter
    # httpx logs request URLs at INFO; FHIR search URLs carry patient identifiers.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
