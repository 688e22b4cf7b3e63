"""The spool: received instances on disk, written so that an acknowledged one is never lost.

Each instance is written to ``tmp/`` and renamed into ``studies/<Study>/<Series>/<SOP>.dcm``
(rename is atomic on one filesystem), so a reader never sees a partial file and a crash
leaves at most an orphan temp file, which ``Spool.open`` clears.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from radfusion import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = ["Spool", "SpoolFullError", "file_meta"]

_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


def _element(group_elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    tag = struct.pack("<HH", 0x0002, group_elem)
    if vr == b"OB":
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str
) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group of a Part 10 file.

    Encoded by hand because it runs for every received instance and pydicom's general writer
    costs more than the rest of the spooling put together.
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\0\1", b"\0"),
            _element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\0"),
            _element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\0"),
            _element(0x0010, b"UI", transfer_syntax_uid.encode("ascii"), b"\0"),
            _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\0"),
            _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" "),
            _element(0x0016, b"AE", source_ae_title.encode("ascii", "replace"), b" "),
        )
    )
    length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(body))
    return b"\0" * 128 + b"DICM" + length + body


class SpoolFullError(OSError):
    """Free space is below the configured reserve."""


def _component(uid: str) -> str:
    # UIDs come off the wire; a malformed one must never become a path like '../..'.
    if _SAFE_UID.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:32]


class Spool:
    """The folder ``root`` holding received instances."""

    def __init__(self, root: Path, *, fsync: bool = False, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.tmp = self.root / "tmp"
        self.studies = self.root / "studies"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.studies.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():  # partial writes of a crashed process
            leftover.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def path_for(self, study: str, series: str, sop_instance: str) -> Path:
        return (
            self.studies
            / _component(study)
            / _component(series)
            / (_component(sop_instance) + ".dcm")
        )

    def write(self, path: Path, chunks: Iterable[bytes | memoryview]) -> int:
        """Write ``chunks`` to ``path`` atomically; returns the size.

        Raises:
            SpoolFullError: free space would fall below the reserve.
            OSError: the write failed (the temp file is removed).
        """
        if self.free_bytes() < self.min_free_bytes:
            raise SpoolFullError(f"free space below reserve of {self.min_free_bytes} bytes")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{path.name}.{os.getpid()}.{threading.get_ident():x}.part"
        size = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    size += f.write(chunk)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return size

    def files(self) -> Iterator[Path]:
        """Every spooled instance file."""
        yield from self.studies.glob("*/*/*.dcm")

    def remove(self, paths: Iterable[str | Path]) -> None:
        """Delete instance files and the folders they leave empty."""
        parents = set()
        for p in paths:
            Path(p).unlink(missing_ok=True)
            parents.add(Path(p).parent)
        for d in parents:
            for folder in (d, d.parent):
                if folder.is_dir() and not any(folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)
