"""Lung fields from CT intensities: body, airways, right and left lung.

Classical and deliberately so: air-density tissue inside the body, the airway tree grown from
the trachea and taken away, connected components, morphology. It needs no training data,
behaves the same on every scanner that calibrates HU, and fails in ways that can be checked
(see :attr:`LungFields.problems`). The learned model's lung class is not used for the lungs:
on real CT it confused left and right and counted airways, bowel gas and the heart as lung.

Steps, on a grid shrunk in-plane to about 1.5 mm (lungs are large; full resolution buys
nothing but time), then brought back to the source grid:

1. body: the largest connected structure denser than fat-air mix (> -500 HU), holes filled
   slice by slice, so that air outside the patient (and in the table) is never lung;
2. air inside the body (< -400 HU);
3. airways: the trachea is found in the cranial slices (a round air column near the body's
   mid-line) and grown down the bronchial tree at airway density (< -950 HU, tightened while
   it leaks into lung), then removed with a margin;
4. lungs: the large air components that remain; two are the lungs (told apart by patient x
   from the DICOM geometry, never by array order); one that spans both sides is split where
   it is thinnest (erosion), else at the mid-line; small air pockets far from them (bowel gas)
   are dropped;
5. each lung's holes are filled slice by slice: vessels, airway walls and nodules inside the
   lung belong to it, as in clinical lung masks. :attr:`LungFields.search` additionally closes
   each lung with a disc, so that nodules on the pleura (whose outer side touches chest wall,
   not lung) lie inside the region searched for nodules.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

__all__ = [
    "LungFields",
    "find_lung_fields",
    "grow_in_plane",
    "shrink_in_plane",
    "shrink_slices",
    "slice_factor",
    "x_of_columns",
]

log = logging.getLogger("radfusion.operators.lungs")

BODY_HU = -500.0
AIR_HU = -400.0
AIRWAY_HU = -950.0
_TARGET_SPACING_MM = 1.5  # in-plane spacing of the working grid, about
_MIN_LUNG_ML = 50.0  # an air component smaller than this is not a lung
_LUNG_SHARE = 0.15  # a second component at least this share of the largest is a lung
_AIRWAY_MAX_ML = 250.0  # trachea + bronchi; more means the growth leaked into lung
_SEARCH_CLOSING_MM = 12.0  # pleural nodules up to ~2.5 cm across lie inside the search region
_ENVELOPE_CLOSING_MM = 35.0  # masses up to ~7 cm across that the lung wraps around

# Plausibility (adult lungs; the checks say what is wrong, they do not correct it).
PLAUSIBLE_LUNG_L = (0.3, 6.0)
PLAUSIBLE_RIGHT_LEFT = (0.5, 2.0)


class LungFields:
    """Masks on the source grid ``[k, r, c]`` (bool) and what was checked.

    ``right`` and ``left`` are the lungs (holes filled: vessels and nodules inside count);
    ``search`` is where nodules are looked for (the lungs closed towards the pleura);
    ``envelope`` where masses are (closed by a larger disc, and across slices where no lung
    lies further out in the row: a 3-10 cm mass abutting the mediastinum or chest wall, which
    the lung wraps around or caps above and below, lies inside it);
    ``body`` is the patient. ``problems`` lists implausibilities found (empty when none):
    results from fields with problems are not reliable and must not be reported as
    measurements.

    With ``factor`` > 1, ``search``, ``body`` and ``envelope`` are given on the working grid
    (blocks of ``factor`` × ``factor`` source pixels) and brought onto the source grid only when
    read: on a thin series each is 70 million voxels the detector, which works on coarser grids
    still, never needs (:meth:`working`).
    """

    def __init__(
        self,
        right: np.ndarray,
        left: np.ndarray,
        search: np.ndarray,
        body: np.ndarray,
        problems: tuple[str, ...],
        envelope: np.ndarray | None = None,
        *,
        factor: int = 1,
    ) -> None:
        self.right = right
        self.left = left
        self.problems = problems
        self.factor = factor
        # envelope None: masses are looked for in ``search``
        self._working: dict[str, np.ndarray | None] = {
            "search": search,
            "body": body,
            "envelope": envelope,
        }
        self._source: dict[str, np.ndarray | None] = {}

    def _on_source(self, name: str) -> np.ndarray | None:
        if name not in self._source:
            mask = self._working[name]
            self._source[name] = (
                None if mask is None else grow_in_plane(mask, self.factor, self.right.shape)
            )
        return self._source[name]

    @property
    def search(self) -> np.ndarray:
        out = self._on_source("search")
        assert out is not None
        return out

    @property
    def body(self) -> np.ndarray:
        out = self._on_source("body")
        assert out is not None
        return out

    @property
    def envelope(self) -> np.ndarray | None:
        return self._on_source("envelope")

    def working(self, name: str) -> np.ndarray:
        """``search``, ``body`` or ``envelope`` (``search`` when there is no envelope) on the
        working grid of :attr:`factor`: source blocks of ``factor`` × ``factor`` pixels, the
        last row and column standing for the source rows and columns that do not fill one."""
        mask = self._working[name]
        if mask is None:
            mask = self._working["search"]
        assert mask is not None
        return mask

    @property
    def found(self) -> bool:
        return bool(self.right.any() or self.left.any())

    def replace(
        self,
        *,
        right: np.ndarray | None = None,
        left: np.ndarray | None = None,
        problems: tuple[str, ...] | None = None,
    ) -> LungFields:
        """A copy with other lungs or problems; the regions searched stay the same."""
        return LungFields(
            self.right if right is None else right,
            self.left if left is None else left,
            self.working("search"),
            self.working("body"),
            self.problems if problems is None else problems,
            self._working["envelope"],
            factor=self.factor,
        )


def x_of_columns(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Patient x (LPS mm, + = patient's left) of each voxel centre, as a broadcastable
    ``[k, r, c]`` array (cheap: the sum of three 1-D terms)."""
    k, r, c = (np.arange(n, dtype=np.float64) for n in shape)
    return (
        affine[0, 3]
        + (affine[0, 0] * c)[None, None, :]
        + (affine[0, 1] * r)[None, :, None]
        + (affine[0, 2] * k)[:, None, None]
    )


def shrink_in_plane(hu: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor`` × ``factor`` in-plane blocks (the edge rows/columns that do not fill a
    block are dropped); a bool mask gives the share of each block inside it."""
    if factor == 1:
        return hu.astype(np.float32, copy=False)
    r2, c2 = hu.shape[1] // factor, hu.shape[2] // factor
    # A sum of strided views: numpy's reduction over small axes is several times slower, and
    # this runs on whole CT volumes.
    total = np.zeros((hu.shape[0], r2, c2), dtype=np.uint16 if hu.dtype == bool else np.float32)
    for i in range(factor):
        for j in range(factor):
            total += hu[:, i : r2 * factor : factor, j : c2 * factor : factor]
    return total.astype(np.float32, copy=False) / np.float32(factor * factor)


def shrink_slices(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor`` consecutive slices (the last slices that do not fill a block are
    dropped); a bool mask gives the share of each block inside it."""
    if factor == 1:
        return volume.astype(np.float32, copy=False)
    k2 = volume.shape[0] // factor
    total = np.zeros((k2, *volume.shape[1:]), dtype=np.float32)
    for i in range(factor):
        total += volume[i : k2 * factor : factor]
    return total / np.float32(factor)


def slice_factor(spacing_mm: float, target_mm: float, slices: int) -> int:
    """How many source slices (``spacing_mm`` apart, ``slices`` of them) one slice of a working
    grid at most ``target_mm`` apart averages: 1 when they are already that far apart, or too
    few to spare."""
    factor = max(1, int(target_mm / spacing_mm + 1e-6))
    return max(1, min(factor, slices // 8))


def grow_in_plane(mask: np.ndarray, factor: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A mask of a grid shrunk in-plane by ``factor`` on the source grid of ``shape`` (each
    voxel becomes a block; the rows and columns that did not fill a block copy the last)."""
    if factor == 1:
        return mask
    up = np.repeat(np.repeat(mask, factor, axis=1), factor, axis=2)
    if up.shape == shape:  # np.pad copies even when there is nothing to pad
        return up
    pad = ((0, 0), (0, shape[1] - up.shape[1]), (0, shape[2] - up.shape[2]))
    return np.pad(up, pad, mode="edge")


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Holes filled in each slice: background pieces of a slice that do not reach that
    slice's edge. One labelling for all slices (in-plane connectivity only) instead of a
    fill per slice."""
    labels, n = ndimage.label(~mask, structure=_IN_PLANE)
    if n == 0:
        return mask
    edge = np.zeros(n + 1, dtype=bool)
    for border in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        edge[np.unique(border)] = True
    edge[0] = True  # label 0 is the mask itself
    return mask | ~edge[labels]


def _cranial_order(affine: np.ndarray, slices: int) -> range:
    """Slice indices from the head down (patient +z is towards the head in LPS)."""
    dz = float(affine[2, 2])
    return range(slices - 1, -1, -1) if dz > 0 else range(slices)


def _trachea_seed(
    air: np.ndarray, body: np.ndarray, affine: np.ndarray, spacing: np.ndarray
) -> tuple[int, int, int] | None:
    """A voxel in the trachea: in the cranial fifth of the slices, the air component of
    1-6 cm² nearest the body's left-right centre and roughly round."""
    pixel_mm2 = float(spacing[1] * spacing[2])
    order = list(_cranial_order(affine, len(air)))
    for k in order[: max(3, len(order) // 5)]:
        if not body[k].any():
            continue
        _, body_c = np.nonzero(body[k])
        centre_c = float(body_c.mean())
        half_width = (body_c.max() - body_c.min()) / 2.0
        labels, _n = ndimage.label(air[k])
        best: tuple[float, tuple[int, int, int]] | None = None
        for i, box in enumerate(ndimage.find_objects(labels), 1):
            if box is None:
                continue
            piece = labels[box] == i
            area = piece.sum() * pixel_mm2
            if not 100.0 <= area <= 600.0:
                continue
            h = (box[0].stop - box[0].start) * spacing[1]
            w = (box[1].stop - box[1].start) * spacing[2]
            if max(h, w) > 2.5 * min(h, w):
                continue
            rr, cc = np.nonzero(piece)
            rr, cc = rr + box[0].start, cc + box[1].start
            offset = abs(float(cc.mean()) - centre_c)
            if offset > 0.3 * half_width:
                continue
            if best is None or offset < best[0]:
                j = len(rr) // 2
                best = (offset, (k, int(rr[j]), int(cc[j])))
        if best is not None:
            return best[1]
    return None


def _airways(
    hu: np.ndarray, air: np.ndarray, seed: tuple[int, int, int], voxel_ml: float
) -> np.ndarray:
    """The airway tree connected to ``seed`` at airway density, tightened until it stops
    leaking into the lungs (empty when even the tightest growth leaks)."""
    for threshold in (AIRWAY_HU, -970.0, -985.0, -995.0):
        lumen = air & (hu < threshold)
        if not lumen[seed]:
            continue
        labels, _ = ndimage.label(lumen)
        tree = labels == labels[seed]
        if tree.sum() * voxel_ml <= _AIRWAY_MAX_ML:
            return tree
    return np.zeros_like(air)


def _split(component: np.ndarray, x: np.ndarray, midline: float) -> list[np.ndarray]:
    """Two lungs joined in one component (anterior or posterior junction): the cores left
    after eroding the join away (by distance to the background) seed the two lungs, and each
    voxel goes to the nearer core; without two such cores, cut at the mid-line.

    Worked out on a grid coarser by two in-plane (a join is a few mm wide; distance
    transforms dominate the cost) and brought back."""
    box = _box(component, 2)
    part = component[box]
    coarse = shrink_in_plane(part, 2) > 0.5 if min(part.shape[1:]) >= 4 else part
    depth = ndimage.distance_transform_edt(coarse)
    for level in range(1, 7):
        labels, n = ndimage.label(depth > level)
        if n < 2:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        a, b = np.argsort(sizes)[::-1][:2]
        if sizes[b] >= _LUNG_SHARE * sizes[a]:
            seeds = np.where(labels == a, 1, np.where(labels == b, 2, 0)).astype(np.uint8)
            _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
            owner = seeds[tuple(nearest)]
            if coarse is not part:
                owner = grow_in_plane(owner, 2, part.shape)
            out = []
            for value in (1, 2):
                whole = np.zeros_like(component)
                whole[box] = part & (owner == value)
                out.append(whole)
            return out
    return [component & (x < midline), component & (x >= midline)]


def find_lung_fields(
    hu: np.ndarray, spacing_mm: tuple[float, float, float], affine: np.ndarray
) -> LungFields:
    """The lung fields of a CT volume (HU, ``[k, r, c]``, geometry as :class:`Volume`).

    Never raises on anatomy: a volume without lungs gives empty masks and a problem saying so.

    Raises:
        ValueError: ``hu`` is not 3-D.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu: expected a 3-D [k, r, c] array, got shape {hu.shape}")
    shape: tuple[int, int, int] = hu.shape
    factor = min(4, max(1, round(_TARGET_SPACING_MM / min(spacing_mm[1], spacing_mm[2]))))
    small = shrink_in_plane(hu, factor)
    spacing = np.array([spacing_mm[0], spacing_mm[1] * factor, spacing_mm[2] * factor])
    small_affine = affine.copy()
    small_affine[:3, :2] *= factor
    small_affine[:3, 3] += (factor - 1) / 2.0 * (affine[:3, 0] + affine[:3, 1])
    voxel_ml = float(np.prod(spacing)) / 1000.0
    empty = np.zeros(shape, dtype=bool)

    body = _fill_slices(_largest(small > BODY_HU))
    if not body.any():
        return LungFields(empty, empty, empty, empty, ("no body found",))
    air = (small < AIR_HU) & body
    x = x_of_columns(small_affine, small.shape)

    seed = _trachea_seed(air, body, small_affine, spacing)
    airway = np.zeros_like(air)
    if seed is not None:
        airway = _airways(small, air, seed, voxel_ml)
        airway = _dilate_in_box(airway, 2)
        air &= ~airway
    labels, _n = ndimage.label(air)
    sizes = np.bincount(labels.ravel()).astype(np.float64) * voxel_ml
    sizes[0] = 0.0
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] >= _MIN_LUNG_ML]
    problems: list[str] = []
    if not order:
        body_full = grow_in_plane(body, factor, shape)
        return LungFields(empty, empty, empty, body_full, ("no lungs found",))
    largest = labels == order[0]
    parts = [largest]
    if len(order) > 1 and sizes[order[1]] >= _LUNG_SHARE * sizes[order[0]]:
        parts.append(labels == order[1])
    midline = float(x[seed]) if seed is not None else float(x[body].mean())
    if len(parts) == 1:
        share_right = float(np.count_nonzero(largest & (x < midline))) / largest.sum()
        if 0.2 <= share_right <= 0.8:
            parts = _split(largest, np.broadcast_to(x, largest.shape), midline)
    parts.sort(key=lambda m: float(x[m].mean()) if m.any() else 0.0)
    sides: dict[str, np.ndarray] = {}
    if len(parts) == 2:
        sides = {"right": parts[0], "left": parts[1]}
    else:
        only = parts[0]
        sides = {("right" if float(x[only].mean()) < midline else "left"): only}
    for side, mask in list(sides.items()):
        box = _box(mask, 1)
        filled = np.zeros_like(mask)
        filled[box] = _fill_slices(mask[box])
        sides[side] = filled
    right = sides.get("right", np.zeros_like(air))
    left = sides.get("left", np.zeros_like(air))
    # The search region: each lung closed by a disc in-plane, so that a nodule on the pleura
    # (chest wall on its outer side) is inside; kept inside the body.
    search, envelope = _closed_lungs(
        right, left, body, airway, (_SEARCH_CLOSING_MM, _ENVELOPE_CLOSING_MM), spacing
    )
    # A mass wider than the in-plane closing bridges (against the chest wall, the lung only on
    # its medial side) is still capped by lung above and below: close across slices too, but
    # not where lung lies further out in the same row. Heart, hilum and diaphragm dome are
    # wrapped by lung that way, and closing across them takes them in whole.
    bridged = _bridge_slices(envelope, 2.0 * _ENVELOPE_CLOSING_MM / spacing[0])
    if bridged.any():
        k, r, c = _box(bridged, 0)
        # Whole planes: the lung further out may lie beyond the box.
        wrapped = np.where(
            x[k, r, c] < midline,
            _lung_further_out(right[k], small_affine, -1)[:, r, c],
            _lung_further_out(left[k], small_affine, 1)[:, r, c],
        )
        envelope[k, r, c] |= bridged[k, r, c] & ~wrapped & body[k, r, c] & ~airway[k, r, c]
    problems.extend(_plausibility(right, left, body, voxel_ml))

    full_right, full_left = (
        _refine(m, factor, shape, hu) if m.any() else empty for m in (right, left)
    )
    return LungFields(
        right=full_right,
        left=full_left,
        search=search,
        body=body,
        problems=tuple(problems),
        envelope=envelope,
        factor=factor,
    )


def _closed_lungs(
    right: np.ndarray,
    left: np.ndarray,
    body: np.ndarray,
    airway: np.ndarray,
    radii_mm: tuple[float, ...],
    spacing: np.ndarray,
) -> list[np.ndarray]:
    """Per radius, each lung closed by a disc of that radius in-plane (so that what lies in
    its concavities, as a nodule on the pleura does, is inside), within the body, airways
    out."""
    margin = int(np.ceil(max(radii_mm) / spacing[1])) + 1
    out = [np.zeros_like(right) for _ in radii_mm]
    for mask in (right, left):
        if mask.any():
            box = _box(mask, margin)
            for closed, part in zip(
                out, _close_in_plane(mask[box], radii_mm, spacing), strict=True
            ):
                closed[box] |= part
    keep = body & ~airway
    return [closed & keep for closed in out]


def _bridge_slices(mask: np.ndarray, gap: float) -> np.ndarray:
    """Per column ``[:, r, c]``, the runs of False between two True voxels at most ``gap``
    slices apart: a 1-D closing across slices, in one pass each way over the slices (a
    cumulative maximum along the slice axis strides badly through memory)."""
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    box = _box(mask, 0)
    part = mask[box]
    # Slice indices in int16 (half the memory of int32 on a thin series' box): the sentinels'
    # difference, 32 000, still fits, and no CT has 16 000 slices.
    far = np.int16(16000)
    above = np.empty(part.shape, dtype=np.int16)
    last = np.full(part.shape[1:], -far, dtype=np.int16)
    for k, plane in enumerate(part):
        last = np.where(plane, np.int16(k), last)
        above[k] = last
    following = np.full(part.shape[1:], far, dtype=np.int16)
    inside = out[box]
    for k in range(part.shape[0] - 1, -1, -1):
        following = np.where(part[k], np.int16(k), following)
        inside[k] = ~part[k] & (following - above[k] <= gap)
    return out


def _lung_further_out(lung: np.ndarray, affine: np.ndarray, outward: int) -> np.ndarray:
    """Voxels with a voxel of ``lung`` further out in their row (or column, whichever runs
    along patient x): towards the patient's right (``outward`` -1) or left (+1)."""
    axis = 2 if abs(affine[0, 0]) >= abs(affine[0, 1]) else 1
    step = affine[0, 0] if axis == 2 else affine[0, 1]
    if step * outward > 0:  # further out = higher index: accumulate from the far end
        return np.flip(np.logical_or.accumulate(np.flip(lung, axis), axis=axis), axis)
    return np.logical_or.accumulate(lung, axis=axis)


def _box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask`` (not empty), widened in-plane by ``margin`` voxels."""
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    plane = np.asarray(mask.any(axis=0))
    rs, cs = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return (
        slice(int(ks[0]), int(ks[-1]) + 1),
        slice(max(0, int(rs[0]) - margin), int(rs[-1]) + 1 + margin),
        slice(max(0, int(cs[0]) - margin), int(cs[-1]) + 1 + margin),
    )


def _close_in_plane(
    mask: np.ndarray, radii_mm: tuple[float, ...], spacing: np.ndarray, *, coarsen: bool = True
) -> list[np.ndarray]:
    """Morphological closings by a disc of each radius in each slice, through distance
    transforms (the first, the distance to the mask, serves every radius): far cheaper than
    disc-shaped structuring elements of these sizes."""
    if coarsen and min(mask.shape[1:]) >= 8:  # on a grid coarser by two: mm do not matter
        coarse = shrink_in_plane(mask, 2) > 0.25
        closed = _close_in_plane(coarse, radii_mm, spacing * np.array([1, 2, 2]), coarsen=False)
        return [mask | grow_in_plane(c, 2, mask.shape) for c in closed]
    outside = _distance_in_plane(~mask, spacing)
    return [_distance_in_plane(outside <= radius, spacing) > radius for radius in radii_mm]


def _distance_in_plane(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Per slice, each voxel's distance (mm) to the nearest voxel outside ``mask`` in that
    slice (infinite when there is none). Slice by slice: half the time of a 3-D transform
    made in-plane by a huge slice spacing."""
    out = np.zeros(mask.shape, dtype=np.float64)
    sampling = (float(spacing[1]), float(spacing[2]))
    for k, plane in enumerate(mask):
        if plane.all():
            out[k] = np.inf
        elif plane.any():
            out[k] = ndimage.distance_transform_edt(plane, sampling=sampling)
    return out


def _dilate_in_box(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``mask`` dilated (6-connected steps), working only on its bounding box."""
    if not mask.any():
        return mask
    box = _box(mask, iterations)
    k0, k1 = max(0, box[0].start - iterations), box[0].stop + iterations
    box = (slice(k0, k1), box[1], box[2])
    out = mask.copy()
    out[box] = ndimage.binary_dilation(mask[box], iterations=iterations)
    return out


def _refine(
    small: np.ndarray, factor: int, shape: tuple[int, int, int], hu: np.ndarray
) -> np.ndarray:
    """A lung of the working grid on the source grid, its border decided by full-resolution
    HU: the interior stays (vessels included), a border voxel is lung only when air-dense.
    Worked out in the lung's box (an eroded empty margin stays empty)."""
    box = _box(small, 1)
    part = small[box]
    interior = ndimage.binary_erosion(part, structure=_IN_PLANE)
    # The box on the source grid; one reaching the working grid's last row or column also
    # takes the source rows and columns that did not fill a block (as grow_in_plane does).
    full = (
        box[0],
        *(
            slice(b.start * factor, shape[axis] if b.stop == small.shape[axis] else b.stop * factor)
            for axis, b in ((1, box[1]), (2, box[2]))
        ),
    )
    size = (
        full[0].stop - full[0].start,
        full[1].stop - full[1].start,
        full[2].stop - full[2].start,
    )
    coarse, inner = grow_in_plane(part, factor, size), grow_in_plane(interior, factor, size)
    out = np.zeros(shape, dtype=bool)
    out[full] = inner | (coarse & (hu[full] < AIR_HU))
    return out


def _plausibility(
    right: np.ndarray, left: np.ndarray, body: np.ndarray, voxel_ml: float
) -> list[str]:
    problems = []
    litres = {
        side: float(np.count_nonzero(mask)) * voxel_ml / 1000.0
        for side, mask in (("right", right), ("left", left))
    }
    lo, hi = PLAUSIBLE_LUNG_L
    for side, volume in litres.items():
        if volume and not lo <= volume <= hi:
            problems.append(f"{side} lung {volume:.2f} L outside {lo}-{hi} L")
    if all(litres.values()):
        ratio = litres["right"] / litres["left"]
        lo, hi = PLAUSIBLE_RIGHT_LEFT
        if not lo <= ratio <= hi:
            problems.append(f"right/left lung volume ratio {ratio:.2f} outside {lo}-{hi}")
    lungs = right | left
    outside = float(np.count_nonzero(lungs & ~body)) / max(1, int(np.count_nonzero(lungs)))
    if outside > 0.01:
        problems.append(f"{outside:.0%} of the lungs lie outside the body")
    return problems
