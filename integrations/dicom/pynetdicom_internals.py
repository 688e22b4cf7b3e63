"""The places radfusion reaches into pynetdicom's private parts, and why.

pynetdicom has no public way to do these, and each is worth it on a hospital network:

- **Datasets received into files** (``_config.STORE_RECV_CHUNKED_DATASET``): pynetdicom writes
  each incoming dataset to a temporary file as its PDUs arrive instead of holding it in
  memory; the node renames that file into the spool, never copying the pixels in Python.
  ``pynetdicom._config`` is how pynetdicom's own documentation sets its options.
- **Datasets sent from files** (``_config.STORE_SEND_CHUNKED_DATASET``): export hands
  pynetdicom a file whose transfer syntax the receiver accepted, and pynetdicom sends its bytes
  as they are instead of decoding and re-encoding the dataset.
- **Shorter reactor sleeps** (``time`` inside ``pynetdicom.association``) and **shorter DUL
  reader sleeps** (``DULServiceProvider._run_loop_delay``): both poll every 1 ms. A sender
  waits for each C-STORE response, so these sleeps alone cap ingest near 250 images/s on a
  2-core machine; 0.2 ms costs a few percent of a core per open association and lifts the cap
  by about half.

:func:`check` says whether the pynetdicom installed still has all of them; the tests call it,
so an upgrade that removes one fails loudly there instead of silently slowing the node or
filling its memory.
"""

from __future__ import annotations

import inspect
import socket
import time
import types

import pynetdicom.association
import pynetdicom.dul
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.events import Event

__all__ = [
    "POLL_S",
    "check",
    "on_connection_open",
    "receive_datasets_into_files",
    "send_datasets_from_files",
    "shorten_polling",
]

POLL_S = 0.0002  # seconds between polls, instead of pynetdicom's 1 ms


class _ShortSleepTime(types.ModuleType):
    """Stands in for ``time`` inside ``pynetdicom.association``, capping its sleeps."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_S))


def receive_datasets_into_files() -> None:
    """Make pynetdicom write each received dataset to a file in ``tempfile.tempdir`` (for
    the whole process) and hand the handler its path (``event.dataset_path``)."""
    _config.STORE_RECV_CHUNKED_DATASET = True


def send_datasets_from_files() -> None:
    """Make ``send_c_store(path)`` send the file's encoded dataset as it is (for the whole
    process); the caller must pass a path only when the receiver accepted its transfer
    syntax."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def shorten_polling(association: Association | None = None) -> None:
    """Cap the association reactor's sleeps (for the whole process) and, given an
    association, its DUL reader's."""
    if not isinstance(pynetdicom.association.time, _ShortSleepTime):
        pynetdicom.association.time = _ShortSleepTime()
    if association is not None:
        association.dul._run_loop_delay = POLL_S


def on_connection_open(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler for both ends (node and export): TCP_NODELAY, else each
    C-STORE response can wait ~40 ms on Nagle and delayed ACK, and short polling."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    shorten_polling(event.assoc)


def check() -> list[str]:
    """What this pynetdicom lacks of the internals above (empty: all there)."""
    missing = []
    for option in ("STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET"):
        if not hasattr(_config, option):
            missing.append(f"pynetdicom._config.{option}")
    association = pynetdicom.association
    if not isinstance(getattr(association, "time", None), types.ModuleType) or (
        "time.sleep(" not in inspect.getsource(association)
    ):
        missing.append("pynetdicom.association sleeping through its module-level `time`")
    if "time.sleep(self._run_loop_delay)" not in inspect.getsource(pynetdicom.dul):
        missing.append("pynetdicom.dul.DULServiceProvider._run_loop_delay")
    return missing
