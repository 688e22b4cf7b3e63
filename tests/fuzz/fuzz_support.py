"""Shared parts of the fuzz harness: seed files, how many examples, byte mutations.

``RADFUSION_FUZZ_EXAMPLES`` sets the examples per target (default 150: a short run for CI);
a long run is e.g. ``RADFUSION_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/fuzz``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("RADFUSION_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 500,  # CI: the same examples every run; long runs explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


def seed_files() -> list[Path]:
    """Real files from many writers: pydicom's test files (GE CT, MR, dcmtk/GDCM JPEG,
    JPEG-LS, JPEG 2000, RLE, deflate, big endian, RT, SR, multi-frame, odd and broken ones)."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in folder.glob("*.dcm") if p.stat().st_size < 400_000)


@st.composite
def mutated(draw: st.DrawFn, data: bytes, keep: int = 0) -> bytes:
    """``data`` with a few mutations after its first ``keep`` bytes: bytes overwritten,
    a 16- or 32-bit length field set to an edge value, a span deleted or duplicated, or the
    tail cut off."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if len(out) <= keep + 8:
            break
        at = draw(st.integers(keep, len(out) - 8))
        kind = draw(st.sampled_from(["bytes", "u16", "u32", "delete", "duplicate", "cut"]))
        if kind == "bytes":
            chunk = draw(st.binary(min_size=1, max_size=8))
            out[at : at + len(chunk)] = chunk
        elif kind == "u16":
            out[at : at + 2] = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFE, 0xFFFF])).to_bytes(
                2, "little"
            )
        elif kind == "u32":
            value = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF, len(out)]))
            out[at : at + 4] = value.to_bytes(4, "little")
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 64))]
        elif kind == "duplicate":
            out[at:at] = out[at : at + draw(st.integers(1, 64))]
        else:
            del out[at:]
    return bytes(out)
