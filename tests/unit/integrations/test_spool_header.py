from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from radfusion.integrations.dicom.header import HeaderError, check_part10_structure, read_header
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
    assert (h.StudyInstanceUID, h.SeriesInstanceUID, h.attributes["Modality"], h.frames) == (
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


def test_spool_paths_are_safe_and_take_renames(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=True)
    p = spool.path_for("1.2.3", "../../etc", "1.2.3.4")
    assert p.is_relative_to(spool.studies) and ".." not in p.parts
    (spool.tmp / "in.dcm").write_bytes(b"abcdef")
    size = spool.take(spool.tmp / "in.dcm", p)
    assert size == 6 and p.read_bytes() == b"abcdef"
    assert list(spool.tmp.iterdir()) == []
    assert list(spool.files()) == [p]
    spool.remove([p])
    assert list(spool.studies.iterdir()) == []


def test_spool_reserve(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=1 << 60)
    (spool.tmp / "in.dcm").write_bytes(b"x")
    with pytest.raises(SpoolFullError):
        spool.take(spool.tmp / "in.dcm", spool.path_for("1", "2", "3"))
    assert list(spool.files()) == []


def test_leftover_temp_files_are_cleared(tmp_path: Path) -> None:
    Spool(tmp_path)
    (tmp_path / "tmp" / "x.part").write_bytes(b"partial")
    # A prior that was being retrieved when the process died: a folder of its own.
    (tmp_path / "tmp" / "radfusion-prior-x").mkdir()
    (tmp_path / "tmp" / "radfusion-prior-x" / "00000.dcm").write_bytes(b"prior")
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
    ds.StationName = "CT01"
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
    assert h.attributes["StudyDescription"] == "Thorax – Lunge"
    assert h.attributes["StationName"] == "CT01"
    assert h.IssuerOfPatientID == "urn:oid:1.2.826.0.1.3680043.10.1234.1"
    assert (h.attributes["BodyPartExamined"], h.attributes["Manufacturer"], h.frames) == (
        "CHEST",
        "ACME",
        3,
    )


def test_other_character_sets_and_big_endian_use_pydicom() -> None:
    ds = header_ds()
    ds.SpecificCharacterSet = "ISO_IR 144"
    ds.SeriesDescription = "Грудная клетка"
    h = read_header(encode(ds), "1.2.840.10008.1.2.1")
    assert h.attributes["SeriesDescription"] == "Грудная клетка"


def test_part10_prefix_read_falls_back_when_header_is_beyond_prefix(tmp_path: Path) -> None:
    from radfusion.integrations.dicom.header import read_part10_header

    ds = rich_ds()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDescription = "Thorax"
    ds.add_new(0x00090010, "LO", "RADFUSION TEST")  # a private block pushes the UIDs
    ds.add_new(0x00091010, "OB", b"\0" * 5000)  # past a small prefix
    path = tmp_path / "big.dcm"
    meta = Dataset()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.45"
    ds.file_meta = pydicom.dataset.FileMetaDataset(meta)
    ds.save_as(path, enforce_file_format=True)
    for prefix in (64, 4096, 1 << 16):
        h = read_part10_header(path, "1.2.840.10008.1.2.1", prefix=prefix)
        assert (h.StudyInstanceUID, h.SeriesInstanceUID, h.frames) == ("1.2.3", "1.2.3.4", 3)
    (tmp_path / "raw.bin").write_bytes(b"\0" * 200)
    with pytest.raises(HeaderError, match="Part 10"):
        read_part10_header(tmp_path / "raw.bin", "1.2.840.10008.1.2.1")


def test_every_routing_attribute_is_a_standard_keyword_the_reader_reaches() -> None:
    """The one table of routing attributes: standard keywords (they name catalog columns)
    whose tags sort before Number of Frames, where the reader stops."""
    from pydicom.datadict import keyword_for_tag

    from radfusion.routing import SERIES_ATTRIBUTES

    for keyword, tag in SERIES_ATTRIBUTES.items():
        assert keyword_for_tag(tag) == keyword and keyword.isalpha()
        assert tag < 0x00280008


def _part10(path: Path, ds: Dataset, transfer_syntax: str) -> Path:
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True, implicit_vr=transfer_syntax == IMPLICIT)
    return path


IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"


def image_ds(rows: int = 8, columns: int = 8) -> Dataset:
    ds = header_ds()
    del ds.NumberOfFrames
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = rows, columns
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x00" * (rows * columns)
    return ds


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT, EXPLICIT])
def test_a_whole_image_passes_the_structure_check(tmp_path: Path, transfer_syntax: str) -> None:
    check_part10_structure(
        _part10(tmp_path / "ok.dcm", image_ds(), transfer_syntax), transfer_syntax
    )


def test_encapsulated_pixel_data_passes_whole_and_fails_cut(tmp_path: Path) -> None:
    ds = image_ds(rows=32, columns=32)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    ds.compress(pydicom.uid.RLELossless, encoding_plugin="pydicom")
    path = _part10(tmp_path / "rle.dcm", ds, pydicom.uid.RLELossless)
    check_part10_structure(path, pydicom.uid.RLELossless)
    path.write_bytes(path.read_bytes()[:-40])  # inside the last fragment
    with pytest.raises(HeaderError, match="truncated"):
        check_part10_structure(path, pydicom.uid.RLELossless)


@pytest.mark.parametrize("frames", [1, 3])
def test_pixel_data_shorter_than_the_image_is_refused(tmp_path: Path, frames: int) -> None:
    ds = image_ds()
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.PixelData = ds.PixelData * (frames - 1)  # one frame short
    else:
        ds.PixelData = ds.PixelData[:-2]
    path = _part10(tmp_path / "short.dcm", ds, EXPLICIT)
    with pytest.raises(HeaderError, match="Pixel Data holds") as err:
        check_part10_structure(path, EXPLICIT)
    assert err.value.status == 0xC210


def test_one_bit_images_are_sized_in_bits(tmp_path: Path) -> None:
    ds = image_ds(rows=8, columns=8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = b"\xff" * 8  # 64 pixels at one bit each
    check_part10_structure(_part10(tmp_path / "bits.dcm", ds, EXPLICIT), EXPLICIT)


@pytest.mark.parametrize("implicit", [True, False])
def test_sequences_nested_too_deep_are_refused_at_any_length_encoding(
    tmp_path: Path, implicit: bool
) -> None:
    ds = image_ds()
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(40):  # defined lengths: pydicom writes them so
        outer = Dataset()
        outer.ContentSequence = [inner]
        inner = outer
    ds.ContentSequence = [inner]
    ts = IMPLICIT if implicit else EXPLICIT
    with pytest.raises(HeaderError, match="nested deeper than 32"):
        check_part10_structure(_part10(tmp_path / "deep.dcm", ds, ts), ts)


def test_encoding_that_disagrees_with_the_transfer_syntax_is_named() -> None:
    data = encode(header_ds(), implicit=True)
    with pytest.raises(HeaderError, match="encoded Implicit VR, but was sent as Explicit VR"):
        read_header(data, EXPLICIT)
    data = encode(header_ds(), implicit=False)
    with pytest.raises(HeaderError, match="encoded Explicit VR, but was sent as Implicit VR"):
        read_header(data, IMPLICIT)


def test_every_whole_file_of_the_real_corpus_passes_and_the_broken_ones_are_named() -> None:
    """pydicom's test files (GE, dcmtk, GDCM writers; JPEG, JPEG-LS, JPEG 2000, RLE, deflate,
    big endian, YBR_FULL_422, RT, SR, multi-frame): the whole ones pass the structure check,
    the ones truncated on purpose do not."""
    from pydicom.data import get_testdata_file

    truncated = {"MR_truncated.dcm", "rtplan_truncated.dcm"}
    folder = Path(get_testdata_file("CT_small.dcm")).parent
    checked = 0
    for path in sorted(folder.glob("*.dcm")):
        try:
            ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID")
        except pydicom.errors.InvalidDicomError:
            continue  # no File Meta: not a Part 10 file a C-STORE could have produced
        if ts is None or path.name == "SC_rgb_jpeg.dcm":  # implicit VR labelled as JPEG
            continue
        if path.name in truncated:
            with pytest.raises(HeaderError, match="truncated"):
                check_part10_structure(path, str(ts))
        else:
            check_part10_structure(path, str(ts))
        checked += 1
    assert checked >= 70
