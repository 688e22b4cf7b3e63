"""The places radfusion reaches into pynetdicom's private parts, and why.

pynetdicom has no public way to do these, and each is worth it on a hospital network:

- **Datasets received into files** (``_config.STORE_RECV_CHUNKED_DATASET``): pynetdicom writes
  each incoming dataset to a temporary file as its PDUs arrive instead of holding it in
  memory; the node renames that file into the spool, never copying the pixels in Python.
  ``pynetdicom._config`` is how pynetdicom's own documentation sets its options.
- **Received files that survive a full disk** (``NamedTemporaryFile`` inside
  ``pynetdicom.dimse_messages``): pynetdicom writes the temporary file from its network
  thread, where a write error (disk full) aborts the association. :class:`ReceivedFile`
  takes its place: it remembers the error, deletes what it wrote and swallows the rest of the
  dataset, so the handler can answer 0xA700 (Out of Resources) instead. It also knows which
  association is writing it, so the file of a store that never completes (aborted, peer gone)
  is deleted when the connection has closed instead of staying until a restart.
- **Datasets sent from files** (``_config.STORE_SEND_CHUNKED_DATASET``): export hands
  pynetdicom a file whose transfer syntax the receiver accepted, and pynetdicom sends its bytes
  as they are instead of decoding and re-encoding the dataset.
- **Polling that idles** (``time`` inside ``pynetdicom.association`` and ``pynetdicom.dul``):
  each association runs two threads that poll every 1 ms. A sender waits for each C-STORE
  response, so these sleeps cap ingest near 250 images/s on a 2-core machine; polling every
  0.2 ms lifts the cap by about half, but costs ~20 % of a core per open association. So
  the threads of an association poll every 0.2 ms while PDUs flow, and once nothing has
  arrived for :data:`IDLE_AFTER_S` they wait up to :data:`IDLE_POLL_S` for the socket (network
  thread) or the message queue (association thread) instead, waking at once when data comes.
- **DIMSE messages that do not decode** (``DIMSEServiceProvider.receive_primitive``): a
  command set without a Command Field raises inside pynetdicom's network thread, which dies
  with a traceback and leaves the association to time out. :func:`abort_undecodable_messages`
  turns that into what pynetdicom does for other invalid messages: an A-ABORT.
- **The PDU headers a peer sends** (``AssociationSocket.recv`` per connection): pynetdicom
  believes the 4-byte length of every PDU and reads until it has that many bytes, and after an
  unknown PDU type reads on, logging an error per 6 bytes of whatever follows;
  :func:`limit_pdu_length` refuses a PDU longer than the node's limit before reading it and
  closes the connection at the first header that is not a PDU.

:func:`check` says whether the pynetdicom installed still has all of them; the tests call it,
so an upgrade that removes one fails loudly there instead of silently slowing the node, filling
its memory or its disk.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import select
import socket
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path

import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dul
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA

__all__ = [
    "IDLE_AFTER_S",
    "IDLE_POLL_S",
    "POLL_S",
    "ReceivedFile",
    "abort_undecodable_messages",
    "check",
    "claim",
    "close_connection",
    "discard_orphaned",
    "limit_pdu_length",
    "on_connection_open",
    "receive_datasets_into_files",
    "send_datasets_from_files",
    "shorten_polling",
]

_log = logging.getLogger("radfusion.node")

POLL_S = 0.0002  # seconds between polls while PDUs flow, instead of pynetdicom's 1 ms
IDLE_AFTER_S = 0.5  # nothing received for this long: the association is idle
IDLE_POLL_S = 0.05  # longest wait of an idle association's threads between checks


def _idle_s(dul: DULServiceProvider) -> float:
    """Seconds since ``dul`` last received a PDU (its idle timer restarts on each)."""
    started = dul._idle_timer._start_time
    return 0.0 if started is None else time.time() - started


def _wait_for_socket(dul: DULServiceProvider, timeout: float) -> None:
    sock = dul.socket.socket if dul.socket is not None else None
    if sock is None or sock.fileno() < 0:
        time.sleep(timeout)
        return
    pending = getattr(sock, "pending", None)  # an SSLSocket may hold decrypted bytes
    if pending is not None and pending():
        return
    with contextlib.suppress(OSError, ValueError):  # closed under us: the reactor sees it
        select.select([sock], [], [], timeout)


def _wait_for_message(assoc: Association, timeout: float) -> None:
    waiting = assoc.dimse.msg_queue
    with waiting.not_empty:
        if not waiting._qsize():
            waiting.not_empty.wait(timeout)


class _IdlingTime(types.ModuleType):
    """Stands in for ``time`` inside pynetdicom's association and DUL modules: short sleeps
    while an association is busy, waits that end on new data while it is idle."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        # Only an acceptor: it sends only answers to what it received, so "nothing received
        # for a while" means idle. A requestor streaming a large dataset receives nothing
        # for seconds while it is busiest.
        if isinstance(thread, DULServiceProvider) and thread.assoc.is_acceptor:
            if _idle_s(thread) > IDLE_AFTER_S and not thread.to_provider_queue.qsize():
                _wait_for_socket(thread, IDLE_POLL_S)
                return
        elif (
            isinstance(thread, Association)
            and thread.is_acceptor
            and thread.is_established
            and _idle_s(thread.dul) > IDLE_AFTER_S
        ):
            _wait_for_message(thread, IDLE_POLL_S)
            return
        time.sleep(min(seconds, POLL_S))


def shorten_polling() -> None:
    """Make pynetdicom's association and network threads poll fast while busy and, for
    associations the process accepted, idle cheaply (for the whole process)."""
    for module in (pynetdicom.association, pynetdicom.dul):
        if not isinstance(getattr(module, "time", None), _IdlingTime):
            setattr(module, "time", _IdlingTime())  # noqa: B010 (mypy: modules have no `time`)


# -- received datasets ------------------------------------------------------------------------

_unfinished: dict[str, tuple[int, ReceivedFile]] = {}  # path -> (writing thread id, file)
_unfinished_lock = threading.Lock()


class ReceivedFile:
    """A dataset being received, written to a temporary file in ``tempfile.tempdir``.

    Stands in for the ``NamedTemporaryFile`` pynetdicom opens per C-STORE. A write that fails
    (disk full, quota) does not raise into pynetdicom's network thread: the file is deleted at
    once, the error kept in :attr:`error`, and the rest of the dataset discarded, so the
    C-STORE handler can refuse the instance with a status. Until :func:`claim` is called with
    its path, the file counts as unfinished, and :func:`discard_orphaned` deletes it once the
    thread that was receiving it has ended.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        del args, kwargs  # pynetdicom's NamedTemporaryFile arguments: always a new .dcm file
        self.error: OSError | None = None
        self.file = self  # pynetdicom flushes through ``.file``
        self._raw: tempfile._TemporaryFileWrapper[bytes] | None
        try:
            self._raw = tempfile.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")  # noqa: SIM115
            self.name = self._raw.name
        except OSError as err:
            self._raw = None
            self.error = err
            self.name = os.path.join(tempfile.gettempdir(), f"unwritten-{uuid.uuid4().hex}.dcm")
        with _unfinished_lock:
            _unfinished[self.name] = (threading.get_ident(), self)

    def __bool__(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._raw is not None:
            try:
                return self._raw.write(data)
            except OSError as err:
                self._fail(err)
        return len(data)

    def flush(self) -> None:
        if self._raw is not None:
            try:
                self._raw.flush()
            except OSError as err:
                self._fail(err)

    def close(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            except OSError as err:
                self._fail(err)

    def _fail(self, err: OSError) -> None:
        self.error = err
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(OSError):  # its buffer cannot be written either
                raw.close()
        Path(self.name).unlink(missing_ok=True)


def claim(path: Path | str) -> ReceivedFile | None:
    """Take the received file at ``path`` out of the unfinished ones (the C-STORE handler
    does, before it renames or refuses it); returns it, or None if it is not one of ours."""
    with _unfinished_lock:
        entry = _unfinished.pop(str(path), None)
    return None if entry is None else entry[1]


def receive_datasets_into_files() -> None:
    """Make pynetdicom write each received dataset to a :class:`ReceivedFile` in
    ``tempfile.tempdir`` (for the whole process) and hand the handler its path
    (``event.dataset_path``)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    pynetdicom.dimse_messages.NamedTemporaryFile = ReceivedFile  # type: ignore[assignment]


def send_datasets_from_files() -> None:
    """Make ``send_c_store(path)`` send the file's encoded dataset as it is (for the whole
    process); the caller must pass a path only when the receiver accepted its transfer
    syntax."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def abort_undecodable_messages() -> None:
    """Make a DIMSE message that cannot be decoded abort its association (for the whole
    process), logged as one line, instead of killing pynetdicom's network thread."""
    receive = DIMSEServiceProvider.receive_primitive
    if getattr(receive, "_aborts_undecodable", False):
        return

    def receive_primitive(self: DIMSEServiceProvider, primitive: P_DATA) -> None:
        try:
            receive(self, primitive)
        except Exception as err:
            _log.warning(
                "association with %s aborted: DIMSE message cannot be decoded (%s: %s)",
                self.assoc.requestor.address if self.assoc.is_acceptor else "peer",
                type(err).__name__,
                err,
            )
            self.message = None
            self.dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT, as pynetdicom does

    receive_primitive._aborts_undecodable = True  # type: ignore[attr-defined]
    DIMSEServiceProvider.receive_primitive = receive_primitive  # type: ignore[method-assign]


# -- connections ------------------------------------------------------------------------------


def limit_pdu_length(
    assoc: Association, limit: int, refused: Callable[[int], None] | None = None
) -> None:
    """Refuse any PDU from ``assoc``'s peer announcing more than ``limit`` bytes: the
    connection is shut down before its body is read, and ``refused(length)`` is called.
    A header with an unknown PDU type closes the connection too (after pynetdicom's one log
    line about it)."""
    sock = assoc.dul.socket
    if sock is None:
        return
    read = sock.recv

    def recv(nr_bytes: int) -> bytearray:
        # pynetdicom reads the 6-byte PDU header, then asks for the whole announced length.
        if nr_bytes > limit:
            if refused is not None:
                refused(nr_bytes)
            close_connection(assoc)
            return bytearray()  # pynetdicom: "PDU shorter than expected", connection closed
        data = read(nr_bytes)
        if nr_bytes == 6 and data and not 0x01 <= data[0] <= 0x07:
            # Not a PDU: pynetdicom would log "Unknown PDU type" for every 6 bytes of the
            # rest of the stream (27,000 lines for 150 fuzzed connections). One is enough.
            close_connection(assoc)
        return data

    sock.recv = recv  # type: ignore[method-assign]


def close_connection(assoc: Association) -> None:
    """Shut ``assoc``'s socket down under pynetdicom: its blocked reads end, and with them
    the association."""
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if raw is not None:
        with contextlib.suppress(OSError):  # already closed
            raw.shutdown(socket.SHUT_RDWR)


def on_connection_open(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler for both ends (node and export): TCP_NODELAY, else each
    C-STORE response can wait ~40 ms on Nagle and delayed ACK."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def check() -> list[str]:
    """What this pynetdicom lacks of the internals above (empty: all there)."""
    missing = []
    for option in ("STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET"):
        if not hasattr(_config, option):
            missing.append(f"pynetdicom._config.{option}")
    for module in (pynetdicom.association, pynetdicom.dul):
        if not isinstance(getattr(module, "time", None), types.ModuleType) or (
            "time.sleep(" not in inspect.getsource(module)
        ):
            missing.append(f"{module.__name__} sleeping through its module-level `time`")
    if "self._idle_timer.restart()" not in inspect.getsource(DULServiceProvider.run_reactor):
        missing.append("pynetdicom.dul.DULServiceProvider._idle_timer restarted per PDU")
    source = inspect.getsource(pynetdicom.dimse_messages)
    if "NamedTemporaryFile(delete=False" not in source:
        missing.append("pynetdicom.dimse_messages writing received datasets by NamedTemporaryFile")
    if "def receive_primitive(self, primitive" not in inspect.getsource(DIMSEServiceProvider):
        missing.append("pynetdicom.dimse.DIMSEServiceProvider.receive_primitive")
    read = inspect.getsource(DULServiceProvider._read_pdu_data)
    if "self.socket.recv(pdu_length)" not in read:
        missing.append("pynetdicom.dul reading a PDU body by socket.recv(pdu_length)")
    return missing


def discard_orphaned() -> int:
    """Delete the unfinished files whose receiving thread has ended (the association closed
    mid-dataset: aborted, peer gone, PDU refused); returns how many."""
    alive = {t.ident for t in threading.enumerate()}
    with _unfinished_lock:
        orphans = [path for path, (owner, _) in _unfinished.items() if owner not in alive]
        files = [_unfinished.pop(path)[1] for path in orphans]
    for f in files:
        f.close()
        Path(f.name).unlink(missing_ok=True)
    return len(files)
