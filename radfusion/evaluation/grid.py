"""What every reference and result is compared on: a CT series' voxel grid, masks on it, and
the reference nodules made from LIDC outlines or a reference SEG.

Arrays are indexed ``[k, r, c]``: slice (ascending along the slice normal, i.e. from the feet
for an axial head-first series), row, column; the same order as
:func:`radfusion.evaluation.synthetic.seg_label_volume`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from scipy.spatial import ConvexHull, QhullError

from radfusion.errors import RadfusionError

__all__ = [
    "CT_IMAGE_STORAGE",
    "SEG_STORAGE",
    "CtGrid",
    "Mask",
    "ReferenceMismatchError",
    "ReferenceNodule",
    "find_ct_series",
    "grid_from_files",
    "kernel_class",
    "longest_axial_diameter_mm",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


class ReferenceMismatchError(RadfusionError, ValueError):
    """A reference does not fit the CT series it names (unknown slice, outside the image,
    another geometry)."""


@dataclass(frozen=True)
class CtGrid:
    """The voxel grid of one single-frame CT series (CT Image Storage), slices sorted along the
    slice normal.

    ``positions_mm`` are ImagePositionPatient projected on the normal; ``z_mm`` are
    ImagePositionPatient's z (what LIDC's ``imageZposition`` holds).
    """

    StudyInstanceUID: str
    SeriesInstanceUID: str
    files: tuple[Path, ...]
    sop_uids: tuple[str, ...]
    positions_mm: tuple[float, ...]
    z_mm: tuple[float, ...]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    slice_spacing_mm: float  # median distance between slice centres
    SliceThickness: float | None
    ConvolutionKernel: str  # "" when absent; several values joined with "\\"
    first_position: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))
    orientation: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.sop_uids), self.rows, self.columns)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along (k, r, c)."""
        return (self.slice_spacing_mm, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def voxel_ml(self) -> float:
        return math.prod(self.spacing_mm) / 1000.0

    def slice_index(self, sop_uid: str) -> int | None:
        """The slice of an image by its SOPInstanceUID, or None when not in this series."""
        try:
            return self.sop_uids.index(sop_uid)
        except ValueError:
            return None

    def slice_at_z(self, z_mm: float) -> int | None:
        """The slice whose ImagePositionPatient z is within half a slice spacing of ``z_mm``."""
        z = np.asarray(self.z_mm)
        k = int(np.argmin(np.abs(z - z_mm)))
        return k if abs(z[k] - z_mm) <= 0.5 * self.slice_spacing_mm + 1e-3 else None


def grid_from_files(files: Sequence[Path]) -> CtGrid:
    """The grid of one CT series from its files' headers (pixels are not read).

    Raises:
        ValueError: no files, or the files are not one series of parallel equal-sized slices.
    """
    if not files:
        raise ValueError("no CT files")
    heads = [(Path(f), pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
    first = heads[0][1]
    series = str(first.SeriesInstanceUID)
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    for _, h in heads:
        if str(h.SeriesInstanceUID) != series:
            raise ValueError("the files are more than one series")
        if (int(h.Rows), int(h.Columns)) != (int(first.Rows), int(first.Columns)):
            raise ValueError("the series' images differ in size")
        if not np.allclose(np.asarray(h.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise ValueError("the series' images differ in orientation")
    heads.sort(key=lambda fh: float(np.asarray(fh[1].ImagePositionPatient, dtype=float) @ normal))
    positions = [float(np.asarray(h.ImagePositionPatient, dtype=float) @ normal) for _, h in heads]
    gaps = np.diff(positions)
    if len(gaps) and np.min(gaps) <= 1e-3:
        raise ValueError("two images of the series share a position")
    spacing = float(np.median(gaps)) if len(gaps) else float(first.get("SliceThickness") or 1.0)
    thickness = first.get("SliceThickness")
    kernel = first.get("ConvolutionKernel")
    if isinstance(kernel, Iterable) and not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    ps = [float(v) for v in first.PixelSpacing]
    x0, y0, z0 = (float(v) for v in heads[0][1].ImagePositionPatient)  # three: @ normal above
    return CtGrid(
        StudyInstanceUID=str(first.StudyInstanceUID),
        SeriesInstanceUID=series,
        files=tuple(f for f, _ in heads),
        sop_uids=tuple(str(h.SOPInstanceUID) for _, h in heads),
        positions_mm=tuple(positions),
        z_mm=tuple(float(h.ImagePositionPatient[2]) for _, h in heads),
        rows=int(first.Rows),
        columns=int(first.Columns),
        pixel_spacing=(ps[0], ps[1]),
        slice_spacing_mm=spacing,
        SliceThickness=float(thickness) if thickness not in (None, "") else None,
        ConvolutionKernel=str(kernel or ""),
        first_position=(x0, y0, z0),
        orientation=tuple(float(v) for v in iop),
    )


def find_ct_series(input_dir: Path) -> dict[str, CtGrid]:
    """Every single-frame CT series under ``input_dir`` (searched recursively), by
    SeriesInstanceUID. Files that are not DICOM, and other objects, are skipped.

    Raises:
        ValueError: a series' images are inconsistent (see :func:`grid_from_files`).
    """
    by_series: dict[str, list[Path]] = {}
    for path in sorted(p for p in Path(input_dir).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if str(ds.get("SOPClassUID", "")) != CT_IMAGE_STORAGE or "SeriesInstanceUID" not in ds:
            continue
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return {uid: grid_from_files(files) for uid, files in by_series.items()}


def kernel_class(convolution_kernel: str) -> Literal["soft", "sharp", "unknown"]:
    """Soft (soft-tissue, standard) or sharp (lung, bone, edge) reconstruction kernel from
    ConvolutionKernel, by the vendors' usual names; "unknown" when the name says neither.

    Kept local to evaluation so its report does not depend on how the app selects series.
    """
    k = convolution_kernel.upper().strip()
    if not k:
        return "unknown"
    if any(w in k for w in ("LUNG", "BONE", "EDGE", "SHARP", "DETAIL")):
        return "sharp"
    if any(w in k for w in ("STANDARD", "SOFT", "SMOOTH", "BODY")):
        return "soft"
    # Siemens (B30f, Br40, I31f, Bl57), Canon (FC01, FC51) and Philips (A, B, C soft; D, L sharp)
    digits = "".join(ch for ch in k if ch.isdigit())
    if k[0] in "BIQ" and len(digits) >= 2:
        return "sharp" if int(digits[:2]) >= 50 else "soft"
    if k.startswith("FC") and len(digits) >= 2:
        return "sharp" if int(digits[:2]) >= 50 else "soft"
    if k in ("A", "B", "C"):
        return "soft"
    if k in ("D", "E", "L", "YA", "YB", "YC"):
        return "sharp"
    return "unknown"


@dataclass(frozen=True, eq=False)
class Mask:
    """A boolean mask on a grid of ``shape``, kept as its bounding box (``array`` starts at
    ``offset``), so that many nodules of a large series stay small."""

    shape: tuple[int, int, int]
    offset: tuple[int, int, int]
    array: np.ndarray

    @classmethod
    def from_full(cls, full: np.ndarray) -> Mask:
        full = np.asarray(full, dtype=bool)
        if full.ndim != 3:
            raise ValueError("a mask is [k, r, c]")
        shape = (int(full.shape[0]), int(full.shape[1]), int(full.shape[2]))
        if not full.any():
            return cls(shape, (0, 0, 0), np.zeros((0, 0, 0), dtype=bool))
        lo, hi = [], []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(full.any(axis=other))
            lo.append(int(idx[0]))
            hi.append(int(idx[-1]) + 1)
        box = full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy()
        return cls(shape, (lo[0], lo[1], lo[2]), box)

    def full(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        k, r, c = self.offset
        dk, dr, dc = self.array.shape
        out[k : k + dk, r : r + dr, c : c + dc] = self.array
        return out

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.array))

    def centroid(self) -> np.ndarray:
        """Mean (k, r, c) index of the mask's voxels.

        Raises:
            ValueError: the mask is empty.
        """
        idx = np.nonzero(self.array)
        if not len(idx[0]):
            raise ValueError("empty mask has no centroid")
        return np.array([float(np.mean(i)) + o for i, o in zip(idx, self.offset, strict=True)])

    def contains(self, point: Sequence[float] | np.ndarray) -> bool:
        """Whether the voxel nearest to the (k, r, c) ``point`` is in the mask."""
        local = [round(p) - o for p, o in zip(point, self.offset, strict=True)]
        if any(v < 0 or v >= s for v, s in zip(local, self.array.shape, strict=True)):
            return False
        return bool(self.array[local[0], local[1], local[2]])


def longest_axial_diameter_mm(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Longest in-plane distance between voxel centres of ``mask`` ([k, r, c]) over all its
    slices, in mm; 0 for an empty mask or a single voxel (as the app's measurement)."""
    best = 0.0
    scale = np.asarray(pixel_spacing, dtype=float)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        plane = mask[k]
        rows = np.flatnonzero(plane.any(axis=1))
        first = plane[rows].argmax(axis=1)
        last = plane.shape[1] - 1 - plane[rows, ::-1].argmax(axis=1)
        # Only the first and last voxel of each row can be the end of a longest chord.
        pts = np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)]) * scale
        if len(pts) > 3:
            with contextlib.suppress(QhullError):  # collinear: every point is a hull point
                pts = pts[ConvexHull(pts).vertices]
        d = np.linalg.norm(pts[:, None, :] - pts[None, :, :], axis=-1)
        best = max(best, float(d.max()))
    return best


@dataclass(frozen=True, eq=False)
class ReferenceNodule:
    """One reference nodule (or tumour) on a CT grid.

    ``readers`` is how many LIDC readers marked it (None for a reference SEG, which is one
    reader's work and is not subject to ``min_readers``). ``consensus`` is the voxels at least
    half of them marked (for a SEG, the segment). ``diameter_mm`` is the longest axial
    diameter of ``consensus``, or of ``union`` when no voxel reaches 50 % agreement
    (``diameter_source`` says which).
    """

    label: str
    readers: int | None
    union: Mask
    consensus: Mask
    diameter_mm: float
    diameter_source: Literal["consensus", "union"]
    volume_ml: float  # of consensus (of union when consensus is empty)

    def counts(self, *, min_readers: int, min_diameter_mm: float) -> bool:
        """Whether this nodule is in the reference set (LIDC convention: marked by enough
        readers and large enough)."""
        enough = self.readers is None or self.readers >= min_readers
        return enough and self.diameter_mm >= min_diameter_mm


def make_reference_nodule(
    label: str,
    readers: int | None,
    union: np.ndarray,
    consensus: np.ndarray,
    grid: CtGrid,
) -> ReferenceNodule:
    """A :class:`ReferenceNodule` from full-grid masks (the diameter and volume measured)."""
    source: Literal["consensus", "union"] = "consensus" if consensus.any() else "union"
    measured = consensus if source == "consensus" else union
    return ReferenceNodule(
        label=label,
        readers=readers,
        union=Mask.from_full(union),
        consensus=Mask.from_full(consensus),
        diameter_mm=longest_axial_diameter_mm(measured, grid.pixel_spacing),
        diameter_source=source,
        volume_ml=float(np.count_nonzero(measured)) * grid.voxel_ml,
    )
