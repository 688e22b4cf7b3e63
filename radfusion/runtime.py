"""Process settings the MONAI Deploy (Holoscan) runtime needs, applied before it is imported."""

from __future__ import annotations

import contextlib
import os
import resource

__all__ = ["prepare_holoscan"]

_STACK_BYTES = 32 * 1024 * 1024  # Holoscan asks for 32 MiB and warns below it


def prepare_holoscan() -> None:
    """Quiet Holoscan's per-run INFO logging and raise the stack limit it asks for.

    Idempotent. A site can still set ``HOLOSCAN_LOG_LEVEL`` itself (e.g. ``DEBUG``).
    """
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft < _STACK_BYTES:
        target = _STACK_BYTES if hard == resource.RLIM_INFINITY else min(_STACK_BYTES, hard)
        with contextlib.suppress(ValueError, OSError):  # not permitted: Holoscan only warns
            resource.setrlimit(resource.RLIMIT_STACK, (target, hard))
