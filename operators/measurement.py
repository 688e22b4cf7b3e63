"""Measurement: a class map (background / lung / tumour) → findings with measurements.

Lungs are split into left and right by connected components and the patient's x axis;
tumours become one finding each (connected components). Each finding gets its volume,
longest axial diameter (with the end points, for viewers), mean and SD of HU and centroid.
A study with no lungs found is out of scope: no findings are invented for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.uid import generate_uid
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from radfusion.operators.results import Finding, SegmentationResult
from radfusion.operators.volume import Volume

log = logging.getLogger("radfusion.operators.measurement")

__all__ = ["Measured", "MeasurementOperator", "measure"]

LUNG, TUMOUR = 1, 2
MIN_LUNG_ML = 50.0  # below this in total, the input is not a chest CT with lungs
MIN_LUNG_COMPONENT_ML = 5.0  # lung fragments smaller than this are segmentation noise
MIN_TUMOUR_MM3 = 30.0  # a 4 mm sphere; smaller blobs are noise, not findings
# The largest tumours reported; a segment number must fit the uint8 label map (2 lungs +
# tumours <= 255), and hundreds of candidates mean a failed segmentation, not findings.
MAX_TUMOURS = 100
_LUNG_SHARE = 0.2  # a part of the lung volume at least this large is a lung, not a fragment
_SLAB = 16  # slices per step of a whole-volume pass: a few MB of buffer at 512²


@dataclass(frozen=True)
class Measured:
    """The measurement step's output: findings, or the reason the input was out of scope."""

    result: SegmentationResult | None
    out_of_scope_reason: str | None


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
    (on the first slice that reaches it)."""
    kk, rr, cc = _row_extremes(pieces)
    splits = np.flatnonzero(np.diff(kk)) + 1
    best, ends = 0.0, (np.zeros(3), np.zeros(3))
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
    )


def _extent(classes: np.ndarray, value: int) -> tuple[int, Box | None]:
    """Voxels of class ``value`` in ``classes``: how many, and the smallest box holding them
    (None when there are none).

    A few slices at a time into one small buffer rather than a full-volume mask: at 512² a mask
    is 75 MB of fresh pages per class, and fresh pages are slow on these machines (touching
    300 MB for the first time has taken 0.02-1.1 s).
    """
    slices = np.zeros(len(classes), dtype=bool)  # any voxel on slice k
    plane = np.zeros(classes.shape[1:], dtype=bool)  # any voxel at (r, c) on any slice
    buffer = np.empty((_SLAB, *classes.shape[1:]), dtype=bool)
    count = 0
    for start in range(0, len(classes), _SLAB):
        part = classes[start : start + _SLAB]
        found = np.equal(part, value, out=buffer[: len(part)])
        count += int(np.count_nonzero(found))
        slices[start : start + len(part)] = found.reshape(len(part), -1).any(axis=1)
        plane |= np.logical_or.reduce(found, axis=0)
    if not count:
        return 0, None
    ks, rs, cs = (np.flatnonzero(x) for x in (slices, plane.any(axis=1), plane.any(axis=0)))
    return count, (
        slice(int(ks[0]), int(ks[-1]) + 1),
        slice(int(rs[0]), int(rs[-1]) + 1),
        slice(int(cs[0]), int(cs[-1]) + 1),
    )


def _components(
    classes: np.ndarray, value: int, box: Box | None, min_voxels: float
) -> list[_Region]:
    """Connected components of class ``value`` (all inside ``box``, see :func:`_extent`) with
    at least ``min_voxels`` voxels, largest first (equal sizes in the order of their first
    voxel)."""
    if box is None:
        return []
    # Label only the class's box: tumours fill a few slices, both lungs a quarter of the volume.
    components, _ = ndimage.label(classes[box] == value)
    out = []
    for number, found in enumerate(ndimage.find_objects(components), 1):
        if found is None or np.prod([s.stop - s.start for s in found]) < min_voxels:
            continue  # too small to count even if it filled its box: speckle, skip cheaply
        piece = components[found] == number
        count = int(np.count_nonzero(piece))
        if count >= min_voxels:
            at = tuple(
                slice(outer.start + inner.start, outer.start + inner.stop)
                for outer, inner in zip(box, found, strict=True)
            )
            out.append(_Region(at, piece, count))  # type: ignore[arg-type]
    out.sort(key=lambda region: -region.count)
    return out


def measure(classes: np.ndarray, volume: Volume, *, uid_root: str) -> Measured:
    """Turn the model's class map (0 background, 1 lung, 2 tumour) into findings.

    Segment numbers: 1 right lung, 2 left lung (only those found), then tumours, largest first.

    Raises:
        ValueError: ``classes`` does not have the volume's shape.
    """
    if classes.shape != volume.hu.shape:
        raise ValueError(f"class map shape {classes.shape} != volume shape {volume.hu.shape}")
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    lung_count, lung_box = _extent(classes, LUNG)
    lung_ml = float(lung_count) * voxel_ml
    if lung_ml < MIN_LUNG_ML:
        return Measured(
            None,
            f"no lungs found (segmented lung volume {lung_ml:.0f} mL < "
            f"{MIN_LUNG_ML:.0f} mL): the input does not appear to be a chest CT",
        )
    pieces = _split_lungs(
        _components(classes, LUNG, lung_box, MIN_LUNG_COMPONENT_ML / voxel_ml), volume
    )
    labels = np.zeros(classes.shape, dtype=np.uint8)
    findings = []
    number = 0
    lung_x = {}
    for side in ("right", "left"):
        if not pieces[side]:
            continue
        number += 1
        _paint(labels, pieces[side], number)
        lung_x[side] = float(_centroid(pieces[side], volume.affine)[0])
        findings.append(
            _finding(
                "lung", side, number, f"{side.capitalize()} lung", pieces[side], volume, uid_root
            )
        )
    if not findings:
        return Measured(
            None,
            f"no lungs found (segmented lung volume {lung_ml:.0f} mL, all in fragments under "
            f"{MIN_LUNG_COMPONENT_ML:.0f} mL): the input does not appear to be a chest CT",
        )
    tumours = _components(
        classes, TUMOUR, _extent(classes, TUMOUR)[1], MIN_TUMOUR_MM3 / (voxel_ml * 1000)
    )
    if len(tumours) > MAX_TUMOURS:
        log.warning(
            "%d tumour candidates; only the %d largest are reported", len(tumours), MAX_TUMOURS
        )
        tumours = tumours[:MAX_TUMOURS]
    for rank, tumour in enumerate(tumours, 1):
        number += 1
        x = float(_centroid([tumour], volume.affine)[0])
        side = min(lung_x, key=lambda s: abs(lung_x[s] - x))
        _paint(labels, [tumour], number)
        findings.append(
            _finding("tumour", side, number, f"Tumour {rank}", [tumour], volume, uid_root)
        )
    return Measured(SegmentationResult(labels=labels, findings=tuple(findings)), None)


def _paint(labels: np.ndarray, pieces: list[_Region], number: int) -> None:
    """Set the voxels of ``pieces`` to ``number`` in the label map."""
    for piece in pieces:
        labels[piece.box][piece.mask] = number


def _split_lungs(components: list[_Region], volume: Volume) -> dict[str, list[_Region]]:
    """Assign lung components (largest first) to the patient's right and left lung.

    Two large components are the two lungs, told apart by their relative x (+x is the patient's
    left in LPS), so a patient off the table centre is still right. One dominant component is
    split at x = 0 (the isocentre: patients lie centred on the table) only when a substantial
    part lies on each side, as when the lungs touch in front of the mediastinum; otherwise it is
    one lung, on the side its centroid lies (a one-lung field of view, a pneumonectomy).
    Fragments go to the nearer lung.
    """
    pieces: dict[str, list[_Region]] = {"right": [], "left": []}
    if not components:
        return pieces
    total = sum(c.count for c in components)
    large = [c for c in components[:2] if c.count >= _LUNG_SHARE * total]
    if len(large) == 2:
        a, b = sorted(large, key=lambda c: float(_centroid([c], volume.affine)[0]))
        pieces["right"].append(a)
        pieces["left"].append(b)
    else:
        main = components[0]
        right = main.mask & _right_of_isocentre(volume, main.box)
        share = np.count_nonzero(right) / main.count
        if _LUNG_SHARE <= share <= 1 - _LUNG_SHARE:
            left = main.mask & ~right
            pieces["right"].append(_Region(main.box, right, int(np.count_nonzero(right))))
            pieces["left"].append(_Region(main.box, left, int(np.count_nonzero(left))))
        else:
            pieces["right" if share > 0.5 else "left"].append(main)
    placed = {
        side: float(_centroid(parts[:1], volume.affine)[0])
        for side, parts in pieces.items()
        if parts
    }
    for fragment in components[len(large) if len(large) == 2 else 1 :]:
        x = float(_centroid([fragment], volume.affine)[0])
        pieces[min(placed, key=lambda side: abs(placed[side] - x))].append(fragment)
    return pieces


def _right_of_isocentre(volume: Volume, box: Box) -> np.ndarray:
    """For each voxel of ``box``: does its centre lie at patient x < 0 (LPS), the patient's
    right of the isocentre? Evaluated as a0,3 + a0,0 c + a0,1 r + a0,2 k in that order, slab by
    slab (a whole box of float64 x would cost a quarter GB on 512² images)."""
    a = volume.affine
    k = np.arange(box[0].start, box[0].stop)
    r = np.arange(box[1].start, box[1].stop)
    c = np.arange(box[2].start, box[2].stop)
    plane = (a[0, 3] + a[0, 0] * c)[None, :] + (a[0, 1] * r)[:, None]  # [r, c]
    out = np.empty((len(k), len(r), len(c)), dtype=bool)
    for start in range(0, len(k), _SLAB):
        ks = k[start : start + _SLAB]
        np.less(plane[None] + (a[0, 2] * ks)[:, None, None], 0, out=out[start : start + _SLAB])
    return out


class MeasurementOperator(Operator):
    """Inputs ``volume`` (``Volume``) and ``classes`` (class map) → output ``measured``."""

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        uid_root: str,
        timings: dict[str, float] | None = None,
        **kw: object,
    ) -> None:
        self.uid_root = uid_root
        self.timings = timings
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("classes")
        spec.output("measured")

    def compute(self, op_input: object, op_output: object, context: object) -> None:
        volume = op_input.receive("volume")  # type: ignore[attr-defined]
        classes = op_input.receive("classes")  # type: ignore[attr-defined]
        if classes is None or not isinstance(volume, Volume):  # nothing was segmented
            op_output.emit(None, "measured")  # type: ignore[attr-defined]
            return
        started = time.perf_counter()
        measured = measure(classes, volume, uid_root=self.uid_root)
        if self.timings is not None:
            self.timings["measure"] = time.perf_counter() - started
        op_output.emit(measured, "measured")  # type: ignore[attr-defined]
