"""Measurement: a class map (background / lung / tumour) → findings with measurements.

Lungs are split into left and right by connected components and the patient's x axis;
tumours become one finding each (connected components). Each finding gets its volume,
longest axial diameter (with the end points, for viewers), mean and SD of HU and centroid.
A study with no lungs found is out of scope: no findings are invented for it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.uid import generate_uid
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from radfusion.operators.results import Finding, SegmentationResult
from radfusion.operators.volume import Volume

__all__ = ["Measured", "MeasurementOperator", "measure"]

LUNG, TUMOUR = 1, 2
MIN_LUNG_ML = 50.0  # below this in total, the input is not a chest CT with lungs
MIN_LUNG_COMPONENT_ML = 5.0  # lung fragments smaller than this are segmentation noise
MIN_TUMOUR_MM3 = 30.0  # a 4 mm sphere; smaller blobs are noise, not findings
_LUNG_SHARE = 0.2  # a part of the lung volume at least this large is a lung, not a fragment


@dataclass(frozen=True)
class Measured:
    """The measurement step's output: findings, or the reason the input was out of scope."""

    result: SegmentationResult | None
    out_of_scope_reason: str | None


Voxels = tuple[np.ndarray, np.ndarray, np.ndarray]
"""A structure as voxel index arrays (k, r, c): cheaper than full-volume masks on 500 slices."""


def _row_extremes(voxels: Voxels) -> Voxels:
    """The first and last voxel of each (slice, row) run, sorted by slice: the only candidates
    for an in-plane diameter's end points, and a few per cent of a lung's voxels."""
    kk, rr, cc = voxels
    rows, columns = int(rr.max()) + 1, int(cc.max()) + 1
    key = (kk.astype(np.int64) * rows + rr) * columns + cc
    order = np.argsort(key, kind="stable")  # fast: the voxels usually come in this order
    kk, rr, cc = kk[order], rr[order], cc[order]
    new_row = np.flatnonzero((np.diff(kk) != 0) | (np.diff(rr) != 0)) + 1
    first = np.concatenate([[0], new_row])
    last = np.concatenate([new_row - 1, [len(kk) - 1]])
    keep = np.unique(np.concatenate([first, last]))
    return kk[keep], rr[keep], cc[keep]


def _longest_axial_diameter(
    voxels: Voxels, affine: np.ndarray
) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """Longest in-plane distance between voxel centres over all slices, with its end points."""
    kk, rr, cc = _row_extremes(voxels)
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


def _centroid(voxels: Voxels, affine: np.ndarray) -> np.ndarray:
    kk, rr, cc = voxels
    return affine @ np.array([cc.mean(), rr.mean(), kk.mean(), 1.0])


def _finding(
    kind: str,
    side: str,
    number: int,
    tracking_id: str,
    voxels: Voxels,
    volume: Volume,
    uid_root: str,
) -> Finding:
    voxel_mm3 = float(np.prod(volume.spacing_mm))
    values = volume.hu[voxels].astype(np.float64)
    centroid = _centroid(voxels, volume.affine)
    diameter, (a, b) = _longest_axial_diameter(voxels, volume.affine)
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


def _components(mask: np.ndarray, min_voxels: float) -> list[Voxels]:
    """Connected components of ``mask`` with at least ``min_voxels`` voxels, largest first."""
    box = []
    for axis in range(3):  # label only the mask's bounding box: tumours fill a few slices
        found = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not len(found):
            return []
        box.append(slice(int(found[0]), int(found[-1]) + 1))
    components, _ = ndimage.label(mask[tuple(box)])
    kk, rr, cc = np.nonzero(components)
    ids = components[kk, rr, cc]
    del components
    order = np.argsort(ids, kind="stable")
    ids, kk, rr, cc = ids[order], kk[order], rr[order], cc[order]
    splits = np.flatnonzero(np.diff(ids)) + 1
    out = [
        (k + box[0].start, r + box[1].start, c + box[2].start)
        for k, r, c in zip(
            np.split(kk, splits), np.split(rr, splits), np.split(cc, splits), strict=True
        )
        if len(k) >= min_voxels
    ]
    out.sort(key=lambda v: -len(v[0]))
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
    lung = classes == LUNG
    lung_ml = float(np.count_nonzero(lung)) * voxel_ml
    if lung_ml < MIN_LUNG_ML:
        return Measured(
            None,
            f"no lungs found (segmented lung volume {lung_ml:.0f} mL < "
            f"{MIN_LUNG_ML:.0f} mL): the input does not appear to be a chest CT",
        )
    pieces = _split_lungs(_components(lung, MIN_LUNG_COMPONENT_ML / voxel_ml), volume, voxel_ml)
    del lung
    labels = np.zeros(classes.shape, dtype=np.uint8)
    findings = []
    number = 0
    lung_x = {}
    for side in ("right", "left"):
        if not pieces[side]:
            continue
        voxels: Voxels = tuple(np.concatenate(axis) for axis in zip(*pieces[side], strict=True))  # type: ignore[assignment]
        number += 1
        labels[voxels] = number
        lung_x[side] = float(_centroid(voxels, volume.affine)[0])
        findings.append(
            _finding("lung", side, number, f"{side.capitalize()} lung", voxels, volume, uid_root)
        )
    if not findings:
        return Measured(
            None,
            f"no lungs found (segmented lung volume {lung_ml:.0f} mL, all in fragments under "
            f"{MIN_LUNG_COMPONENT_ML:.0f} mL): the input does not appear to be a chest CT",
        )
    tumours = _components(classes == TUMOUR, MIN_TUMOUR_MM3 / (voxel_ml * 1000))
    for rank, voxels in enumerate(tumours, 1):
        number += 1
        x = float(_centroid(voxels, volume.affine)[0])
        side = min(lung_x, key=lambda s: abs(lung_x[s] - x))
        labels[voxels] = number
        findings.append(
            _finding("tumour", side, number, f"Tumour {rank}", voxels, volume, uid_root)
        )
    return Measured(SegmentationResult(labels=labels, findings=tuple(findings)), None)


def _split_lungs(
    components: list[Voxels], volume: Volume, voxel_ml: float
) -> dict[str, list[Voxels]]:
    """Assign lung components (largest first) to the patient's right and left lung.

    Two large components are the two lungs, told apart by their relative x (+x is the patient's
    left in LPS), so a patient off the table centre is still right. One dominant component is
    split at x = 0 (the isocentre: patients lie centred on the table) only when a substantial
    part lies on each side, as when the lungs touch in front of the mediastinum; otherwise it is
    one lung, on the side its centroid lies (a one-lung field of view, a pneumonectomy).
    Fragments go to the nearer lung.
    """
    pieces: dict[str, list[Voxels]] = {"right": [], "left": []}
    if not components:
        return pieces
    total = sum(len(c[0]) for c in components)
    large = [c for c in components[:2] if len(c[0]) >= _LUNG_SHARE * total]
    if len(large) == 2:
        a, b = sorted(large, key=lambda c: float(_centroid(c, volume.affine)[0]))
        pieces["right"].append(a)
        pieces["left"].append(b)
    else:
        kk, rr, cc = components[0]
        on_right = _x_of_index(volume, cc, rr, kk) < 0
        share = float(on_right.mean())
        if _LUNG_SHARE <= share <= 1 - _LUNG_SHARE:
            pieces["right"].append((kk[on_right], rr[on_right], cc[on_right]))
            pieces["left"].append((kk[~on_right], rr[~on_right], cc[~on_right]))
        else:
            pieces["right" if share > 0.5 else "left"].append(components[0])
    placed = {
        side: float(_centroid(parts[0], volume.affine)[0])
        for side, parts in pieces.items()
        if parts
    }
    for fragment in components[len(large) if len(large) == 2 else 1 :]:
        x = float(_centroid(fragment, volume.affine)[0])
        pieces[min(placed, key=lambda side: abs(placed[side] - x))].append(fragment)
    return pieces


def _x_of_index(
    volume: Volume, c: np.ndarray | float, r: np.ndarray | float, k: np.ndarray | float
) -> np.ndarray:
    """Patient x (LPS mm) of voxel indices."""
    a = volume.affine
    return a[0, 3] + a[0, 0] * np.asarray(c) + a[0, 1] * np.asarray(r) + a[0, 2] * np.asarray(k)


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
