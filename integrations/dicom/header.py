"""Read the few header attributes the node needs from an encoded dataset, without decoding it.

The C-STORE handler must not decode whole datasets (pixel data can be hundreds of MB); it reads
the elements up to Number of Frames (0028,0008) and stops there.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

__all__ = ["HeaderError", "WireHeader", "read_header"]

_LAST_TAG = 0x00280008  # Number of Frames: every attribute we need sorts before it
_DEFLATED = "1.2.840.10008.1.2.1.99"


class HeaderError(ValueError):
    """The dataset cannot be parsed or lacks a required attribute (the message says which)."""


@dataclass(frozen=True)
class WireHeader:
    StudyInstanceUID: str
    SeriesInstanceUID: str
    PatientID: str
    IssuerOfPatientID: str
    StudyDate: str
    Modality: str
    BodyPartExamined: str
    SeriesDescription: str
    StudyDescription: str
    Manufacturer: str
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


def read_header(data: bytes | memoryview, transfer_syntax: str) -> WireHeader:
    """Parse the routing/catalog attributes of an encoded dataset (no File Meta).

    Raises:
        HeaderError: the bytes are not a parseable dataset, or Study/Series Instance UID is
            missing.
    """
    ts = UID(transfer_syntax)
    raw = bytes(data) if ts == _DEFLATED else data
    try:
        if ts == _DEFLATED:
            # Only the head is needed; inflate a bounded prefix rather than the whole dataset.
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(raw), 1 << 20)
        fp = BytesIO(raw)
        ds = read_dataset(
            fp,
            is_implicit_VR=ts.is_implicit_VR if ts.is_transfer_syntax else True,
            is_little_endian=ts.is_little_endian if ts.is_transfer_syntax else True,
            stop_when=_stop,
        )
        study = _text(ds, "StudyInstanceUID")
        series = _text(ds, "SeriesInstanceUID")
        frames_value = ds.get("NumberOfFrames", 1)
        header = WireHeader(
            StudyInstanceUID=study,
            SeriesInstanceUID=series,
            PatientID=_text(ds, "PatientID"),
            IssuerOfPatientID=_issuer(ds),
            StudyDate=_text(ds, "StudyDate"),
            Modality=_text(ds, "Modality"),
            BodyPartExamined=_text(ds, "BodyPartExamined"),
            SeriesDescription=_text(ds, "SeriesDescription"),
            StudyDescription=_text(ds, "StudyDescription"),
            Manufacturer=_text(ds, "Manufacturer"),
            frames=max(1, int(frames_value or 1)),
        )
    except HeaderError:
        raise
    except Exception as err:  # pydicom raises many types on garbage input
        raise HeaderError(f"dataset cannot be parsed: {type(err).__name__}: {err}") from None
    if not study:
        raise HeaderError("Study Instance UID (0020,000D) is missing")
    if not series:
        raise HeaderError("Series Instance UID (0020,000E) is missing")
    return header
