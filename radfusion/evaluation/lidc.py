"""LIDC reader XML (LidcReadMessage) → reference nodules on a CT grid.

The LIDC-IDRI convention (Armato et al., Med Phys 2011): each reader (``readingSession``)
outlines every nodule ≥ 3 mm (``unblindedReadNodule``) slice by slice (``roi``: the image by
``imageSOP_UID`` and ``imageZposition``, ``inclusion`` TRUE for the nodule, FALSE for a hole,
``edgeMap`` the boundary pixels as x = column, y = row). Nodules < 3 mm are one point and
non-nodules are ``nonNodule``: neither is outlined, so neither is a reference here.

The readers' nodules are grouped into one reference nodule when their masks overlap; its
``consensus`` is the voxels at least half of those readers marked. Parsing uses xml.etree only
(no schema, no network) and ignores namespaces, so files with or without
``xmlns="http://www.nih.gov"`` read the same.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from radfusion.errors import RadfusionError
from radfusion.evaluation.grid import (
    CtGrid,
    ReferenceMismatchError,
    ReferenceNodule,
    make_reference_nodule,
)

__all__ = [
    "LidcFormatError",
    "LidcRead",
    "Outline",
    "ReaderNodule",
    "is_lidc_xml",
    "parse_lidc_xml",
    "rasterise",
    "reference_nodules",
]


class LidcFormatError(RadfusionError, ValueError):
    """The file is not a readable LIDC reader XML (LidcReadMessage)."""


@dataclass(frozen=True)
class Outline:
    """One ``roi``: a closed contour on one image; ``points`` are (x = column, y = row)."""

    sop_uid: str
    z_mm: float | None
    inclusion: bool
    points: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ReaderNodule:
    """One reader's outlined nodule (``unblindedReadNodule`` with a contour)."""

    reader: int  # 1-based index of the readingSession in the file
    nodule_id: str
    outlines: tuple[Outline, ...]


@dataclass(frozen=True)
class LidcRead:
    """What a LidcReadMessage says: the series it reads, how many readers read it, and the
    readers' outlined nodules (points and < 3 mm marks left out)."""

    StudyInstanceUID: str | None
    SeriesInstanceUID: str | None
    readers: int
    nodules: tuple[ReaderNodule, ...]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _kids(element: ET.Element, name: str) -> Iterator[ET.Element]:
    return (e for e in element if _local(e.tag) == name)


def _text(element: ET.Element, name: str) -> str | None:
    for e in _kids(element, name):
        return (e.text or "").strip() or None
    return None


def _root(source: Path | str | bytes) -> ET.Element:
    try:
        if isinstance(source, Path):
            return ET.parse(source).getroot()
        return ET.fromstring(source)
    except (ET.ParseError, OSError) as err:
        raise LidcFormatError(f"not readable XML: {err}") from None


def is_lidc_xml(path: Path) -> bool:
    """Whether ``path`` is an XML file whose root is a LidcReadMessage (read, not guessed)."""
    try:
        for _event, element in ET.iterparse(path, events=("start",)):
            return _local(element.tag) == "LidcReadMessage"
    except (ET.ParseError, OSError):
        return False
    return False


def parse_lidc_xml(source: Path | str | bytes) -> LidcRead:
    """Parse a LIDC reader XML (a path, or the XML text).

    Raises:
        LidcFormatError: not XML, not a LidcReadMessage, or an outline with a bad coordinate.
    """
    root = _root(source)
    if _local(root.tag) != "LidcReadMessage":
        raise LidcFormatError(f"root element is {_local(root.tag)!r}, not LidcReadMessage")
    header = next(_kids(root, "ResponseHeader"), None)
    study = series = None
    if header is not None:
        study = _text(header, "StudyInstanceUID")
        series = _text(header, "SeriesInstanceUid") or _text(header, "SeriesInstanceUID")
    sessions = list(_kids(root, "readingSession"))
    nodules: list[ReaderNodule] = []
    for reader, session in enumerate(sessions, 1):
        for element in _kids(session, "unblindedReadNodule"):
            outlines = tuple(_outline(roi) for roi in _kids(element, "roi"))
            # A < 3 mm nodule is a single point per roi: marked, not outlined.
            if not any(len(o.points) > 1 for o in outlines):
                continue
            nodules.append(
                ReaderNodule(reader, _text(element, "noduleID") or f"#{len(nodules) + 1}", outlines)
            )
    return LidcRead(study, series, len(sessions), tuple(nodules))


def _outline(roi: ET.Element) -> Outline:
    points = []
    try:
        for edge in _kids(roi, "edgeMap"):
            points.append((int(_text(edge, "xCoord") or ""), int(_text(edge, "yCoord") or "")))
        z = _text(roi, "imageZposition")
        z_mm = float(z) if z is not None else None
    except ValueError as err:
        raise LidcFormatError(f"roi with a bad coordinate: {err}") from None
    inclusion = (_text(roi, "inclusion") or "TRUE").upper() != "FALSE"
    return Outline(_text(roi, "imageSOP_UID") or "", z_mm, inclusion, tuple(points))


def _slice_of(outline: Outline, grid: CtGrid) -> int:
    k = grid.slice_index(outline.sop_uid)
    if k is None and outline.z_mm is not None:
        k = grid.slice_at_z(outline.z_mm)  # some reads name images by position only
    if k is None:
        raise ReferenceMismatchError(
            f"an outline's image (z {outline.z_mm} mm) is not a slice of the CT series"
        )
    return k


def _polygon(
    points: tuple[tuple[int, int], ...], size: tuple[int, int], *, edge: bool
) -> np.ndarray:
    """Pixels inside the contour; its boundary pixels too when ``edge`` (LIDC edge maps are
    the nodule's outermost pixels, so a nodule includes them and a hole does not)."""
    image = Image.new("1", size, 0)
    draw = ImageDraw.Draw(image)
    if len(points) >= 3:
        draw.polygon(list(points), fill=1, outline=1)
    else:
        draw.line(list(points) if len(points) > 1 else list(points) * 2, fill=1)
    inside = np.array(image, dtype=bool)
    if edge:
        return inside
    boundary = Image.new("1", size, 0)
    ImageDraw.Draw(boundary).line([*points, points[0]], fill=1)
    return inside & ~np.array(boundary, dtype=bool)


def rasterise(nodule: ReaderNodule, grid: CtGrid) -> np.ndarray:
    """One reader's nodule as a [k, r, c] boolean mask on ``grid``: per slice the union of its
    inclusion contours (with their edge pixels) less its exclusion contours' interiors.

    Raises:
        ReferenceMismatchError: an outline's image is not in the series, or a point lies
            outside the image.
    """
    mask = np.zeros(grid.shape, dtype=bool)
    holes = np.zeros(grid.shape, dtype=bool)
    size = (grid.columns, grid.rows)
    for outline in nodule.outlines:
        if not outline.points:
            continue
        xs = [x for x, _ in outline.points]
        ys = [y for _, y in outline.points]
        if min(xs) < 0 or min(ys) < 0 or max(xs) >= grid.columns or max(ys) >= grid.rows:
            raise ReferenceMismatchError("an outline point lies outside the CT image")
        k = _slice_of(outline, grid)
        if outline.inclusion:
            mask[k] |= _polygon(outline.points, size, edge=True)
        else:
            holes[k] |= _polygon(outline.points, size, edge=False)
    return mask & ~holes


def reference_nodules(read: LidcRead, grid: CtGrid) -> list[ReferenceNodule]:
    """Every nodule the readers outlined, grouped across readers by overlap, on ``grid``; in
    slice order of their centroids. Which ones count is :meth:`ReferenceNodule.counts`'s call.

    A group's ``consensus`` is the voxels marked by at least half of its readers; its diameter
    is the longest axial diameter of that mask (of the union when no voxel reaches half).

    Raises:
        ReferenceMismatchError: as :func:`rasterise`.
    """
    masks = [rasterise(n, grid) for n in read.nodules]
    keep = [i for i, m in enumerate(masks) if m.any()]
    parent = {i: i for i in keep}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a_pos, a in enumerate(keep):
        for b in keep[a_pos + 1 :]:
            if find(a) != find(b) and np.logical_and(masks[a], masks[b]).any():
                parent[find(b)] = find(a)
    groups: dict[int, list[int]] = {}
    for i in keep:
        groups.setdefault(find(i), []).append(i)

    made = []
    for members in groups.values():
        by_reader: dict[int, np.ndarray] = {}
        for i in members:
            reader = read.nodules[i].reader
            by_reader[reader] = by_reader.get(reader, np.zeros(grid.shape, bool)) | masks[i]
        votes = np.zeros(grid.shape, dtype=np.uint8)
        for m in by_reader.values():
            votes += m
        readers = len(by_reader)
        union = votes > 0
        consensus = votes * 2 >= readers
        consensus &= union
        made.append((readers, union, consensus))
    made.sort(key=lambda t: tuple(np.argwhere(t[1]).mean(axis=0)))
    return [
        make_reference_nodule(f"LIDC nodule {n}", readers, union, consensus, grid)
        for n, (readers, union, consensus) in enumerate(made, 1)
    ]
