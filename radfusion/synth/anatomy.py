"""Realistic chest anatomy for the synthetic CT: what a lung model and a nodule detector meet.

:func:`build_chest` fills the tissue-class volume of a fine :class:`~radfusion.synth.shapes.Grid`
with a chest whose parts a detector must tell from nodules: pulmonary artery and vein trees
branching from each hilum (tapering cylinders of 1-12 mm calibre at blood density, so a vessel
running along z looks like a nodule on one slice), airways with walls (trachea, main, lobar and
segmental bronchi), heart, aorta and pulmonary trunk, ribs, spine and sternum, domed
hemidiaphragms with liver, spleen and stomach below, fissures, and optionally emphysema and
pleural effusion.

Sizes are in mm and vary by seed (body half-width 150-195 mm, capped so the body fits the field
of view); heights scale with the stack so short test stacks still hold whole lungs. Each
voxel gets one tissue class (:data:`TISSUES` gives its label name, nominal HU and structure);
intrapulmonary structures have a right and a left class so that the label map keeps them in
their lung, as clinical lung masks include vessels and small airways.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from radfusion.synth.shapes import Grid, identity_lut

__all__ = [
    "LUNG_FAMILY",
    "STRUCTURES",
    "TISSUES",
    "TUMOUR_CLASS_BASE",
    "Chest",
    "LungInfo",
    "build_chest",
]

AIR, FAT, MUSCLE, MED_FAT, BLOOD, HEART, CORTEX, MARROW, DISC = 0, 1, 2, 3, 4, 5, 6, 7, 8
LIVER, SPLEEN, GAS, FLUID, AIRWAY_MED, WALL_MED, ESOPHAGUS, EFFUSION = 9, 10, 11, 12, 13, 14, 15, 16
SIDES = ("right", "left")
LUNG = {"right": 20, "left": 21}
VESSEL = {"right": 22, "left": 23}
AIRWAY = {"right": 24, "left": 25}
WALL = {"right": 26, "left": 27}
FISSURE = {"right": 28, "left": 29}
EMPHYSEMA = {"right": 30, "left": 31}
TUMOUR_CLASS_BASE = 64
"""Tumour ``i`` has classes ``TUMOUR_CLASS_BASE + 2i`` (its body) and ``+ 2i + 1`` (a solid
core or a necrotic centre)."""

LUNG_FAMILY: dict[str, frozenset[int]] = {
    side: frozenset(t[side] for t in (LUNG, VESSEL, AIRWAY, WALL, FISSURE, EMPHYSEMA))
    for side in SIDES
}
"""Classes that are lung of a side in the label map (parenchyma and what runs inside it)."""

STRUCTURES: dict[str, int] = {
    "none": 0,
    "vessel": 1,  # intrapulmonary artery or vein: must not be called a nodule
    "airway": 2,  # lumen
    "airway_wall": 3,
    "fissure": 4,
    "emphysema": 5,
    "effusion": 6,
    "heart": 7,
    "great_vessel": 8,  # aorta, pulmonary trunk and arteries in the mediastinum
    "bone": 9,
    "abdominal_organ": 10,  # liver, spleen, stomach below the diaphragm
    "tumour": 11,
}
"""Codes of the ``structures`` map written next to the labels: which anatomy each voxel is."""

TISSUES: dict[int, tuple[str, float, str]] = {
    # class: (label name, nominal HU, structure)
    AIR: ("background", -1000.0, "none"),
    FAT: ("body", -100.0, "none"),
    MUSCLE: ("body", 45.0, "none"),
    MED_FAT: ("body", -90.0, "none"),
    BLOOD: ("body", 42.0, "great_vessel"),
    HEART: ("body", 40.0, "heart"),
    CORTEX: ("bone", 800.0, "bone"),
    MARROW: ("bone", 230.0, "bone"),
    DISC: ("body", 80.0, "none"),
    LIVER: ("body", 58.0, "abdominal_organ"),
    SPLEEN: ("body", 48.0, "abdominal_organ"),
    GAS: ("body", -1000.0, "abdominal_organ"),
    FLUID: ("body", 15.0, "abdominal_organ"),
    AIRWAY_MED: ("body", -1000.0, "airway"),
    WALL_MED: ("body", 30.0, "airway_wall"),
    ESOPHAGUS: ("body", 35.0, "none"),
    EFFUSION: ("body", 10.0, "effusion"),
    **{LUNG[s]: (f"{s}_lung", -860.0, "none") for s in SIDES},
    **{VESSEL[s]: (f"{s}_lung", 45.0, "vessel") for s in SIDES},
    **{AIRWAY[s]: (f"{s}_lung", -1000.0, "airway") for s in SIDES},
    **{WALL[s]: (f"{s}_lung", 20.0, "airway_wall") for s in SIDES},
    **{FISSURE[s]: (f"{s}_lung", -790.0, "fissure") for s in SIDES},
    **{EMPHYSEMA[s]: (f"{s}_lung", -955.0, "emphysema") for s in SIDES},
}

_ALL_LUNG = LUNG_FAMILY["right"] | LUNG_FAMILY["left"]
_PARENCHYMA = tuple(LUNG[s] for s in SIDES) + tuple(FISSURE[s] for s in SIDES)


@dataclass(frozen=True)
class LungInfo:
    """Where one lung is: its axial footprint ellipse, z extent and hilum (LPS mm)."""

    side: str
    centre: tuple[float, float]  # footprint centre (x, y)
    semi: tuple[float, float]  # footprint semi-axes (x, y)
    z_base: float  # lowest point (costophrenic recess)
    z_apex: float
    hilum: tuple[float, float, float]


@dataclass
class Chest:
    """What :func:`build_chest` drew, for placing tumours next to it."""

    lungs: dict[str, LungInfo]
    vessels: list[tuple[np.ndarray, np.ndarray, float, float]] = field(default_factory=list)
    # intrapulmonary vessel segments (start, end, start radius, end radius), mm
    body_semi: tuple[float, float] = (0.0, 0.0)
    vessel_hu: float = 45.0


class _Blob:
    """An ellipse on the bounding box of a slice grid; a plane draws it scaled by ``s``."""

    def __init__(
        self, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, a: float, b: float
    ) -> None:
        c0, c1 = int(np.searchsorted(xs, cx - a)), int(np.searchsorted(xs, cx + a, "right"))
        r0, r1 = int(np.searchsorted(ys, cy - b)), int(np.searchsorted(ys, cy + b, "right"))
        self.window = (slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))
        x = xs[self.window[1]][None, :].astype(np.float32)
        y = ys[self.window[0]][:, None].astype(np.float32)
        self.e = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2

    def draw(self, plane: np.ndarray, lut: np.ndarray, scale: float = 1.0) -> None:
        if scale <= 0 or self.e.size == 0:
            return
        sub = plane[self.window]
        np.copyto(sub, lut[sub], where=self.e <= scale * scale)


def _lut(mapping: dict[int, int]) -> np.ndarray:
    lut = identity_lut()
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def _unit(v: np.ndarray) -> np.ndarray:
    return v / float(np.linalg.norm(v))


def _rotate(d: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' rotation of ``d`` about the unit ``axis``."""
    c, s = math.cos(angle), math.sin(angle)
    return d * c + np.cross(axis, d) * s + axis * float(axis @ d) * (1 - c)


def _perpendicular(d: np.ndarray, phi: float) -> np.ndarray:
    """The unit vector perpendicular to ``d`` at angle ``phi`` around it."""
    helper = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = _unit(np.cross(d, helper))
    w = np.cross(d, u)
    return u * math.cos(phi) + w * math.sin(phi)


def _grow_tree(
    rng: np.random.Generator,
    grid: Grid,
    roots: list[tuple[np.ndarray, np.ndarray, float]],
    r_min: float,
    max_segments: int,
    inside: frozenset[int],
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Grow a branching tree (Murray's law radii) from ``roots`` (start, direction, radius).

    A segment is kept only if it ends in a class of ``inside`` (a few directions are tried),
    so trees fill the lung without leaving it; a branch stops below ``r_min``.
    """
    segments: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    stack = [(np.asarray(p, float), _unit(np.asarray(d, float)), r, 0) for p, d, r in roots]
    stack.reverse()
    while stack and len(segments) < max_segments:
        p, d, r, depth = stack.pop()
        length = r * float(rng.uniform(4.0, 7.0)) + 3.0
        end = None
        for attempt in range(5):
            dd = d
            if attempt:  # bend towards free lung
                dd = _unit(
                    _rotate(
                        d,
                        _perpendicular(d, float(rng.uniform(0, 2 * np.pi))),
                        float(rng.uniform(0.3, 0.9)),
                    )
                )
            q = p + dd * length
            if grid.at(q) in inside:
                end, d = q, dd
                break
        if end is None:
            if depth > 1:
                continue
            end = p + d * length  # the first generations may cross the mediastinum
        r_end = r * 0.93
        segments.append((p, end, r, r_end))
        r1 = r_end * float(rng.uniform(0.76, 0.9))
        r2 = max(r_end**3 - r1**3, 0.0) ** (1 / 3)
        axis = _perpendicular(d, float(rng.uniform(0, 2 * np.pi)))
        children = [
            (r2, _rotate(d, axis, -float(rng.uniform(0.55, 1.0)))),
            (r1, _rotate(d, axis, float(rng.uniform(0.15, 0.45)))),
        ]
        for rc, dc in children:
            if rc >= r_min:
                stack.append((end, _unit(dc), rc, depth + 1))
    return segments


def build_chest(
    rng: np.random.Generator,
    grid: Grid,
    *,
    emphysema: bool = False,
    effusion: bool = False,
) -> Chest:
    """Fill ``grid.tissue`` with a realistic chest; returns where the lungs and vessels are.

    A grid whose field of view is small for a chest gets a body scaled to fit it.
    """
    xs, ys, zs, tissue = grid.xs, grid.ys, grid.zs, grid.tissue
    ps = float(xs[1] - xs[0]) if len(xs) > 1 else 1.0
    fov = min(xs[-1] - xs[0], ys[-1] - ys[0]) + ps
    w = min(float(rng.uniform(150.0, 195.0)), 0.46 * fov)
    d = w * float(rng.uniform(0.62, 0.74))
    z_lo, z_hi = float(zs[0]), float(zs[-1])
    span = z_hi - z_lo
    h = min(0.84 * span, float(rng.uniform(220.0, 280.0)))
    z_apex = z_hi - 0.35 * (span - h)
    z_base = z_apex - h
    size = w / 170.0  # mediastinal and skeletal sizes follow the body

    # -- the template: air, subcutaneous fat, chest wall muscle, thoracic cavity, arch ---------
    x2, y2 = xs[None, :].astype(np.float32), ys[:, None].astype(np.float32)
    fat_t = float(rng.uniform(8.0, 25.0))

    def superellipse(a: float, b: float, power: float, cy: float = 0.0) -> np.ndarray:
        return (np.abs(x2) / a) ** power + (np.abs(y2 - cy) / b) ** power <= 1

    template = np.full((len(ys), len(xs)), AIR, dtype=np.uint8)
    template[superellipse(w, d, 2.4)] = FAT
    template[superellipse(w - fat_t, d - fat_t, 2.4)] = MUSCLE
    cavity = superellipse(0.87 * w, 0.80 * d, 2.6, cy=-0.02 * d)
    template[cavity] = MED_FAT
    spine_y = 0.56 * d
    vb = (19.0 * size, 15.0 * size)
    arch = _Blob(xs, ys, 0.0, spine_y + vb[1] + 10 * size, 24 * size, 9 * size)
    arch.draw(template, _lut({MUSCLE: CORTEX, MED_FAT: CORTEX}))
    _Blob(xs, ys, 0.0, spine_y + vb[1] + 9 * size, 7 * size, 6 * size).draw(
        template, _lut({CORTEX: FLUID})
    )
    _Blob(xs, ys, 0.0, spine_y + vb[1] + 28 * size, 5 * size, 14 * size).draw(
        template, _lut({MUSCLE: CORTEX})
    )  # spinous process

    # -- lungs, diaphragm, heart, organs below the domes: per plane ----------------------------
    lungs: dict[str, LungInfo] = {}
    foot_class = np.zeros_like(template)
    foot_e = np.full(template.shape, 9.0, dtype=np.float32)
    dome = np.empty(template.shape, dtype=np.float32)
    for side, sign in (("right", -1.0), ("left", 1.0)):
        cx, cy = sign * 0.45 * w, 0.02 * d
        a = 0.37 * w * float(rng.uniform(0.96, 1.04))
        b = 0.78 * d * float(rng.uniform(0.96, 1.04))
        e = ((x2 - cx) / a) ** 2 + ((y2 - cy) / b) ** 2
        mine = (e <= 1.0) & cavity
        foot_e[mine] = e[mine]
        foot_class[mine] = LUNG[side]
        zb = z_base + (12.0 * h / 250.0 if side == "right" else 0.0)  # the liver lifts it
        hd = 0.27 * h
        half = (x2 < 0) if side == "right" else (x2 >= 0)
        field_ = zb + hd * np.maximum(
            0.0, 1.0 - ((x2 - sign * 0.40 * w) / (0.55 * w)) ** 2 - ((y2 + 0.05 * d) / d) ** 2
        )
        np.copyto(dome, field_, where=np.broadcast_to(half, dome.shape))
        lungs[side] = LungInfo(side, (cx, cy), (a, b), zb, z_apex, (0.0, 0.0, 0.0))
    below = np.zeros_like(template)  # the organ under each dome
    below[cavity] = MUSCLE
    liver_e = ((x2 + 0.30 * w) / (0.62 * w)) ** 2 + ((y2 + 0.05 * d) / (0.85 * d)) ** 2
    below[cavity & (liver_e <= 1)] = LIVER
    spleen_e = ((x2 - 0.62 * w) / (0.20 * w)) ** 2 + ((y2 - 0.40 * d) / (0.32 * d)) ** 2
    below[cavity & (spleen_e <= 1)] = SPLEEN
    stomach_e = ((x2 - 0.38 * w) / (0.24 * w)) ** 2 + ((y2 + 0.25 * d) / (0.35 * d)) ** 2
    stomach = cavity & (stomach_e <= 1)
    below[stomach] = FLUID
    below[stomach & (y2 < -0.40 * d)] = GAS  # supine: the gas rises anteriorly
    heart_c = np.array([0.14 * w, -0.22 * d, lungs["left"].z_base + 0.27 * h + 10.0])
    heart_s = np.array([0.36 * w, 0.40 * d, min(60.0, 0.22 * h)])
    heart = _Blob(xs, ys, heart_c[0], heart_c[1], heart_s[0], heart_s[1])
    peri = _Blob(xs, ys, heart_c[0], heart_c[1], heart_s[0] * 1.07, heart_s[1] * 1.07)
    lung_to = {c: HEART for c in _ALL_LUNG} | {MED_FAT: HEART, MUSCLE: HEART}
    heart_lut = _lut(lung_to)
    peri_lut = _lut(dict.fromkeys(_ALL_LUNG, MED_FAT))
    vbody = _Blob(xs, ys, 0.0, spine_y, vb[0], vb[1])
    vcortex = _lut({MED_FAT: CORTEX, MUSCLE: CORTEX})
    vmarrow = _lut({CORTEX: MARROW})
    vdisc = _lut({MED_FAT: DISC, MUSCLE: DISC})
    sternum = _Blob(xs, ys, 0.0, -0.90 * d, 14 * size, 6 * size)
    sternum_lut = _lut({MED_FAT: CORTEX, MUSCLE: CORTEX, FAT: CORTEX})
    period, disc_t, phase = 27.0, 6.0, float(rng.uniform(0.0, 27.0))
    rows = np.nonzero(cavity.any(axis=1))[0]
    cols = np.nonzero(cavity.any(axis=0))[0]
    cw = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    c_foot, c_e, c_dome, c_below = foot_class[cw], foot_e[cw], dome[cw], below[cw]
    c_is_lung = c_foot != 0
    c_cavity = cavity[cw]
    for j, z in enumerate(zs):
        plane = tissue[j]
        np.copyto(plane, template)
        z = float(z)
        if (z + phase) % period < disc_t:
            vbody.draw(plane, vdisc)
        else:
            vbody.draw(plane, vcortex)
            vbody.draw(plane, vmarrow, 0.8)
        if heart_c[2] - 10 < z < z_apex - 0.12 * h:
            sternum.draw(plane, sternum_lut)
        u = (z_apex - z) / (0.45 * h)  # 0 at the apex; the top is an ellipsoidal cap
        s = math.sqrt(max(0.0, 1.0 - (1.0 - u) ** 2)) if u < 1 else 1.0
        sub = plane[cw]
        if s > 0:
            lung_now = c_is_lung & (c_e <= s * s) & (c_dome < z)
            np.copyto(sub, c_foot, where=lung_now)
        np.copyto(sub, c_below, where=c_cavity & (c_dome >= z) & (sub == MED_FAT))
        hz = (z - heart_c[2]) / heart_s[2]
        if abs(hz) < 1:
            peri.draw(plane, peri_lut, math.sqrt(1 - hz * hz))
            heart.draw(plane, heart_lut, math.sqrt(1 - hz * hz))

    # -- ribs ------------------------------------------------------------------------------------
    bone_onto = {MED_FAT: CORTEX, MUSCLE: CORTEX, FAT: CORTEX}
    rib_cortex, rib_marrow = _lut(bone_onto), _lut({CORTEX: MARROW})
    n_ribs = 12
    for i in range(n_ribs):
        z_post = z_apex + 8.0 - i * (h + 30.0) / n_ribs
        phi_end = 2.55 - 0.08 * i
        for sign in (-1.0, 1.0):
            phis = np.linspace(0.35, phi_end, 10)
            pts = [
                np.array(
                    [
                        sign * 0.90 * w * math.sin(p),
                        0.84 * d * math.cos(p) - 0.02 * d,
                        z_post - 28.0 * (p - 0.35) * h / 250.0,
                    ]
                )
                for p in phis
            ]
            for p0, p1 in itertools.pairwise(pts):
                grid.capsule(p0, p1, 5.0 * size, 5.0 * size, rib_cortex)
                grid.capsule(p0, p1, 3.0 * size, 3.0 * size, rib_marrow)

    # -- airways -------------------------------------------------------------------------------
    carina = np.array([0.0, 0.15 * d, z_apex - 0.30 * h])
    hila = {
        "right": np.array([-0.17 * w, 0.12 * d, carina[2] - 0.08 * h]),
        "left": np.array([0.19 * w, 0.14 * d, carina[2] - 0.12 * h]),
    }
    for side in SIDES:
        info = lungs[side]
        hx, hy, hz = (float(v) for v in hila[side])
        lungs[side] = LungInfo(side, info.centre, info.semi, info.z_base, info.z_apex, (hx, hy, hz))
    wall_lut = _lut(
        {MED_FAT: WALL_MED, MUSCLE: WALL_MED, BLOOD: WALL_MED, ESOPHAGUS: WALL_MED}
        | {LUNG[s]: WALL[s] for s in SIDES}
        | {FISSURE[s]: WALL[s] for s in SIDES}
    )
    lumen_lut = _lut(
        {MED_FAT: AIRWAY_MED, MUSCLE: AIRWAY_MED, WALL_MED: AIRWAY_MED, BLOOD: AIRWAY_MED}
        | {c: AIRWAY[s] for s in SIDES for c in (LUNG[s], FISSURE[s], WALL[s])}
    )

    def airway(a: np.ndarray, b: np.ndarray, ra: float, rb: float) -> None:
        grid.capsule(a, b, ra + 0.22 * ra + 0.6, rb + 0.22 * rb + 0.6, wall_lut)
        grid.capsule(a, b, ra, rb, lumen_lut)

    top = np.array([0.0, 0.12 * d, z_hi + 10.0])
    airway(top, carina, 8.5 * size, 8.0 * size)
    airway_roots: list[tuple[np.ndarray, np.ndarray, float]] = []
    lobar = {
        "right": [(-0.6, 0.1, 0.8), (-0.5, -0.7, -0.5), (-0.3, 0.5, -0.8)],
        "left": [(0.5, -0.3, 0.8), (0.4, -0.5, -0.4), (0.3, 0.5, -0.8)],
    }
    for side in SIDES:
        airway(carina, hila[side], 6.5 * size, 5.5 * size)
        for direction in lobar[side]:
            v = _unit(np.array(direction))
            end = hila[side] + v * 14.0
            airway(hila[side], end, 4.5, 4.0)
            airway_roots.append((end, v, 3.6))
    for a_, b_, ra, rb in _grow_tree(rng, grid, airway_roots, 0.9, 220, _ALL_LUNG):
        airway(a_, b_, ra, rb)

    # -- great vessels, oesophagus --------------------------------------------------------------
    blood_lut = _lut(
        {MED_FAT: BLOOD, MUSCLE: BLOOD, HEART: BLOOD} | dict.fromkeys(_ALL_LUNG, BLOOD)
    )
    heart_top = heart_c[2] + 0.8 * heart_s[2]
    r_ao = 14.0 * size
    arch_z = carina[2] + 22.0
    aorta = [
        np.array([-0.06 * w, -0.18 * d, heart_c[2]]),
        np.array([-0.06 * w, -0.16 * d, arch_z - 10.0]),
        np.array([0.00 * w, 0.02 * d, arch_z]),
        np.array([0.12 * w, 0.32 * d, arch_z - 12.0]),
        np.array([0.13 * w, 0.38 * d, z_lo - 10.0]),
    ]
    for p0, p1 in itertools.pairwise(aorta):
        grid.capsule(p0, p1, r_ao, r_ao * 0.9, blood_lut)
    bifurcation = np.array([0.05 * w, -0.04 * d, carina[2] - 0.06 * h])
    grid.capsule(
        np.array([0.10 * w, -0.32 * d, heart_top - 15]),
        bifurcation,
        13 * size,
        12 * size,
        blood_lut,
    )
    grid.capsule(
        np.array([0.04 * w, 0.34 * d, z_hi + 10]),
        np.array([0.03 * w, 0.33 * d, z_lo]),
        7 * size,
        7 * size,
        _lut({MED_FAT: ESOPHAGUS, MUSCLE: ESOPHAGUS}),
    )

    # -- intrapulmonary arteries and veins ----------------------------------------------------
    vessel_lut = _lut(
        {c: VESSEL[s] for s in SIDES for c in (LUNG[s], FISSURE[s], EMPHYSEMA[s])}
        | {MED_FAT: BLOOD, MUSCLE: BLOOD}
    )
    vessels: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for side, sign in (("right", -1.0), ("left", 1.0)):
        hilum = hila[side]
        pa_root = hilum + np.array([0.0, -6.0, 8.0])
        grid.capsule(bifurcation, pa_root, 10.0 * size, 9.0 * size, blood_lut)
        vein_root = np.array([sign * 0.10 * w, 0.04 * d, hilum[2] - 28.0])
        grid.capsule(
            np.array([0.05 * w, 0.02 * d, heart_c[2] + 0.5 * heart_s[2]]),
            vein_root,
            7.0 * size,
            6.0 * size,
            blood_lut,
        )
        roots = []
        # Two arteries per lobe beside the bronchi, and veins fanning out from below the hilum.
        for direction in lobar[side] * 2:
            v = _unit(np.array(direction) + rng.normal(0, 0.25, 3))
            roots.append((pa_root, v, float(rng.uniform(4.0, 5.5))))
        for direction in ((sign, 0.2, 0.6), (sign, -0.4, -0.1), (sign * 0.6, 0.6, -0.6)) * 2:
            v = _unit(np.array(direction) + rng.normal(0, 0.25, 3))
            roots.append((vein_root, v, float(rng.uniform(3.5, 5.0))))
        segs = _grow_tree(rng, grid, roots, 0.5, 4000, _ALL_LUNG)
        for a_, b_, ra, rb in segs:
            grid.capsule(a_, b_, ra, rb, vessel_lut)
        vessels.extend(segs)

    # -- fissures, emphysema, effusion -------------------------------------------------------
    fissure_lut = _lut({LUNG[s]: FISSURE[s] for s in SIDES})
    for side, sign in (("right", -1.0), ("left", 1.0)):
        info = lungs[side]
        hil = hila[side]
        win = grid.box(
            np.array([info.centre[0] - info.semi[0], info.centre[1] - info.semi[1], info.z_base]),
            np.array([info.centre[0] + info.semi[0], info.centre[1] + info.semi[1], z_apex]),
        )
        if win is None:
            continue
        fx = xs[win[2]][None, :].astype(np.float32)
        fy = ys[win[1]][:, None].astype(np.float32)
        slope = float(rng.uniform(1.1, 1.5))
        oblique = slope * (fy - hil[1]) - 0.0006 * (fx - hil[0]) ** 2
        half_width = 0.5 * math.sqrt(1.0 + slope * slope)
        horizontal = 0.08 * (fy - hil[1]) + 0.03 * (fx - hil[0]) * sign
        z_h = hil[2] + float(rng.uniform(0.0, 10.0))
        for j in range(win[0].start, win[0].stop):
            dz = float(zs[j]) - hil[2]
            band = np.abs(dz - oblique) < half_width
            if side == "right":
                band |= (np.abs(float(zs[j]) - z_h - horizontal) < 0.6) & (dz > oblique)
            sub = tissue[j, win[1], win[2]]
            np.copyto(sub, fissure_lut[sub], where=band)
    if emphysema:
        emph_lut = _lut({LUNG[s]: EMPHYSEMA[s] for s in SIDES})
        for _ in range(int(rng.integers(60, 140))):
            side = SIDES[int(rng.integers(0, 2))]
            info = lungs[side]
            for _try in range(20):
                p = np.array(
                    [
                        rng.uniform(info.centre[0] - info.semi[0], info.centre[0] + info.semi[0]),
                        rng.uniform(info.centre[1] - info.semi[1], info.centre[1] + info.semi[1]),
                        rng.uniform(info.z_base + 0.4 * h, z_apex),  # upper-lobe predominant
                    ]
                )
                if grid.at(p) == LUNG[side]:
                    r = float(rng.uniform(1.5, 7.0))
                    grid.capsule(p, p, r, r, emph_lut)
                    break
    if effusion:
        eff_lut = _lut(dict.fromkeys(_ALL_LUNG, EFFUSION))
        for side in SIDES if rng.random() < 0.5 else (SIDES[int(rng.integers(0, 2))],):
            info = lungs[side]
            depth, height = float(rng.uniform(25.0, 50.0)), float(rng.uniform(50.0, 90.0))
            y_post = info.centre[1] + info.semi[1]
            win = grid.box(
                np.array([info.centre[0] - info.semi[0], y_post - depth, info.z_base]),
                np.array([info.centre[0] + info.semi[0], y_post, info.z_base + height]),
            )
            if win is None:
                continue
            fy = ys[win[1]][:, None]
            for j in range(win[0].start, win[0].stop):
                level = y_post - depth * (1.0 - (float(zs[j]) - info.z_base) / height)
                sub = tissue[j, win[1], win[2]]
                mask = np.broadcast_to(fy > level, sub.shape)
                np.copyto(sub, eff_lut[sub], where=mask)
    vessel_hu = float(rng.uniform(30.0, 60.0))
    return Chest(lungs=lungs, vessels=vessels, body_semi=(float(w), float(d)), vessel_hu=vessel_hu)
