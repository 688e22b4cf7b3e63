"""The spool: received instances on disk, written so that an acknowledged one is never lost.

The network layer writes each instance to ``tmp/`` as its PDUs arrive; ``Spool.take`` renames
it into ``studies/<Study>/<Series>/<SOP>.dcm`` (atomic on one filesystem), so a reader never
sees a partial file and a crash leaves at most an orphan temp file, which opening the spool
clears.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from radfusion.errors import RadfusionError

__all__ = ["Spool", "SpoolFullError"]

_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


class SpoolFullError(RadfusionError, OSError):
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
        # A spool made by an older version (or another umask) is closed to other users too.
        for folder in (self.root, self.tmp, self.studies):
            folder.chmod(0o700)
        # Partial writes of a crashed process, and the temporary folders it had there (a
        # prior being retrieved: the service's temporary files live in tmp/).
        for leftover in self.tmp.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
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

    def take(self, received: Path, path: Path) -> int:
        """Move a file already written in ``tmp/`` (by the network layer) to ``path``.

        Returns its size. Raises SpoolFullError when free space is below the reserve (the
        file is left for the caller to discard) and OSError when the move fails.
        """
        if self.free_bytes() < self.min_free_bytes:
            raise SpoolFullError(f"free space below reserve of {self.min_free_bytes} bytes")
        if self.fsync:
            with open(received, "rb+") as f:
                os.fsync(f.fileno())
        path.parent.mkdir(parents=True, exist_ok=True)
        size = received.stat().st_size
        os.replace(received, path)
        if self.fsync:
            self._fsync_dir(path.parent)
        return size

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
