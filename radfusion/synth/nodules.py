"""Lung nodules and masses of the realistic phantom: the findings a detector must find.

Types (:data:`TUMOUR_TYPES`): ``solid`` (0-60 HU), ``part_solid`` (ground-glass halo -600..-400
HU around a solid core), ``ground_glass`` (-700..-500 HU), ``juxta_pleural`` and
``juxta_vascular`` (solid nodules touching the chest wall or a vessel), ``mass`` (3-10 cm,
solid with a necrotic core 10-20 HU lower or near water, against the mediastinum, the hilum or
the pleura), and ``spiculated`` (a solid nodule with spikes; only when asked for). Nodules are
4-30 mm. Shapes are spheres, lobulated (a sum of a few spheres), irregular (a radially
perturbed sphere) or spiculated (perturbed deeper, at higher frequencies). Each tumour is drawn
on the fine grid with two tissue classes (body and core), replacing lung only, and never
touches another tumour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeAlias

import numpy as np

from radfusion.synth.anatomy import (
    EMPHYSEMA,
    FISSURE,
    LUNG,
    LUNG_FAMILY,
    TUMOUR_CLASS_BASE,
    VESSEL,
    Chest,
)
from radfusion.synth.shapes import Grid

__all__ = ["TUMOUR_TYPES", "PlacedTumour", "place_tumours"]

TUMOUR_TYPES = (
    "solid",
    "part_solid",
    "ground_glass",
    "juxta_pleural",
    "juxta_vascular",
    "mass",
    "spiculated",
)
# Drawn when no type is asked for; "spiculated" only when asked for (the cohort's genotypes).
_RANDOM_TYPES = TUMOUR_TYPES[:6]
_TYPE_P = (0.28, 0.16, 0.16, 0.15, 0.15, 0.10)
_ATTEMPTS = 600

# A shape for :func:`_inside`: a sphere (radius), lobulated (core radius; lobe centre offsets
# and radii) or irregular (radius, amplitude; perturbation directions, frequencies, phases).
_Shape: TypeAlias = (
    tuple[Literal["sphere"], float]
    | tuple[Literal["lobulated"], tuple[float, list[tuple[np.ndarray, float]]]]
    | tuple[
        Literal["irregular", "spiculated"],
        tuple[float, float, list[tuple[np.ndarray, float, float]]],
    ]
)


@dataclass(frozen=True)
class PlacedTumour:
    """A tumour drawn into the fine grid: its classes, nominal HU and measured geometry."""

    index: int
    type: str
    density: str  # solid | part_solid | ground_glass
    shape: str  # sphere | lobulated | irregular | spiculated
    location: (
        str  # intraparenchymal | juxta_pleural | juxta_vascular | hilar | mediastinal | pleural
    )
    side: str
    hu: float  # the body (halo of a part-solid nodule)
    core_hu: float | None  # solid core or necrotic centre
    centre_mm: tuple[float, float, float]  # centroid of its voxels on the fine grid, LPS
    diameter_mm: float  # largest extent along x, y or z on the fine grid
    core_diameter_mm: float | None


def _shape(rng: np.random.Generator, kind: str, radius: float) -> _Shape:
    """A random shape description of outer radius ``radius`` for :func:`_inside`."""
    if kind == "lobulated":
        lobes = []
        for _ in range(int(rng.integers(2, 5))):
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            r = radius * float(rng.uniform(0.35, 0.55))
            lobes.append((v * (radius - r), r))
        return "lobulated", (radius * float(rng.uniform(0.6, 0.75)), lobes)
    if kind in ("irregular", "spiculated"):
        # Spiculated: more, higher-frequency and deeper radial perturbations (spikes and
        # clefts) than a merely irregular outline.
        count, frequencies, amplitudes = (
            (10, (5.0, 9.0), (0.18, 0.28))
            if kind == "spiculated"
            else (6, (2.0, 5.0), (0.06, 0.12))
        )
        terms = []
        for _ in range(count):
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            terms.append((v, float(rng.uniform(*frequencies)), float(rng.uniform(0, 2 * np.pi))))
        amp = float(rng.uniform(*amplitudes))
        return ("spiculated" if kind == "spiculated" else "irregular"), (radius, amp, terms)
    return "sphere", radius


def _inside(shape: _Shape, dz: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """The voxels (offsets from the centre, mm) inside a shape from :func:`_shape`."""
    d2 = dx * dx + dy * dy + dz * dz
    if shape[0] == "sphere":
        return d2 <= shape[1] * shape[1]
    if shape[0] == "lobulated":
        r0, lobes = shape[1]
        mask = d2 <= r0 * r0
        for c, r in lobes:
            mask |= (dx - c[0]) ** 2 + (dy - c[1]) ** 2 + (dz - c[2]) ** 2 <= r * r
        return mask
    radius, amp, terms = shape[1]
    rr = np.sqrt(d2) + 1e-6
    pert = np.zeros(np.broadcast_shapes(dz.shape, dy.shape, dx.shape), dtype=np.float32)
    for v, f, phase in terms:
        pert += np.cos(f * (dx * v[0] + dy * v[1] + dz * v[2]) / rr + phase)
    # Scaled so that the surface never leaves the sphere of ``radius``.
    return rr <= radius * (1.0 + amp * pert / len(terms) * 3.0) / (1.0 + 3.0 * amp)


def _boundary(
    grid: Grid, start: np.ndarray, direction: np.ndarray, allowed: frozenset[int], reach: float
) -> np.ndarray | None:
    """The last point of ``allowed`` class along a ray from ``start`` (None if it starts
    outside)."""
    if grid.at(start) not in allowed:
        return None
    last = start
    for t in np.arange(0.5, reach, 0.5):
        p = start + direction * t
        if grid.at(p) not in allowed:
            return last
        last = p
    return None


def place_tumours(
    rng: np.random.Generator,
    grid: Grid,
    chest: Chest,
    count: int,
    types: tuple[str, ...] | None = None,
    label_planes: np.ndarray | None = None,
) -> list[PlacedTumour]:
    """Draw ``count`` tumours into ``grid`` (tumour ``i`` gets classes
    ``TUMOUR_CLASS_BASE + 2i`` and ``+ 1``); ``types[i % len(types)]`` sets tumour ``i``'s
    type, else types are drawn at random. With ``label_planes`` (bool per fine plane), a
    tumour must cross one of those planes, so that it has voxels in the label map.

    Raises:
        ValueError: a tumour does not fit (the message names ``tumours``), or ``types`` holds
            an unknown type (names ``tumour_types``).
    """
    if types is not None:
        bad = [t for t in types if t not in TUMOUR_TYPES]
        if bad or not types:
            raise ValueError(
                f"tumour_types: must be a non-empty list of {TUMOUR_TYPES}, got {types}"
            )
    spacing = np.array(
        [
            grid.xs[1] - grid.xs[0],
            grid.ys[1] - grid.ys[0],
            grid.zs[1] - grid.zs[0] if len(grid.zs) > 1 else 1.0,
        ]
    )
    margin = float(spacing.max()) * 1.5
    placed: list[PlacedTumour] = []
    for index in range(count):
        if types is not None:
            kind = types[index % len(types)]
        else:
            kind = _RANDOM_TYPES[int(rng.choice(len(_RANDOM_TYPES), p=_TYPE_P))]
        for _ in range(_ATTEMPTS):
            result = _try_place(rng, grid, chest, index, kind, spacing, margin, label_planes)
            if result is not None:
                placed.append(result)
                break
        else:
            raise ValueError(
                f"tumours: could not fit tumour {index + 1} of {count} ({kind}) inside a lung; "
                "use fewer tumours or more slices"
            )
    return placed


def _try_place(
    rng: np.random.Generator,
    grid: Grid,
    chest: Chest,
    index: int,
    kind: str,
    spacing: np.ndarray,
    margin: float,
    label_planes: np.ndarray | None,
) -> PlacedTumour | None:
    side = "right" if rng.random() < 0.5 else "left"
    info = chest.lungs[side]
    family = LUNG_FAMILY[side]
    parenchyma = frozenset((LUNG[side], FISSURE[side], EMPHYSEMA[side]))
    a, b = info.semi
    z_lo = info.z_base + 0.15 * (info.z_apex - info.z_base)
    z_hi = info.z_apex - 0.08 * (info.z_apex - info.z_base)
    if kind == "mass":
        diameter = float(rng.uniform(30.0, min(100.0, 1.6 * min(a, b))))
    elif kind == "part_solid":
        diameter = math.exp(float(rng.uniform(math.log(8.0), math.log(30.0))))
    elif kind == "ground_glass":
        diameter = math.exp(float(rng.uniform(math.log(6.0), math.log(30.0))))
    else:
        diameter = math.exp(float(rng.uniform(math.log(4.0), math.log(25.0))))
    radius = diameter / 2.0
    density = {"part_solid": "part_solid", "ground_glass": "ground_glass"}.get(kind, "solid")
    if kind == "mass":
        shape = _shape(rng, "irregular", radius)
    elif kind == "spiculated":
        shape = _shape(rng, "spiculated", radius)
    elif kind in ("juxta_pleural", "juxta_vascular"):
        shape = _shape(rng, "lobulated" if rng.random() < 0.4 else "sphere", radius)
    else:
        pick = float(rng.random())
        shape = _shape(
            rng, "sphere" if pick < 0.4 else "lobulated" if pick < 0.7 else "irregular", radius
        )
    location = "intraparenchymal"
    allowed = family - {c for c in family if c not in (*parenchyma, VESSEL[side])}
    need_vessel = False
    if kind in ("solid", "part_solid", "ground_glass"):
        centre = np.array(
            [
                rng.uniform(info.centre[0] - a, info.centre[0] + a),
                rng.uniform(info.centre[1] - b, info.centre[1] + b),
                rng.uniform(z_lo, z_hi),
            ]
        )
        if grid.at(centre) not in parenchyma:
            return None
        clip_to = allowed
        whole = True
    elif kind == "juxta_vascular":
        candidates = [s for s in chest.vessels if min(s[2], s[3]) >= 1.5]
        if not candidates:
            return None
        va, vb, ra, rb = candidates[int(rng.integers(0, len(candidates)))]
        t = float(rng.uniform(0.2, 0.8))
        p = va + t * (vb - va)
        if grid.at(p) != VESSEL[side]:
            return None
        axis = (vb - va) / max(float(np.linalg.norm(vb - va)), 1e-6)
        helper = np.array([0.0, 0.0, 1.0]) if abs(axis[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
        u = np.cross(axis, helper)
        u /= np.linalg.norm(u)
        phi = float(rng.uniform(0, 2 * np.pi))
        n = u * math.cos(phi) + np.cross(axis, u) * math.sin(phi)
        centre = p + n * (ra + t * (rb - ra) + radius * float(rng.uniform(0.75, 0.95)))
        location, clip_to, whole, need_vessel = "juxta_vascular", parenchyma, False, True
    else:
        z = float(rng.uniform(z_lo, z_hi))
        start = np.array([info.centre[0], info.centre[1], z])
        sign = -1.0 if side == "right" else 1.0
        if kind == "juxta_pleural":
            location = "juxta_pleural"
            ang = float(rng.uniform(0, 2 * np.pi))
            direction = np.array([math.cos(ang), math.sin(ang), 0.0])
            if direction[0] * sign < -0.3:  # medial rays end on the mediastinum, not the wall
                direction[0] = -direction[0]
        else:
            location = ("hilar", "mediastinal", "pleural")[int(rng.integers(0, 3))]
            if location == "hilar":
                direction = np.asarray(info.hilum) - start
                direction[2] = 0.0
            elif location == "mediastinal":
                direction = np.array([-sign, float(rng.uniform(-0.4, 0.4)), 0.0])
            else:
                direction = np.array([sign, float(rng.uniform(-0.6, 0.9)), 0.0])
            direction /= np.linalg.norm(direction)
        edge = _boundary(grid, start, direction, family, 2.5 * max(a, b))
        if edge is None:
            return None
        centre = edge - direction * radius * float(rng.uniform(0.55, 0.85))
        clip_to = allowed if kind == "juxta_pleural" else family
        whole = False
    reach = radius + margin
    window = grid.box(centre - reach, centre + reach)
    if window is None:
        return None
    sub = grid.tissue[window]
    dz, dy, dx = grid.offsets(window, centre)
    near = dx * dx + dy * dy + dz * dz <= reach * reach
    classes = sub[near]
    if np.any(classes >= TUMOUR_CLASS_BASE):
        return None  # would touch another tumour
    other = LUNG_FAMILY["left" if side == "right" else "right"]
    if np.isin(classes, list(other)).any():
        return None
    inside = _inside(shape, dz, dy, dx)
    in_lung = np.isin(sub, list(clip_to))
    if whole:
        if not np.all(np.isin(classes, list(allowed))):
            return None
        mask = inside
    else:
        mask = inside & in_lung
        total = int(np.count_nonzero(inside))
        if total == 0 or np.count_nonzero(mask) < (0.5 if kind == "mass" else 0.6) * total:
            return None
        if np.count_nonzero(mask) == total:
            return None  # juxta-* must be cut by the wall or the vessel it touches
    if not mask.any():
        return None
    if label_planes is not None and not mask[label_planes[window[0]]].any():
        return None  # between two label planes: no voxel of it would be in the label map
    if need_vessel:
        # It must touch the vessel: a face neighbour of the nodule is vessel.
        shifted = np.zeros_like(mask)
        for axis_ in range(3):
            for step in (-1, 1):
                shifted |= np.roll(mask, step, axis=axis_)
        if not (shifted & (sub == VESSEL[side])).any():
            return None
    body_class = TUMOUR_CLASS_BASE + 2 * index
    core_class = body_class + 1
    core_hu: float | None = None
    core_d: float | None = None
    core_mask = None
    if density == "part_solid":
        hu = round(float(rng.uniform(-600.0, -400.0)), 1)
        core_hu = round(float(rng.uniform(0.0, 60.0)), 1)
        rc = radius * float(rng.uniform(0.3, 0.55))
        core_mask = (dx * dx + dy * dy + dz * dz <= rc * rc) & mask
        core_d = round(2 * rc, 2)
    elif density == "ground_glass":
        hu = round(float(rng.uniform(-700.0, -500.0)), 1)
    elif kind == "mass":
        hu = round(float(rng.uniform(30.0, 55.0)), 1)
        core_hu = (
            round(hu - float(rng.uniform(10.0, 20.0)), 1)
            if rng.random() < 0.5
            else round(float(rng.uniform(5.0, 15.0)), 1)
        )
        rc = radius * float(rng.uniform(0.3, 0.5))
        core_mask = (dx * dx + dy * dy + dz * dz <= rc * rc) & mask
        core_d = round(2 * rc, 2)
    else:
        hu = round(float(rng.uniform(0.0, 60.0)), 1)
    np.copyto(sub, np.uint8(body_class), where=mask)
    if core_mask is not None:
        np.copyto(sub, np.uint8(core_class), where=core_mask)
    kk, rr_, cc = np.nonzero(mask)
    zs, ys, xs = grid.zs[window[0]], grid.ys[window[1]], grid.xs[window[2]]
    centroid = (float(xs[cc].mean()), float(ys[rr_].mean()), float(zs[kk].mean()))
    extents = (
        (cc.max() - cc.min() + 1) * spacing[0],
        (rr_.max() - rr_.min() + 1) * spacing[1],
        (kk.max() - kk.min() + 1) * spacing[2],
    )
    return PlacedTumour(
        index=index,
        type=kind,
        density=density,
        shape=shape[0],
        location=location,
        side=side,
        hu=hu,
        core_hu=core_hu,
        centre_mm=(round(centroid[0], 2), round(centroid[1], 2), round(centroid[2], 2)),
        diameter_mm=round(float(max(extents)), 2),
        core_diameter_mm=core_d,
    )
