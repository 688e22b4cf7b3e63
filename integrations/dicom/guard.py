"""Limits on what one TCP connection can take from the node, before and while it associates.

A node on a hospital network accepts connections from anything that can reach its port. A
peer that connects and sends nothing, or half an A-ASSOCIATE-RQ, or announces a 4 GB PDU,
must not hold an association slot or memory for long. :class:`ConnectionGuard` enforces:

- a deadline from TCP connect to a complete A-ASSOCIATE-RQ (``acse_timeout_s``), however
  slowly the peer trickles bytes: pynetdicom stops waiting then, but its network thread would
  stay blocked in a read, holding the slot; the guard closes the connection under it;
- a socket timeout on every read (``network_timeout_s``), so no read blocks forever;
- a longest PDU (``maximum_pdu_size``, at least 256 KiB for association requests with many
  presentation contexts): a longer one is refused before it is read;
- at most ``max_associations_per_address`` open connections from one IP address, so one host
  cannot take every slot of ``max_associations``, and at most
  ``associations_per_minute_per_address`` new ones a minute;
- with DICOM TLS, the handshake in the connection's own thread, within the same deadline
  (pynetdicom would do it in its accept loop, where one stalled caller blocks all others).

It also deletes, within a second, the temporary file of any store whose connection ended
before the dataset was complete.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time

from pynetdicom.association import Association
from pynetdicom.events import Event

from radfusion import audit
from radfusion.config import NodeConfig
from radfusion.integrations.dicom.pynetdicom_internals import (
    close_connection,
    discard_orphaned,
    limit_pdu_length,
)
from radfusion.integrations.dicom.tls import handshake

__all__ = ["MIN_PDU_LIMIT", "ConnectionGuard"]

log = logging.getLogger("radfusion.node")

MIN_PDU_LIMIT = 256 * 1024  # an A-ASSOCIATE-RQ with 128 contexts and many syntaxes fits
_CHECK_EVERY_S = 0.25


def _closed(address: str, why: str, type: audit.Code = audit.RESTRICTED_FUNCTION) -> None:
    audit.record(
        audit.SECURITY_ALERT,
        type=type,
        outcome=4,
        participants=[{"role": "calling", "address": address}],
        detail=f"connection closed: {why}",
    )


class ConnectionGuard:
    """Enforces the node's per-connection limits; bind :meth:`on_connection_open` to
    ``EVT_CONN_OPEN`` and run :meth:`start`/:meth:`stop` with the server."""

    def __init__(self, node: NodeConfig) -> None:
        self.request_timeout_s = node.acse_timeout_s
        self.network_timeout_s = node.network_timeout_s
        self.pdu_limit = max(node.maximum_pdu_size, MIN_PDU_LIMIT)
        self.per_address = node.max_associations_per_address
        self.per_minute = node.associations_per_minute_per_address
        self._recent: dict[str, collections.deque[float]] = {}  # address -> connect times
        self._awaiting: dict[Association, float] = {}  # connection -> deadline for its request
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_connection_open(self, event: Event) -> None:
        assoc = event.assoc
        address = assoc.requestor.address
        raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if raw is not None:
            raw.settimeout(self.network_timeout_s)

        def refused(length: int) -> None:
            log.warning(
                "connection from %s closed: PDU of %d bytes announced, limit %d",
                address,
                length,
                self.pdu_limit,
            )
            _closed(address, f"PDU of {length} bytes announced, limit {self.pdu_limit}")

        limit_pdu_length(assoc, self.pdu_limit, refused)
        if not self._within_rate(address):
            log.warning(
                "connection from %s closed: more than %d connections in a minute",
                address,
                self.per_minute,
            )
            _closed(address, f"more than {self.per_minute} connections in a minute")
            close_connection(assoc)
            return
        others = sum(
            1
            for a in assoc.ae.active_associations
            if a is not assoc
            and a.requestor.address_info is not None
            and a.requestor.address == address
        )
        if others >= self.per_address:
            log.warning(
                "connection from %s closed: %d connections from it already open (limit %d)",
                address,
                others,
                self.per_address,
            )
            _closed(address, f"{others} connections already open (limit {self.per_address})")
            close_connection(assoc)
            return
        with self._lock:
            self._awaiting[assoc] = time.monotonic() + self.request_timeout_s
        if isinstance(raw, ssl.SSLSocket):
            try:
                peer = handshake(raw, self.request_timeout_s)
            except (ssl.SSLError, OSError) as err:
                reason = getattr(err, "reason", None) or type(err).__name__
                log.warning("connection from %s closed: TLS handshake failed (%s)", address, reason)
                _closed(address, f"TLS handshake failed ({reason})", audit.NODE_AUTHENTICATION)
                close_connection(assoc)
                return
            log.info("TLS connection from %s, certificate %r", address, peer or "(none)")

    def _within_rate(self, address: str) -> bool:
        """Count a connection from ``address``; False when it is over the per-minute limit."""
        now = time.monotonic()
        with self._lock:
            if len(self._recent) > 10_000:  # many addresses: forget the idle ones
                self._recent = {a: q for a, q in self._recent.items() if q and now - q[-1] < 60}
            recent = self._recent.setdefault(address, collections.deque())
            while recent and now - recent[0] > 60:
                recent.popleft()
            recent.append(now)
            return len(recent) <= self.per_minute

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="connection-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(_CHECK_EVERY_S):
            now = time.monotonic()
            expired = []
            with self._lock:
                for assoc, deadline in list(self._awaiting.items()):
                    sock = assoc.dul.socket
                    gone = sock is None or sock.socket is None
                    if assoc.requestor.primitive is not None or gone:
                        del self._awaiting[assoc]  # its request arrived, or it is gone
                    elif now > deadline:
                        del self._awaiting[assoc]
                        expired.append(assoc)
            for assoc in expired:
                log.warning(
                    "connection from %s closed: no complete A-ASSOCIATE-RQ within %g s",
                    assoc.requestor.address,
                    self.request_timeout_s,
                )
                _closed(
                    assoc.requestor.address,
                    f"no complete A-ASSOCIATE-RQ within {self.request_timeout_s:g} s",
                )
                close_connection(assoc)
            n = discard_orphaned()
            if n:
                log.warning("%d partly received instance(s) of closed connections deleted", n)
