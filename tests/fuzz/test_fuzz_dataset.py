"""Fuzzing the C-STORE dataset path: what the node reads of a received file before it
acknowledges it. Every mutated file must be accepted or refused with a HeaderError (a
status), never crash the handler."""

from __future__ import annotations

import contextlib
import struct
import tempfile
from pathlib import Path

import pydicom
from hypothesis import given
from hypothesis import strategies as st

from radfusion.integrations.dicom.header import (
    HeaderError,
    check_part10_structure,
    read_part10_header,
)
from tests.fuzz.fuzz_support import FUZZ, mutated, seed_files


def _transfer_syntax(path: Path) -> str | None:
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    except Exception:
        return None
    ts = meta.get("TransferSyntaxUID")
    return str(ts) if ts else None


def _meta_end(data: bytes) -> int:
    (group_length,) = struct.unpack_from("<I", data, 140)
    return 144 + group_length


CASES = [
    (p.name, p.read_bytes(), ts) for p in seed_files() if (ts := _transfer_syntax(p)) is not None
]


def _case(case: tuple[str, bytes, str]) -> st.SearchStrategy[tuple[str, bytes, str]]:
    name, data, ts = case
    return mutated(data, keep=_meta_end(data)).map(lambda m: (name, m, ts))


@FUZZ
@given(case=st.sampled_from(CASES).flatmap(_case))
def test_mutated_real_files_get_a_status_never_a_crash(case: tuple[str, bytes, str]) -> None:
    _, data, transfer_syntax = case
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(data)
        f.flush()
        path = Path(f.name)
        for read in (read_part10_header, check_part10_structure):
            try:
                read(path, transfer_syntax)
            except HeaderError as err:
                assert 0xA700 <= err.status <= 0xCFFF, err.status


def test_the_seed_corpus_is_what_the_harness_claims() -> None:
    assert len(CASES) >= 60
    syntaxes = {ts for _, _, ts in CASES}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"} <= syntaxes
    assert any(pydicom.uid.UID(ts).is_compressed for ts in syntaxes)


@given(data=st.binary(max_size=2048))
@FUZZ
def test_random_bytes_after_a_valid_file_meta_get_a_status(data: bytes) -> None:
    seed = seed_files()[0].read_bytes()
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(seed[: _meta_end(seed)] + data)
        f.flush()
        for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"):
            for read in (read_part10_header, check_part10_structure):
                with contextlib.suppress(HeaderError):
                    read(Path(f.name), ts)
