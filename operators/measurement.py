"""Measurement: what the detection found (lungs, nodules) → findings with measurements.

Each finding gets its volume, longest axial diameter (with the end points, for viewers), mean
and SD of HU and centroid; a nodule also its detection score. Lungs are measured without the
nodules inside them. A study with no lungs is out of scope, and one whose lungs failed the
plausibility checks is reported as not reliably analysable: no findings are invented for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.uid import generate_uid
from scipy.spatial import ConvexHull, QhullError

from radfusion.operators.detection import Anatomy
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.results import Finding, SegmentationResult
from radfusion.operators.volume import Volume

log = logging.getLogger("radfusion.operators.measurement")

__all__ = ["Measured", "MeasurementOperator", "measure"]

MIN_LUNG_ML = 50.0  # below this in total, the input is not a chest CT with lungs


@dataclass(frozen=True)
class Measured:
    """The measurement step's output: findings, or the reason the input was out of scope."""

    result: SegmentationResult | None
    out_of_scope_reason: str | None
    statements: tuple[str, ...] = ()  # for the SR: what was decided and why


Box = tuple[slice, slice, slice]
"""[k, r, c] slices of the volume (steps of 1)."""


@dataclass(frozen=True, eq=False)
class _Region:
    """A structure (or a piece of one) as a mask inside its bounding box of the volume.

    A lung (~1.7 M voxels at 512², 1 mm) has a box of about a tenth of the volume; a boolean
    mask on it is far cheaper to count, measure and paint than voxel index lists (no sorting,
    no fancy indexing, a byte per voxel instead of 24) and gives the same voxels in the same
    (k, r, c) order.
    """

    box: Box
    mask: np.ndarray  # bool, the box's shape
    count: int  # voxels in the mask

    @property
    def origin(self) -> tuple[int, int, int]:
        return (self.box[0].start, self.box[1].start, self.box[2].start)


def _index_sums(pieces: list[_Region]) -> tuple[int, np.ndarray]:
    """Voxel count and the exact integer sums of the (c, r, k) indices over ``pieces``."""
    total = 0
    sums = np.zeros(3, dtype=np.int64)
    for piece in pieces:
        per_row = piece.mask.sum(axis=2, dtype=np.int64)  # [k, r]
        per_column = piece.mask.sum(axis=(0, 1), dtype=np.int64)  # [c]
        k0, r0, c0 = piece.origin
        for axis, (offset, counts) in enumerate(
            ((c0, per_column), (r0, per_row.sum(axis=0)), (k0, per_row.sum(axis=1)))
        ):
            sums[axis] += int(np.dot(np.arange(offset, offset + len(counts)), counts))
        total += piece.count
    return total, sums


def _centroid(pieces: list[_Region], affine: np.ndarray) -> np.ndarray:
    """LPS centroid (x, y, z, 1) of the voxel centres of ``pieces``.

    The index sums are exact integers, so this is bit for bit the mean of the voxel index
    lists the measurement used to build (numpy sums integer-valued float64 exactly)."""
    total, sums = _index_sums(pieces)
    c, r, k = (float(v) / total for v in sums)
    return affine @ np.array([c, r, k, 1.0])


def _row_extremes(pieces: list[_Region]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first and last voxel of each (slice, row) of ``pieces`` together, sorted by
    (k, r, c): the only candidates for an in-plane diameter's end points, and a few per cent
    of a lung's voxels. A row with one voxel gives it once."""
    ks, rs, firsts, lasts = [], [], [], []
    for piece in pieces:
        mask = piece.mask
        k0, r0, c0 = piece.origin
        k, r = np.nonzero(mask.any(axis=2))
        columns = mask.shape[2]
        first = mask.argmax(axis=2)[k, r]
        last = columns - 1 - mask[:, :, ::-1].argmax(axis=2)[k, r]
        ks.append(k + k0)
        rs.append(r + r0)
        firsts.append(first + c0)
        lasts.append(last + c0)
    kk, rr = np.concatenate(ks).astype(np.intp), np.concatenate(rs).astype(np.intp)
    first, last = np.concatenate(firsts).astype(np.intp), np.concatenate(lasts).astype(np.intp)
    if len(pieces) > 1:  # pieces may share rows: a row's ends are the outermost of them
        order = np.lexsort((rr, kk))
        kk, rr, first, last = kk[order], rr[order], first[order], last[order]
        starts = np.flatnonzero(np.concatenate([[True], (np.diff(kk) != 0) | (np.diff(rr) != 0)]))
        first = np.minimum.reduceat(first, starts)
        last = np.maximum.reduceat(last, starts)
        kk, rr = kk[starts], rr[starts]
    two = last != first
    n = len(kk) + int(np.count_nonzero(two))
    slot = np.arange(len(kk)) + np.concatenate([[0], np.cumsum(two)[:-1]])  # first's position
    out_k, out_r, out_c = (np.empty(n, dtype=np.intp) for _ in range(3))
    out_k[slot], out_r[slot], out_c[slot] = kk, rr, first
    out_k[slot[two] + 1], out_r[slot[two] + 1], out_c[slot[two] + 1] = kk[two], rr[two], last[two]
    return out_k, out_r, out_c


def _longest_axial_diameter(
    pieces: list[_Region], affine: np.ndarray
) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """Longest in-plane distance between voxel centres over all slices, with its end points
    (on the first slice that reaches it). A region of one voxel per slice has diameter 0,
    both ends on its first voxel (never the origin: viewers draw the ends on the images)."""
    kk, rr, cc = _row_extremes(pieces)
    splits = np.flatnonzero(np.diff(kk)) + 1
    first = affine @ np.array([cc[0], rr[0], kk[0], 1.0])
    best, ends = 0.0, (first[:3], first[:3])
    for k_part, r_part, c_part in zip(
        np.split(kk, splits), np.split(rr, splits), np.split(cc, splits), strict=True
    ):
        pts = np.stack([c_part, r_part, k_part, np.ones_like(k_part)], axis=1).astype(float)
        mm = (affine @ pts.T).T[:, :3]
        if len(mm) > 3:
            with contextlib.suppress(QhullError):  # collinear: all points are hull points
                mm = mm[ConvexHull(mm[:, :2]).vertices]
        d = np.linalg.norm(mm[:, None, :] - mm[None, :, :], axis=-1)
        i, j = np.unravel_index(int(np.argmax(d)), d.shape)
        if d[i, j] > best:
            best, ends = float(d[i, j]), (mm[i], mm[j])
    return best, ends


def _finding(
    kind: str,
    side: str,
    number: int,
    tracking_id: str,
    pieces: list[_Region],
    volume: Volume,
    uid_root: str,
    *,
    detection_score: float | None = None,
) -> Finding:
    """The finding made of ``pieces`` (a lung and its fragments, or one tumour) with its
    measurements on ``volume``."""
    voxel_mm3 = float(np.prod(volume.spacing_mm))
    # In the pieces' order, each in (k, r, c) order: the same values, summed in the same order.
    values = np.concatenate([volume.hu[p.box][p.mask] for p in pieces]).astype(np.float64)
    centroid = _centroid(pieces, volume.affine)
    diameter, (a, b) = _longest_axial_diameter(pieces, volume.affine)
    series = str(volume.source_images[0].get("SeriesInstanceUID", ""))
    return Finding(
        kind=kind,
        side=side,
        segment_number=number,
        tracking_id=tracking_id,
        tracking_uid=str(generate_uid(prefix=uid_root, entropy_srcs=[series, tracking_id])),
        volume_mm3=float(len(values)) * voxel_mm3,
        longest_axial_diameter_mm=diameter,
        mean_hu=float(values.mean()),
        sd_hu=float(values.std()),
        centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        diameter_endpoints_lps=(
            (float(a[0]), float(a[1]), float(a[2])),
            (float(b[0]), float(b[1]), float(b[2])),
        ),
        detection_score=detection_score,
    )


def _region(mask: np.ndarray, offset: tuple[int, int, int] = (0, 0, 0)) -> _Region | None:
    """The voxels of ``mask`` (placed at ``offset`` in the volume) as a region cropped to its
    bounding box; None when empty."""
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    if not len(ks):
        return None
    plane = np.asarray(mask.any(axis=0))
    rs, cs = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    inner = (
        slice(int(ks[0]), int(ks[-1]) + 1),
        slice(int(rs[0]), int(rs[-1]) + 1),
        slice(int(cs[0]), int(cs[-1]) + 1),
    )
    piece = mask[inner]
    box = (
        slice(offset[0] + inner[0].start, offset[0] + inner[0].stop),
        slice(offset[1] + inner[1].start, offset[1] + inner[1].stop),
        slice(offset[2] + inner[2].start, offset[2] + inner[2].stop),
    )
    return _Region(box, piece.copy(), int(np.count_nonzero(piece)))


def measure(anatomy: Anatomy, volume: Volume, *, uid_root: str) -> Measured:
    """Turn what the detection found into findings with measurements.

    Segment numbers: 1 right lung, 2 left lung (only those found), then the reported nodules,
    best detection score first. Lung volumes exclude the nodules. Lungs that failed the
    plausibility checks give no findings, only the reason.

    Raises:
        ValueError: the anatomy's masks do not have the volume's shape.
    """
    fields = anatomy.fields
    if fields.right.shape != volume.hu.shape:
        raise ValueError(f"lung masks shape {fields.right.shape} != volume {volume.hu.shape}")
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    lung_ml = float(np.count_nonzero(fields.right) + np.count_nonzero(fields.left)) * voxel_ml
    if lung_ml < MIN_LUNG_ML:
        return Measured(
            None,
            f"no lungs found (lung volume {lung_ml:.0f} mL < {MIN_LUNG_ML:.0f} mL): the input "
            "does not appear to be a chest CT",
        )
    if fields.problems:
        return Measured(
            None,
            "the lungs could not be segmented reliably ("
            + "; ".join(fields.problems)
            + "), so no measurements are reported",
        )
    labels = np.zeros(volume.hu.shape, dtype=np.uint8)
    nodules: list[tuple[_Region, float]] = []
    for candidate in anatomy.nodules:
        own = candidate.mask & (labels[candidate.box] == 0)  # overlaps: the better one keeps it
        region = _region(own, tuple(s.start for s in candidate.box))
        if region is None:
            continue
        _paint(labels, [region], 255)
        nodules.append((region, candidate.score))
    findings = []
    number = 0
    lung_x = {}
    for side, mask in (("right", fields.right), ("left", fields.left)):
        lung = _region(mask & (labels == 0))
        if lung is None:
            continue
        number += 1
        _paint(labels, [lung], number)
        lung_x[side] = float(_centroid([lung], volume.affine)[0])
        findings.append(
            _finding("lung", side, number, f"{side.capitalize()} lung", [lung], volume, uid_root)
        )
    for rank, (region, score) in enumerate(nodules, 1):
        number += 1
        x = float(_centroid([region], volume.affine)[0])
        side = min(lung_x, key=lambda s: abs(lung_x[s] - x))
        _paint(labels, [region], number)
        findings.append(
            _finding(
                "tumour",
                side,
                number,
                f"Tumour {rank}",
                [region],
                volume,
                uid_root,
                detection_score=score,
            )
        )
    return Measured(
        SegmentationResult(labels=labels, findings=tuple(findings)),
        None,
        statements=anatomy.statements,
    )


def _paint(labels: np.ndarray, pieces: list[_Region], number: int) -> None:
    """Set the voxels of ``pieces`` to ``number`` in the label map."""
    for piece in pieces:
        labels[piece.box][piece.mask] = number


class MeasurementOperator(Operator):
    """Inputs ``volume`` (``Volume``) and ``anatomy`` (:class:`Anatomy`) → output
    ``measured``."""

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        uid_root: str,
        **kw: object,
    ) -> None:
        self.uid_root = uid_root
        self.timings: dict[str, float] = {}  # this operator's stage seconds, read after a run
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("anatomy")
        spec.output("measured")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        volume = op_input.receive("volume")
        anatomy = op_input.receive("anatomy")
        if anatomy is None or not isinstance(volume, Volume):  # nothing was analysed
            op_output.emit(None, "measured")
            return
        started = time.perf_counter()
        measured = measure(anatomy, volume, uid_root=self.uid_root)
        self.timings["measure"] = time.perf_counter() - started
        op_output.emit(measured, "measured")
