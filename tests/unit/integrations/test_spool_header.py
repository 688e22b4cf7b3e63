from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from radfusion.integrations.dicom.header import HeaderError, read_header
from radfusion.integrations.dicom.spool import Spool, SpoolFullError


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def header_ds() -> Dataset:
    ds = Dataset()
    ds.PatientID = "P1"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.NumberOfFrames = 3
    item = Dataset()
    item.UniversalEntityID = "1.2.826.0.1.3680043.10.1234.1"
    item.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [item]
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 16
    return ds


@pytest.mark.parametrize("implicit", [True, False])
def test_read_header(implicit: bool) -> None:
    ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    h = read_header(encode(header_ds(), implicit), ts)
    assert (h.StudyInstanceUID, h.SeriesInstanceUID, h.Modality, h.frames) == (
        "1.2.3",
        "1.2.3.4",
        "CT",
        3,
    )
    assert h.IssuerOfPatientID == "urn:oid:1.2.826.0.1.3680043.10.1234.1"


def test_deflated() -> None:
    import zlib

    raw = encode(header_ds())
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(raw) + c.flush()
    assert read_header(deflated, "1.2.840.10008.1.2.1.99").StudyInstanceUID == "1.2.3"


def test_missing_uid_and_garbage() -> None:
    ds = header_ds()
    del ds.SeriesInstanceUID
    with pytest.raises(HeaderError, match=r"Series Instance UID \(0020,000E\) is missing"):
        read_header(encode(ds), "1.2.840.10008.1.2.1")
    with pytest.raises(HeaderError):  # pydicom is lenient: garbage reads as "UID missing"
        read_header(b"\x08\x00\x18\x00UI\xff\x7f1.2", "1.2.840.10008.1.2.1")


def test_spool_paths_are_safe_and_writes_atomic(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    p = spool.path_for("1.2.3", "../../etc", "1.2.3.4")
    assert p.is_relative_to(spool.studies) and ".." not in p.parts
    size = spool.write(p, [b"abc", memoryview(b"def")])
    assert size == 6 and p.read_bytes() == b"abcdef"
    assert list(spool.tmp.iterdir()) == []
    assert list(spool.files()) == [p]
    spool.remove([p])
    assert list(spool.studies.iterdir()) == []


def test_spool_reserve(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=1 << 60)
    with pytest.raises(SpoolFullError):
        spool.write(spool.path_for("1", "2", "3"), [b"x"])
    assert list(spool.tmp.iterdir()) == []


def test_leftover_temp_files_are_cleared(tmp_path: Path) -> None:
    Spool(tmp_path)
    (tmp_path / "tmp" / "x.part").write_bytes(b"partial")
    Spool(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []


def rich_ds() -> Dataset:
    """Sequences of defined and undefined length before, around and after the wanted tags."""
    ds = header_ds()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDescription = "Thorax – Lunge"  # non-ASCII
    ds.SeriesDescription = "Lung 1.0 B70f"
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "ACME"
    ds.StudyDate = "20260101"
    code = Dataset()
    code.CodeValue = "113691"
    code.CodingSchemeDesignator = "DCM"
    inner = Dataset()
    inner.ConceptNameCodeSequence = [code]
    ds.ProcedureCodeSequence = [code, code]  # (0008,1032)
    ds.ReferencedStudySequence = [inner]  # (0008,1110): nested sequence
    ds.RequestAttributesSequence = [inner]  # (0040,0275): after the stop tag
    return ds


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("undefined", [True, False])
def test_fast_reader_agrees_with_pydicom(implicit: bool, undefined: bool) -> None:
    from radfusion.integrations.dicom import header

    ds = rich_ds()
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = undefined
            for item in elem.value:
                item.is_undefined_length_sequence_item = undefined
    data = encode(ds, implicit)
    ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    fast = header._fast(memoryview(data), implicit)
    slow = header._with_pydicom(data, pydicom.uid.UID(ts))
    assert header._header(fast) == header._header(slow)
    h = read_header(data, ts)
    assert h.StudyDescription == "Thorax – Lunge"
    assert h.IssuerOfPatientID == "urn:oid:1.2.826.0.1.3680043.10.1234.1"
    assert (h.BodyPartExamined, h.Manufacturer, h.frames) == ("CHEST", "ACME", 3)


def test_other_character_sets_and_big_endian_use_pydicom() -> None:
    ds = header_ds()
    ds.SpecificCharacterSet = "ISO_IR 144"
    ds.SeriesDescription = "Грудная клетка"
    h = read_header(encode(ds), "1.2.840.10008.1.2.1")
    assert h.SeriesDescription == "Грудная клетка"


def test_file_meta_is_valid_part10(tmp_path: Path) -> None:
    from radfusion import IMPLEMENTATION_CLASS_UID
    from radfusion.integrations.dicom.spool import file_meta

    ds = header_ds()
    path = tmp_path / "x.dcm"
    path.write_bytes(file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2.1",
                               "CT_1") + encode(ds))
    read = pydicom.dcmread(path)
    meta = read.file_meta
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle == "CT_1"
    assert meta.FileMetaInformationVersion == b"\0\1"
    assert read.StudyInstanceUID == "1.2.3"
