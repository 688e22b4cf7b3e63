"""Read the few header attributes the node needs from an encoded dataset, without decoding it.

The C-STORE handler must not decode whole datasets (pixel data can be hundreds of MB); it reads
the elements up to Number of Frames (0028,0008) and stops there.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import MappingProxyType

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from radfusion.errors import DatasetError
from radfusion.routing import SERIES_ATTRIBUTES

__all__ = ["HeaderError", "WireHeader", "read_header", "read_part10_header"]

_LAST_TAG = 0x00280008  # Number of Frames: every attribute we need sorts before it
_DEFLATED = "1.2.840.10008.1.2.1.99"


class HeaderError(DatasetError):
    """The dataset cannot be parsed (status 0xC000, Cannot Understand) or lacks a required
    attribute (0xA900, Dataset Does Not Match SOP Class); the message says which."""


_MISSING = 0xA900  # Error: Data Set Does Not Match SOP Class


@dataclass(frozen=True)
class WireHeader:
    """What the node keeps of an instance's header: its study's identity and context, and
    ``attributes``, the values of the routing attributes (:data:`SERIES_ATTRIBUTES`)."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    PatientID: str
    IssuerOfPatientID: str
    StudyDate: str
    attributes: Mapping[str, str]
    frames: int


def _stop(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_TAG


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _issuer(ds: Dataset) -> str:
    """Issuer of Patient ID as an identifier system: the qualifiers' Universal Entity ID when
    present (URI as is, ISO OID as ``urn:oid:``), else the plain Issuer of Patient ID."""
    for item in ds.get("IssuerOfPatientIDQualifiersSequence", []) or []:
        uid = _text(item, "UniversalEntityID")
        kind = _text(item, "UniversalEntityIDType").upper()
        if uid:
            return f"urn:oid:{uid}" if kind == "ISO" and not uid.startswith("urn:") else uid
    return _text(ds, "IssuerOfPatientID")


_TAGS = {
    0x00080020: "StudyDate",
    0x00100020: "PatientID",
    0x00100021: "IssuerOfPatientID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00280008: "NumberOfFrames",
    **{tag: keyword for keyword, tag in SERIES_ATTRIBUTES.items()},
}
_ISSUER_SEQ = 0x00100024
_ENTITY_ID, _ENTITY_TYPE = 0x00400032, 0x00400033
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"SV",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PLAIN_CHARSETS = {"", "ISO_IR 100", "ISO_IR 6", "ISO_IR 192"}


class _Unsupported(Exception):
    """The fast reader cannot handle this encoding; use pydicom."""


class _Truncated(_Unsupported):
    """The data ends before the header attributes do (only a prefix was read)."""


def _element(buf: memoryview, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, value offset) of the element at ``pos``."""
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from("<I", buf, pos + 4)
        return tag, b"SQ" if tag == _ISSUER_SEQ else b"", length, pos + 8
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from("<I", buf, pos + 8)
        return tag, vr, length, pos + 12
    (length,) = struct.unpack_from("<H", buf, pos + 6)
    return tag, vr, length, pos + 8


def _skip_undefined(buf: memoryview, pos: int, implicit: bool) -> int:
    """Offset just past an undefined-length sequence's delimiter, starting at its items."""
    while True:
        tag, _, length, value = _element(buf, pos, True)
        if tag == _SEQ_END:
            return value
        if tag != _ITEM:
            raise _Unsupported("unexpected tag inside a sequence")
        if length != _UNDEFINED:
            pos = value + length
            continue
        pos = value
        while True:  # an undefined-length item: walk its elements to the item delimiter
            tag, vr, length, value = _element(buf, pos, implicit)
            if tag == _ITEM_END:
                pos = value
                break
            pos = (
                _skip_undefined(buf, value, implicit or vr == b"UN")
                if (length == _UNDEFINED)
                else value + length
            )


def _issuer_from_item(buf: memoryview, pos: int, end: int, implicit: bool) -> str:
    found: dict[int, str] = {}
    while pos < end:
        tag, _, length, value = _element(buf, pos, implicit)
        if tag == _ITEM_END:
            break
        if length == _UNDEFINED:
            raise _Unsupported("nested undefined length in issuer qualifiers")
        if tag in (_ENTITY_ID, _ENTITY_TYPE):
            found[tag] = bytes(buf[value : value + length]).decode("latin-1").strip(" \0")
        pos = value + length
    uid, kind = found.get(_ENTITY_ID, ""), found.get(_ENTITY_TYPE, "").upper()
    if not uid:
        return ""
    return f"urn:oid:{uid}" if kind == "ISO" and not uid.startswith("urn:") else uid


def _fast(data: memoryview, implicit: bool, partial: bool = False) -> dict[str, str]:
    """Walk top-level element headers up to Number of Frames, keeping the wanted values.

    ``partial``: ``data`` is only a prefix, so running out of it means truncation.
    """
    values: dict[str, str] = {}
    issuer = ""
    pos, end = 0, len(data)
    while pos < end:
        tag, vr, length, value = _element(data, pos, implicit)
        if tag > _LAST_TAG:
            break
        if tag == 0x00080005:
            charset = bytes(data[value : value + length]).decode("latin-1").strip(" \0")
            if charset not in _PLAIN_CHARSETS:
                raise _Unsupported(f"character set {charset}")
            values["charset"] = charset
        if length == _UNDEFINED:
            if tag == _ISSUER_SEQ:
                _, _, item_len, item_value = _element(data, value, True)
                item_end = end if item_len == _UNDEFINED else item_value + item_len
                issuer = _issuer_from_item(data, item_value, item_end, implicit)
            pos = _skip_undefined(data, value, implicit or vr == b"UN")
            continue
        if value + length > end:
            raise _Truncated("element runs past the end of the data")
        if tag == _ISSUER_SEQ and length:
            _, _, item_len, item_value = _element(data, value, True)
            issuer = _issuer_from_item(data, item_value, item_value + item_len, implicit)
        elif tag in _TAGS:
            raw = bytes(data[value : value + length])
            text = raw.decode("utf-8" if values.get("charset") == "ISO_IR 192" else "latin-1")
            values[_TAGS[tag]] = text.strip(" \0")
        pos = value + length
    else:
        if partial:
            raise _Truncated("the prefix ended before Number of Frames")
    if issuer:
        values["IssuerOfPatientID"] = issuer
    return values


def _header(values: dict[str, str]) -> WireHeader:
    study = values.get("StudyInstanceUID", "")
    series = values.get("SeriesInstanceUID", "")
    if not study:
        raise HeaderError("Study Instance UID (0020,000D) is missing", status=_MISSING)
    if not series:
        raise HeaderError("Series Instance UID (0020,000E) is missing", status=_MISSING)
    frames = values.get("NumberOfFrames", "") or "1"
    try:
        n = max(1, int(frames.split("\\")[0]))
    except ValueError:
        n = 1
    return WireHeader(
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        PatientID=values.get("PatientID", ""),
        IssuerOfPatientID=values.get("IssuerOfPatientID", ""),
        StudyDate=values.get("StudyDate", ""),
        attributes=MappingProxyType({k: values.get(k, "") for k in SERIES_ATTRIBUTES}),
        frames=n,
    )


def _with_pydicom(data: bytes | memoryview, ts: UID) -> dict[str, str]:
    raw = data
    if ts == _DEFLATED:
        # Only the head is needed; inflate a bounded prefix rather than the whole dataset.
        raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(data), 1 << 20)
    known = ts.is_transfer_syntax
    ds = read_dataset(
        BytesIO(raw),
        is_implicit_VR=ts.is_implicit_VR if known else True,
        is_little_endian=ts.is_little_endian if known else True,
        stop_when=_stop,
    )
    values = {keyword: _text(ds, keyword) for keyword in _TAGS.values()}
    values["IssuerOfPatientID"] = _issuer(ds)
    return values


def read_header(data: bytes | memoryview, transfer_syntax: str) -> WireHeader:
    """Parse the routing/catalog attributes of an encoded dataset (no File Meta).

    Little-endian syntaxes in plain character sets take a fast path that walks element
    headers only; anything else (big endian, deflate, other character sets, odd encodings)
    is read by pydicom. Both give the same result.

    Raises:
        HeaderError: the bytes are not a parseable dataset, or Study/Series Instance UID is
            missing.
    """
    ts = UID(transfer_syntax)
    try:
        if ts == _DEFLATED or (ts.is_transfer_syntax and not ts.is_little_endian):
            raise _Unsupported(str(ts))
        try:
            values = _fast(memoryview(data), implicit=ts == "1.2.840.10008.1.2")
        except struct.error:
            raise _Truncated("element header runs past the end of the data") from None
    except (_Unsupported, UnicodeDecodeError):
        try:
            values = _with_pydicom(data, ts)
        except Exception as err:  # pydicom raises many types on garbage input
            raise HeaderError(f"dataset cannot be parsed: {type(err).__name__}: {err}") from None
    return _header(values)


def read_part10_header(path: Path, transfer_syntax: str, prefix: int = 1 << 16) -> WireHeader:
    """``read_header`` for a Part 10 file, reading only its first ``prefix`` bytes if they
    hold the header attributes (they nearly always do), else the whole dataset.

    Raises:
        HeaderError: as ``read_header``; also when the file has no valid File Meta.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(144)
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
            raise HeaderError("not a DICOM Part 10 file (no File Meta Information)")
        (group_length,) = struct.unpack_from("<I", head, 140)
        f.seek(144 + group_length)
        data = f.read(prefix)
        if len(data) == prefix:
            ts = UID(transfer_syntax)
            fast = ts != _DEFLATED and (not ts.is_transfer_syntax or ts.is_little_endian)
            try:
                if fast:
                    return _header(_fast(memoryview(data), ts == "1.2.840.10008.1.2", True))
            except (_Unsupported, struct.error, UnicodeDecodeError):
                pass  # read it all and take the general path
            data += f.read()
    return read_header(data, transfer_syntax)
