"""DICOM SEG on a CT grid: a reference segmentation (e.g. made in 3D Slicer), and the lung-ct
app's own SEG read the same way.

Each segment is one structure. A segment whose type, category or label says lung (SCT
39607008 Lung, 3341006 Right lung, 44029006 Left lung, or "lung" in its label) is a lung,
with its side from the laterality modifier or the label; every other segment is one
nodule/tumour. Pixels are read with highdicom by the CT's SOP Instance UIDs; a SEG whose frames
do not name their source images is placed by its plane positions instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from radfusion.evaluation.grid import (
    SEG_STORAGE,
    CtGrid,
    Mask,
    ReferenceMismatchError,
    ReferenceNodule,
    make_reference_nodule,
)

__all__ = [
    "SegReference",
    "Segment",
    "is_seg",
    "read_reference_seg",
    "read_segments",
    "seg_source_uids",
    "segment_role",
]

_LUNG_CODES: dict[str, Literal["right", "left"] | None] = {  # SCT
    "39607008": None,
    "3341006": "right",
    "44029006": "left",
}
# SCT laterality (CID 244)
_SIDE_CODES: dict[str, Literal["right", "left"]] = {"24028007": "right", "7771000": "left"}
_ANATOMY_WORDS = ("nodule", "tumour", "tumor", "mass", "lesion", "neoplasm", "cancer")
_BATCH = 8  # segments read at once: [k, r, c, 8] stays a few hundred MB on a 512² series


@dataclass(frozen=True, eq=False)
class Segment:
    """One segment of a SEG on a CT grid."""

    number: int  # SegmentNumber
    label: str  # SegmentLabel
    kind: Literal["lung", "lesion"]
    side: Literal["right", "left"] | None
    mask: Mask


@dataclass(frozen=True, eq=False)
class SegReference:
    """A reference SEG on a CT grid: its nodules (one per non-lung segment) and its lungs."""

    nodules: tuple[ReferenceNodule, ...]
    lungs: dict[str, Mask]  # "right" / "left" when the reference has them


def is_seg(path: Path) -> bool:
    """Whether ``path`` is a DICOM Segmentation Storage instance."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return False
    return str(ds.get("SOPClassUID", "")) == SEG_STORAGE


def seg_source_uids(path: Path) -> tuple[str, list[str]]:
    """The SEG's StudyInstanceUID (its source's study) and the SeriesInstanceUIDs its
    ReferencedSeriesSequence names.

    Raises:
        InvalidDicomError, OSError: not a readable DICOM file.
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    series = [str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence") or []]
    return str(ds.get("StudyInstanceUID", "")), series


def _code(item: Dataset, sequence: str) -> Dataset | None:
    seq = item.get(sequence) or []
    return seq[0] if len(seq) else None


def _side_from(item: Dataset | None) -> Literal["right", "left"] | None:
    if item is None:
        return None
    for modifier in item.get("SegmentedPropertyTypeModifierCodeSequence") or []:
        side = _SIDE_CODES.get(str(modifier.get("CodeValue", "")))
        if side:
            return side
    return None


def segment_role(
    item: Dataset,
) -> tuple[Literal["lung", "lesion"], Literal["right", "left"] | None]:
    """Whether a SegmentSequence item is a lung (and which) or a lesion (nodule/tumour)."""
    label = str(item.get("SegmentLabel", "")).lower()
    kind_code = _code(item, "SegmentedPropertyTypeCodeSequence")
    value = str(kind_code.get("CodeValue", "")) if kind_code is not None else ""
    meaning = str(kind_code.get("CodeMeaning", "")).lower() if kind_code is not None else ""
    lesion_words = any(w in label or w in meaning for w in _ANATOMY_WORDS)
    is_lung = value in _LUNG_CODES or (
        not lesion_words and ("lung" in label or meaning.endswith("lung"))
    )
    if not is_lung:
        return "lesion", None
    side = _LUNG_CODES.get(value) or _side_from(kind_code)
    if side is None:
        for region in item.get("AnatomicRegionSequence") or []:
            for modifier in region.get("AnatomicRegionModifierSequence") or []:
                side = side or _SIDE_CODES.get(str(modifier.get("CodeValue", "")))
    if side is None:
        words = (label + " " + meaning).split()
        side = "right" if "right" in words else "left" if "left" in words else None
    return "lung", side


def read_segments(path: Path, grid: CtGrid) -> list[Segment]:
    """Every segment of the SEG at ``path`` as a mask on ``grid``.

    Raises:
        ReferenceMismatchError: the SEG is of another series, or does not fit its geometry.
        ValueError, InvalidDicomError: not a readable SEG.
    """
    seg = hd.seg.segread(path)
    referenced = {str(i.SeriesInstanceUID) for i in seg.get("ReferencedSeriesSequence") or []}
    if referenced and grid.SeriesInstanceUID not in referenced:
        raise ReferenceMismatchError(f"{Path(path).name} segments another series")
    items = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    numbers = sorted(items)
    out = []
    for start in range(0, len(numbers), _BATCH):
        batch = numbers[start : start + _BATCH]
        pixels = _pixels(seg, grid, batch)
        for i, n in enumerate(batch):
            kind, side = segment_role(items[n])
            label = str(items[n].get("SegmentLabel", f"Segment {n}"))
            out.append(Segment(n, label, kind, side, Mask.from_full(pixels[..., i] > 0)))
        del pixels
    return out


def _pixels(seg: hd.seg.Segmentation, grid: CtGrid, numbers: Sequence[int]) -> np.ndarray:
    """[k, r, c, segment] on the grid, by source instance or else by plane position."""
    try:
        return seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(grid.sop_uids),
            segment_numbers=list(numbers),
            combine_segments=False,
            skip_overlap_checks=True,
            dtype=np.uint8,
        )
    except (ValueError, KeyError, AttributeError, RuntimeError):
        pass  # frames without source image references (some tools omit them)
    try:
        volume = seg.get_volume(segment_numbers=list(numbers), dtype=np.uint8)
    except (ValueError, RuntimeError) as err:
        raise ReferenceMismatchError(f"the SEG's frames cannot be placed: {err}") from None
    return volume_on_grid(
        np.asarray(volume.array),
        np.asarray(volume.affine, dtype=float),
        grid,
    )


def volume_on_grid(array: np.ndarray, affine: np.ndarray, grid: CtGrid) -> np.ndarray:
    """Place a [i, j, k, channel] array with a 4×4 index → LPS ``affine`` onto ``grid`` as
    [k, r, c, channel]; voxels outside the grid are dropped.

    Raises:
        ReferenceMismatchError: the array's axes or spacing are not the grid's, or its voxels
            fall between the grid's.
    """
    iop = np.asarray(grid.orientation, dtype=float)
    grid_dirs = [np.cross(iop[:3], iop[3:]), iop[3:], iop[:3]]  # along k, r, c
    spacing = grid.spacing_mm
    origin = np.asarray(grid.first_position, dtype=float)
    perm, starts, flips = [0, 0, 0], [0, 0, 0], [False, False, False]
    corner = affine[:3, 3]
    for axis in range(3):
        step = affine[:3, axis]
        length = float(np.linalg.norm(step))
        dots = [float(step @ d) / length for d in grid_dirs]
        b = int(np.argmax(np.abs(dots)))
        if abs(dots[b]) < 0.999 or abs(length - spacing[b]) > 1e-3 * spacing[b] + 1e-4:
            raise ReferenceMismatchError("the SEG's geometry is not the CT series' grid")
        perm[b], flips[b] = axis, dots[b] < 0
    for b in range(3):
        offset = float((corner - origin) @ grid_dirs[b]) / spacing[b]
        if abs(offset - round(offset)) > 0.1:
            raise ReferenceMismatchError("the SEG's voxels fall between the CT's voxels")
        starts[b] = round(offset)
    placed = np.transpose(array, (*perm, 3))
    for b in range(3):
        if flips[b]:
            placed = np.flip(placed, axis=b)
            starts[b] -= placed.shape[b] - 1
    out = np.zeros((*grid.shape, array.shape[3]), dtype=array.dtype)
    src, dst = [], []
    for b in range(3):
        lo, hi = max(starts[b], 0), min(starts[b] + placed.shape[b], grid.shape[b])
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo - starts[b], hi - starts[b]))
    out[tuple(dst)] = placed[tuple(src)]
    return out


def read_reference_seg(path: Path, grid: CtGrid) -> SegReference:
    """A reference SEG on ``grid``: each non-lung segment one reference nodule (readers None;
    its consensus and union are the segment), lungs by side.

    Raises:
        ReferenceMismatchError, ValueError: as :func:`read_segments`.
    """
    nodules: list[ReferenceNodule] = []
    lungs: dict[str, Mask] = {}
    for segment in read_segments(path, grid):
        if segment.kind == "lung":
            if segment.side is not None:
                lungs[segment.side] = segment.mask
            continue
        if not segment.mask.voxels:
            continue
        full = segment.mask.full()
        nodules.append(make_reference_nodule(segment.label, None, full, full, grid))
    return SegReference(tuple(nodules), lungs)
