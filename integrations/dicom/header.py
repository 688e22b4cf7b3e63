"""Read the few header attributes the node needs from an encoded dataset, without decoding it,
and check that the dataset is whole before the node acknowledges it.

The C-STORE handler must not decode whole datasets (pixel data can be hundreds of MB); it reads
the elements up to Number of Frames (0028,0008) and stops there. :func:`check_part10_structure`
walks every top-level element header of the file (mapped, not read) to find truncation and
Pixel Data shorter than the image it describes.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import MappingProxyType

import pydicom.uid
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES

from radfusion.errors import DatasetError
from radfusion.routing import SERIES_ATTRIBUTES

__all__ = [
    "RECEIVED_TRANSFER_SYNTAXES",
    "HeaderError",
    "WireHeader",
    "check_part10_structure",
    "read_header",
    "read_part10_header",
]

RECEIVED_TRANSFER_SYNTAXES = list(
    dict.fromkeys([*ALL_TRANSFER_SYNTAXES, *map(str, pydicom.uid.AllTransferSyntaxes)])
)
"""Every transfer syntax radfusion accepts a dataset in (the node, a C-MOVE's receiver): the
encoded bytes are kept as they came, so none needs a codec here."""

_LAST_TAG = 0x00280008  # Number of Frames: every attribute we need sorts before it
_DEFLATED = "1.2.840.10008.1.2.1.99"


class HeaderError(DatasetError):
    """The dataset cannot be parsed (status 0xC000, Cannot Understand) or lacks a required
    attribute (0xA900, Dataset Does Not Match SOP Class); the message says which."""


_MISSING = 0xA900  # Error: Data Set Does Not Match SOP Class
_CANNOT_UNDERSTAND = 0xC210  # Error: Cannot Understand (PS3.4 Annex B: 0xCxxx)
_MAX_DEPTH = 32  # sequences nested deeper than this are refused, not recursed into
_IMPLICIT_LE = "1.2.840.10008.1.2"


@dataclass(frozen=True)
class WireHeader:
    """What the node keeps of an instance's header: its study's identity and context, and
    ``attributes``, the values of the routing attributes (:data:`SERIES_ATTRIBUTES`)."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPClassUID: str
    SOPInstanceUID: str
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
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
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
_LONG_VRS = set(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PLAIN_CHARSETS = {"", "ISO_IR 100", "ISO_IR 6", "ISO_IR 192"}


class _Unsupported(Exception):
    """The fast reader cannot handle this encoding; use pydicom."""


class _Truncated(_Unsupported):
    """The data ends before the header attributes do (only a prefix was read)."""


class _NotThisEncoding(_Unsupported):
    """An element header that the negotiated encoding cannot produce (e.g. no VR where
    Explicit VR needs one)."""


_VRS = set(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)


def _element(buf: memoryview, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, value offset) of the element at ``pos``."""
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from("<I", buf, pos + 4)
        return tag, b"SQ" if tag == _ISSUER_SEQ else b"", length, pos + 8
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr not in _VRS:
        raise _NotThisEncoding(f"element ({group:04X},{elem:04X}) has no valid VR")
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from("<I", buf, pos + 8)
        return tag, vr, length, pos + 12
    (length,) = struct.unpack_from("<H", buf, pos + 6)
    return tag, vr, length, pos + 8


def _skip_undefined(buf: memoryview, pos: int, implicit: bool, depth: int = 0) -> int:
    """Offset just past an undefined-length sequence's delimiter, starting at its items."""
    if depth > _MAX_DEPTH:
        raise HeaderError(
            f"sequences nested deeper than {_MAX_DEPTH} levels", status=_CANNOT_UNDERSTAND
        )
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
                _skip_undefined(buf, value, implicit or vr == b"UN", depth + 1)
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
        SOPClassUID=values.get("SOPClassUID", ""),
        SOPInstanceUID=values.get("SOPInstanceUID", ""),
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
        implicit = ts == _IMPLICIT_LE
        try:
            values = _fast(memoryview(data), implicit=implicit)
        except struct.error:
            raise _Truncated("element header runs past the end of the data") from None
        except (_Truncated, _NotThisEncoding):
            if ts.is_transfer_syntax and _parses(data, implicit=not implicit):
                raise HeaderError(
                    f"dataset is encoded {'Explicit' if implicit else 'Implicit'} VR, but was "
                    f"sent as {ts.name}",
                    status=_CANNOT_UNDERSTAND,
                ) from None
            raise
    except (_Unsupported, UnicodeDecodeError):
        try:
            values = _with_pydicom(data, ts)
        except RecursionError:
            raise HeaderError("sequences nested too deep", status=_CANNOT_UNDERSTAND) from None
        except Exception as err:  # pydicom raises many types on garbage input
            raise HeaderError(f"dataset cannot be parsed: {type(err).__name__}: {err}") from None
    return _header(values)


def _parses(data: bytes | memoryview, implicit: bool) -> bool:
    try:
        _fast(memoryview(data), implicit=implicit)
    except (_Unsupported, HeaderError, struct.error, UnicodeDecodeError):
        return False
    return True


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
                    return _header(_fast(memoryview(data), ts == _IMPLICIT_LE, True))
            except (_Unsupported, struct.error, UnicodeDecodeError):
                pass  # read it all and take the general path
            data += f.read()
    return read_header(data, transfer_syntax)


_PIXEL_DATA = 0x7FE00010
_PHOTOMETRIC = 0x00280004
_IMAGE_US = {0x00280002: "samples", 0x00280010: "rows", 0x00280011: "columns", 0x00280100: "bits"}


def _is_sequence(tag: int, vr: bytes, length: int, implicit: bool) -> bool:
    if vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED):
        return True
    if not implicit or vr:
        return False
    if length == _UNDEFINED:
        return tag != _PIXEL_DATA  # in implicit VR only a sequence has an undefined length
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False  # a private or unknown tag: its value is skipped whole


def _walk_items(buf: memoryview, pos: int, stop: int | None, implicit: bool, depth: int) -> int:
    """Walk a sequence's items from ``pos`` to ``stop`` (or to its delimiter when its length
    is undefined); returns the offset after it."""
    if depth > _MAX_DEPTH:
        raise HeaderError(
            f"sequences nested deeper than {_MAX_DEPTH} levels", status=_CANNOT_UNDERSTAND
        )
    while stop is None or pos < stop:
        tag, _, length, value = _element(buf, pos, True)
        if tag == _SEQ_END:
            return value
        if tag != _ITEM:
            raise _Unsupported("unexpected tag inside a sequence")
        if length == _UNDEFINED:
            pos = _walk_elements(buf, value, None, implicit, depth)
        else:
            _within(buf, tag, value, length)
            _walk_elements(buf, value, value + length, implicit, depth)
            pos = value + length
    return pos


def _walk_elements(
    buf: memoryview,
    pos: int,
    stop: int | None,
    implicit: bool,
    depth: int,
    seen: dict[int, tuple[int, int]] | None = None,
) -> int:
    """Walk elements from ``pos`` to ``stop`` (or to an item delimiter when ``stop`` is
    None), descending into sequences; records (value offset, length) of the tags in
    ``seen``'s keys. Returns the offset after the last element."""
    while stop is None or pos < stop:
        tag, vr, length, value = _element(buf, pos, implicit)
        if tag == _ITEM_END and stop is None:
            return value
        if _is_sequence(tag, vr, length, implicit):
            end = None if length == _UNDEFINED else value + length
            if end is not None:
                _within(buf, tag, value, length)
            pos = _walk_items(buf, value, end, implicit or vr == b"UN", depth + 1)
            continue
        if length == _UNDEFINED:  # encapsulated Pixel Data: its fragments' items
            pos = _skip_undefined(buf, value, implicit)
            if seen is not None and tag in seen:
                seen[tag] = (value, _UNDEFINED)
            continue
        _within(buf, tag, value, length)
        if seen is not None and tag in seen:
            seen[tag] = (value, length)
        pos = value + length
    return pos


def _within(buf: memoryview, tag: int, value: int, length: int) -> None:
    if value + length > len(buf):
        raise HeaderError(
            f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) holds {max(0, len(buf) - value)} of "
            f"its {length} bytes: truncated",
            status=_CANNOT_UNDERSTAND,
        )


def _walk_top_level(buf: memoryview, implicit: bool) -> tuple[dict[str, int], int | None]:
    """Walk every element of an encoded dataset, sequences included; returns the image's US
    values (:data:`_IMAGE_US`, plus ``frames``) and Pixel Data's defined length (None if
    absent or encapsulated). Raises HeaderError when an element runs past the end of the
    data or sequences nest deeper than :data:`_MAX_DEPTH`."""
    seen: dict[int, tuple[int, int]] = dict.fromkeys(
        [*_IMAGE_US, 0x00280008, _PHOTOMETRIC, _PIXEL_DATA], (0, -1)
    )
    try:
        _walk_elements(buf, 0, len(buf), implicit, 0, seen)
    except struct.error:
        raise HeaderError(
            "dataset ends inside an element header: truncated", status=_CANNOT_UNDERSTAND
        ) from None
    except _Unsupported as err:
        raise HeaderError(f"dataset malformed: {err}", status=_CANNOT_UNDERSTAND) from None
    image: dict[str, int] = {}
    for tag, (value, length) in seen.items():
        if tag in _IMAGE_US and length == 2:
            (image[_IMAGE_US[tag]],) = struct.unpack_from("<H", buf, value)
        elif tag == 0x00280008 and length > 0:
            text = bytes(buf[value : value + length]).decode("latin-1").strip(" \0")
            image["frames"] = int(text) if text.isdigit() else 1
        elif tag == _PHOTOMETRIC and length > 0:
            text = bytes(buf[value : value + length]).decode("latin-1").strip(" \0")
            # 4:2:2 subsampled: two values per pixel, not three (PS3.3 C.7.6.3.1.2)
            image["subsampled"] = int(text in ("YBR_FULL_422", "YBR_PARTIAL_422"))
    value, length = seen[_PIXEL_DATA]
    return image, (None if length in (-1, _UNDEFINED) else length)


def _after_file_meta(buf: memoryview) -> int:
    """Offset of the dataset after a Part 10 file's File Meta Information (group 0002,
    explicit VR little endian), walked element by element: a missing or wrong group length
    (some writers leave it out) does not matter."""
    pos = 132
    try:
        while struct.unpack_from("<H", buf, pos)[0] == 0x0002:
            _, _, length, value = _element(buf, pos, False)
            pos = value + length
    except (struct.error, _Unsupported):
        raise HeaderError("File Meta Information is malformed", status=_CANNOT_UNDERSTAND) from None
    return pos


def check_part10_structure(path: Path, transfer_syntax: str) -> None:
    """Check that a received Part 10 file holds a whole dataset: every top-level element
    (and every item of encapsulated Pixel Data) ends inside the file, and native Pixel Data
    is at least Rows × Columns × frames × samples × bits long. Big-endian and deflated
    syntaxes are not checked (pydicom reads those when the app does).

    Raises:
        HeaderError: truncated, or Pixel Data shorter than the image (status 0xC210).
        OSError: the file cannot be read.
    """
    ts = UID(transfer_syntax)
    if ts == _DEFLATED or (ts.is_transfer_syntax and not ts.is_little_endian):
        return
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 144:
            raise HeaderError("not a DICOM Part 10 file", status=_CANNOT_UNDERSTAND)
        failure = None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            whole = memoryview(mapped)
            data = None
            try:
                data = whole[_after_file_meta(whole) :]
                image, pixel_length = _walk_top_level(data, ts == _IMPLICIT_LE)
            except HeaderError as err:
                # Raised again below: its traceback holds views of the map, which must be
                # released before the map closes.
                failure, image, pixel_length = (str(err), err.status), {}, None
            finally:
                if data is not None:
                    data.release()
                whole.release()
        if failure is not None:
            raise HeaderError(failure[0], status=failure[1])
    if pixel_length is None or not ts.is_transfer_syntax or ts.is_compressed:
        return
    if not {"rows", "columns", "bits"} <= image.keys():
        return  # not an image the node can size; the app's own checks decide
    samples = 2 if image.get("subsampled") else image.get("samples", 1)
    pixels = image["rows"] * image["columns"] * image.get("frames", 1) * samples
    needed = (pixels * image["bits"] + 7) // 8
    if pixel_length < needed:
        raise HeaderError(
            f"Pixel Data holds {pixel_length} bytes; {image['rows']} rows x {image['columns']} "
            f"columns x {image.get('frames', 1)} frame(s) x {samples} "
            f"sample(s) x {image['bits']} bits need {needed}",
            status=_CANNOT_UNDERSTAND,
        )
