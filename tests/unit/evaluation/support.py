"""Helpers for the evaluation tests: the real LIDC case, SEGs written with highdicom, and tiny
LIDC XML documents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from radfusion.evaluation.grid import CtGrid

LIDC = Path("/work/shared/data/lidc-idri-0001")
LIDC_DICOM = LIDC / "dicom"
LIDC_XML = LIDC / "annotations" / "069.xml"


def require_lidc() -> None:
    """Skip when the real case is not on this machine."""
    if not (LIDC_DICOM.is_dir() and LIDC_XML.is_file()):
        pytest.skip(f"the real LIDC case is not at {LIDC}")


def write_seg(path: Path, grid: CtGrid, segments: Sequence[tuple[str, np.ndarray]]) -> Path:
    """A binary SEG of ``grid`` with one segment per (label, [k, r, c] mask); a label with
    "lung" in it is written as Anatomical Structure / Lung, every other as a Neoplasm."""
    sources = [pydicom.dcmread(f) for f in grid.files]
    descriptions = []
    for n, (label, _mask) in enumerate(segments, 1):
        lung = "lung" in label.lower()
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=label,
                segmented_property_category=(
                    codes.SCT.AnatomicalStructure
                    if lung
                    else codes.SCT.MorphologicallyAbnormalStructure
                ),
                segmented_property_type=codes.SCT.Lung if lung else codes.SCT.Neoplasm,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        )
    pixels = np.stack([m for _, m in segments], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="radfusion tests",
        manufacturer_model_name="reference",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(path)
    return path


def lidc_xml(
    study: str,
    series: str,
    readers: Sequence[Sequence[Sequence[tuple[str, float, bool, Sequence[tuple[int, int]]]]]],
    *,
    namespace: bool = True,
) -> str:
    """A LidcReadMessage: per reader, per nodule, its rois as (SOP UID, z, inclusion, points)."""
    ns = ' xmlns="http://www.nih.gov"' if namespace else ""
    out = [
        f'<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage uid="1.2"{ns}>',
        "<ResponseHeader><Version>1.8.1</Version>"
        f"<SeriesInstanceUid>{series}</SeriesInstanceUid>"
        f"<StudyInstanceUID>{study}</StudyInstanceUID></ResponseHeader>",
    ]
    for nodules in readers:
        out.append("<readingSession><servicingRadiologistID>1</servicingRadiologistID>")
        for n, rois in enumerate(nodules, 1):
            out.append(f"<unblindedReadNodule><noduleID>N{n}</noduleID>")
            for sop, z, inclusion, points in rois:
                out.append(
                    f"<roi><imageZposition>{z:f} </imageZposition>"
                    f"<imageSOP_UID>{sop}</imageSOP_UID>"
                    f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>"
                )
                out.extend(
                    f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                    for x, y in points
                )
                out.append("</roi>")
            out.append("</unblindedReadNodule>")
        out.append("</readingSession>")
    out.append("</LidcReadMessage>")
    return "\n".join(out)


def square(x0: int, y0: int, size: int) -> list[tuple[int, int]]:
    """The boundary pixels of a square, in order (x = column, y = row)."""
    top = [(x, y0) for x in range(x0, x0 + size)]
    right = [(x0 + size - 1, y) for y in range(y0 + 1, y0 + size)]
    bottom = [(x, y0 + size - 1) for x in range(x0 + size - 2, x0 - 1, -1)]
    left = [(x0, y) for y in range(y0 + size - 2, y0, -1)]
    return top + right + bottom + left
