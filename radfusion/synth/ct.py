"""Synthetic chest CT phantoms with exact ground truth.

Test data for the DICOM node, and for training and evaluating a lung and lung-tumour
segmentation model. Nothing here comes from a real patient.

A chest phantom is a stack of axial slices: air outside an elliptical body (soft tissue under a
rim of subcutaneous fat), two lungs that taper towards apex and base, a heart that notches the
left lung, trachea and main bronchi, a spine (vertebral bodies with discs) and a sternum, and
0..K spherical tumours placed wholly inside a lung. Gaussian noise is added to the HU values,
never to the labels. ``chest=False`` gives an abdomen/pelvis-like body (liver, kidneys, bowel
gas, iliac bones) with no lungs and no tumours, to test "input out of scope".

Geometry is DICOM geometry in LPS. ImageOrientationPatient is ``[1,0,0, 0,1,0]``: the column
index ``c`` grows towards the patient's left (+x), the row index ``r`` towards posterior (+y),
and the slice index ``k`` towards the head (+z, by ``slice_thickness``). The right lung therefore
lies at low column indices. Arrays are indexed ``[k, r, c]``; :meth:`Phantom.affine` maps
``(c, r, k, 1)`` (the reverse order) to ``(x, y, z, 1)`` in mm. Every z is negative: the top
slice is at z = -50 mm.

Pixel data are written signed (PixelRepresentation 1) with RescaleIntercept 0 and slope 1, so a
stored value is the HU value; values are clipped to [-1024, 3071] as a scanner would.

``style="realistic"`` gives instead a chest that looks like clinical CT (see
:mod:`radfusion.synth.anatomy`, :mod:`radfusion.synth.nodules` and
:mod:`radfusion.synth.acquisition`): vessel trees, airways with walls, ribs, domed diaphragm,
fissures, optional emphysema and effusion; solid, part-solid, ground-glass, juxta-pleural,
juxta-vascular nodules and masses; partial volume of thick slices, kernel noise and texture,
and a scan circle. :mod:`radfusion.synth.ct_series` writes a phantom as a DICOM CT series
(``write_ct_series``, with GE, Siemens, Philips or Canon style headers and pixel encodings) and
``synth_ct`` makes and writes one.

Everything is deterministic: the same arguments give byte-identical arrays and files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from radfusion.synth import acquisition, anatomy, nodules, vendors
from radfusion.synth.shapes import Grid

__all__ = [
    "KERNELS",
    "LABELS",
    "MAX_TUMOURS",
    "NOISE_SIGMA_HU",
    "STRUCTURES",
    "STYLES",
    "TUMOUR_LABEL_BASE",
    "TUMOUR_TYPES",
    "UID_ROOT",
    "VENDORS",
    "Phantom",
    "Tumour",
    "make_phantom",
]

LABELS: dict[str, int] = {
    "background": 0,
    "body": 1,
    "bone": 2,
    "right_lung": 3,
    "left_lung": 4,
}
"""Label values of the ground truth label map. Tumour ``k`` (0-based) has ``TUMOUR_LABEL_BASE + k``.

Airways, heart, fat and the abdominal organs are all ``body``."""

TUMOUR_LABEL_BASE = 10
MAX_TUMOURS = 32
NOISE_SIGMA_HU = 20.0
STYLES = ("simple", "realistic")
KERNELS = acquisition.KERNELS
VENDORS = vendors.VENDORS
TUMOUR_TYPES = nodules.TUMOUR_TYPES
STRUCTURES = anatomy.STRUCTURES
"""Codes of the ``structures`` array of labels.npz (realistic phantoms): vessels, airways and
the rest a detector must not call a nodule. Labels stay as :data:`LABELS`: intrapulmonary
vessels and airways are lung there, as in clinical lung masks."""

UID_ROOT = "1.2.826.0.1.3680043.10.1234.9."
"""Root of every UID of synthetic data: arc 9 under radfusion's example root, kept apart from the
UIDs radfusion itself creates for results."""

IMPLEMENTATION_CLASS_UID = UID_ROOT + "0"
IMPLEMENTATION_VERSION_NAME = "RADFUSION_SYN1"

_TUMOUR_RADIUS_MM = (4.0, 15.0)
_TUMOUR_HU = (0.0, 60.0)
_ATTEMPTS_PER_TUMOUR = 3000
_HU_MIN, _HU_MAX = -1024, 3071
# Lungs span this fraction of the stack (t = (k + 0.5) / slices); outside it no slice has lung,
# so the stack has lung-free slices at both ends, as a real chest CT does.
_LUNG_APEX_T = 0.93
_LUNG_BASE_T = {"left": 0.07, "right": 0.11}  # the liver lifts the right hemidiaphragm

# Tissue classes of the internal map; labels and nominal HU are looked up from them, so one
# volume of uint8 drives both outputs.
_AIR, _FAT, _SOFT, _BLOOD, _BONE, _LUNG_R, _LUNG_L, _AIRWAY = 0, 1, 2, 3, 4, 5, 6, 7
_LIVER, _KIDNEY, _GAS, _DISC = 8, 9, 10, 11
_TUMOUR_TISSUE_BASE = 32
_LUNG_TISSUE = {"right": _LUNG_R, "left": _LUNG_L}
_TISSUE: dict[int, tuple[int, float]] = {  # tissue -> (label, nominal HU)
    _AIR: (LABELS["background"], -1000.0),
    _FAT: (LABELS["body"], -100.0),
    _SOFT: (LABELS["body"], 40.0),
    _BLOOD: (LABELS["body"], 45.0),
    _BONE: (LABELS["bone"], 550.0),
    _LUNG_R: (LABELS["right_lung"], -850.0),
    _LUNG_L: (LABELS["left_lung"], -850.0),
    _AIRWAY: (LABELS["body"], -1000.0),
    _LIVER: (LABELS["body"], 60.0),
    _KIDNEY: (LABELS["body"], 30.0),
    _GAS: (LABELS["body"], -950.0),
    _DISC: (LABELS["body"], 80.0),
}


@dataclass(frozen=True)
class Tumour:
    """One tumour of a phantom: what a segmentation model or a nodule detector should find.

    Simple style: a sphere; the label map holds exactly the voxels whose centres lie within
    ``radius_mm`` of ``centre_mm``. Realistic style: any of :data:`TUMOUR_TYPES`;
    ``centre_mm`` is the centroid and ``diameter_mm`` the largest extent along x, y or z of its
    voxels on the fine (≤ 1 mm) grid, and ``radius_mm`` is half of it. Either way
    ``volume_mm3`` counts the label voxels (voxels × voxel volume), so it is the volume a
    perfect segmentation reports, not 4/3·π·r³.
    """

    label: int  # TUMOUR_LABEL_BASE + index
    centre_mm: tuple[float, float, float]  # patient LPS (x, y, z), mm
    radius_mm: float
    hu: float  # nominal HU before noise (a part-solid nodule's ground-glass halo)
    side: str  # patient side of the lung that holds it: "left" or "right"
    volume_mm3: float
    type: str = "solid"  # one of TUMOUR_TYPES
    density: str = "solid"  # solid | part_solid | ground_glass
    shape: str = "sphere"  # sphere | lobulated | irregular | spiculated
    location: str = "intraparenchymal"  # or juxta_pleural, juxta_vascular, hilar, ...
    diameter_mm: float = 0.0  # 0: 2 × radius_mm
    core_hu: float | None = None  # a part-solid nodule's solid core, a mass's necrotic centre
    core_diameter_mm: float | None = None

    def __post_init__(self) -> None:
        if not self.diameter_mm:
            object.__setattr__(self, "diameter_mm", round(2.0 * self.radius_mm, 2))


@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic CT volume and its label map, both indexed ``[k, r, c]`` (slice, row, column).

    ``hu`` is int16 HU; ``labels`` is uint8 with the values of :data:`LABELS` and tumour labels.
    Arrays made by :func:`make_phantom` are read-only, so the ground truth cannot drift from
    ``tumours``.

    Raises:
        ValueError: the arrays or the geometry are inconsistent (the message names the field).
    """

    hu: np.ndarray
    labels: np.ndarray
    pixel_spacing: tuple[float, float]  # (row spacing = along y, column spacing = along x), mm
    slice_thickness: float  # mm; also the spacing between slice centres unless slice_spacing
    origin: tuple[float, float, float]  # ImagePositionPatient of slice 0 (LPS mm)
    tumours: tuple[Tumour, ...]
    slice_spacing: float | None = None  # between slice centres when not slice_thickness
    style: str = "simple"
    kernel: str = "soft"  # reconstruction kernel class: soft | sharp
    noise_sigma_hu: float = NOISE_SIGMA_HU
    scan_diameter_mm: float | None = None  # pixels outside this circle are padding
    structures: np.ndarray | None = None  # uint8 [k, r, c] of STRUCTURES codes (realistic)
    anatomy: dict[str, object] = field(default_factory=dict)  # realistic: variants, sizes

    def __post_init__(self) -> None:
        if not isinstance(self.hu, np.ndarray) or self.hu.ndim != 3 or self.hu.dtype != np.int16:
            raise ValueError("hu: must be a 3-D int16 array indexed [k, r, c]")
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.uint8:
            raise ValueError("labels: must be a uint8 array")
        if self.labels.shape != self.hu.shape:
            raise ValueError(f"labels: shape {self.labels.shape} differs from hu {self.hu.shape}")
        if len(self.pixel_spacing) != 2 or not all(_positive(v) for v in self.pixel_spacing):
            raise ValueError("pixel_spacing: must be two positive finite numbers")
        if not _positive(self.slice_thickness):
            raise ValueError("slice_thickness: must be a positive finite number")
        if self.slice_spacing is not None and not _positive(self.slice_spacing):
            raise ValueError("slice_spacing: must be a positive finite number or None")
        if self.structures is not None and (
            not isinstance(self.structures, np.ndarray) or self.structures.shape != self.hu.shape
        ):
            raise ValueError("structures: must be None or an array shaped like hu")
        if len(self.origin) != 3 or not all(math.isfinite(v) for v in self.origin):
            raise ValueError("origin: must be three finite numbers")

    @property
    def spacing_z(self) -> float:
        """Distance between slice centres, mm (the thickness unless ``slice_spacing``)."""
        return self.slice_spacing if self.slice_spacing is not None else self.slice_thickness

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel of the label map in mm³ (in-plane area × slice spacing)."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.spacing_z

    def affine(self) -> np.ndarray:
        """The 4×4 float64 matrix mapping a voxel index to patient LPS mm.

        The index vector is ``(c, r, k, 1)`` — column, row, slice, the *reverse* of the array
        order ``[k, r, c]`` — and the result is ``(x, y, z, 1)``. This is the matrix that
        ImagePositionPatient, ImageOrientationPatient, PixelSpacing and the slice spacing of the
        written files define.
        """
        a = np.eye(4)
        a[0, 0] = self.pixel_spacing[1]  # column index -> x uses the column spacing
        a[1, 1] = self.pixel_spacing[0]
        a[2, 2] = self.spacing_z
        a[:3, 3] = self.origin
        return a

    def moved(self, offset_mm: tuple[float, float, float]) -> Phantom:
        """The same phantom with the patient moved by ``offset_mm`` (LPS) in the scanner's
        frame: every position, the tumours' centres included, shifted."""
        dx, dy, dz = (float(v) for v in offset_mm)
        tumours = tuple(
            dataclasses.replace(
                t,
                centre_mm=(
                    round(t.centre_mm[0] + dx, 3),
                    round(t.centre_mm[1] + dy, 3),
                    round(t.centre_mm[2] + dz, 3),
                ),
            )
            for t in self.tumours
        )
        origin = (self.origin[0] + dx, self.origin[1] + dy, self.origin[2] + dz)
        return dataclasses.replace(self, origin=origin, tumours=tumours)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _int_arg(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: must be an int, not {type(value).__name__}")
    v = int(value)
    if v < minimum or (maximum is not None and v > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name}: must be {bound}, got {v}")
    return v


def _float_arg(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: must be a number, not {type(value).__name__}")
    v = float(value)
    if not _positive(v):
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}")
    return v


def _ds(value: float) -> str:
    """A Decimal String (≤ 16 chars) for a geometry value.

    Geometry is rounded to these 10 significant digits when a phantom is made, so what the
    headers say is exactly what the affine and truth say.
    """
    return f"{value:.10g}"


def _canon(value: float) -> float:
    return float(_ds(value))


# -- anatomy ----------------------------------------------------------------------------------


class _Blob:
    """An elliptical cross-section, evaluated once on its bounding box of the slice grid.

    ``e`` is the normalised squared radius; a slice draws the blob scaled by ``s`` where
    ``e <= s²``, which is how shapes taper along z at the cost of one comparison per slice.
    """

    def __init__(
        self, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, a: float, b: float
    ) -> None:
        c0 = int(np.searchsorted(xs, cx - a))
        c1 = int(np.searchsorted(xs, cx + a, side="right"))
        r0 = int(np.searchsorted(ys, cy - b))
        r1 = int(np.searchsorted(ys, cy + b, side="right"))
        self.window = (slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))
        x = xs[self.window[1]][None, :]
        y = ys[self.window[0]][:, None]
        self.e = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2

    def draw(self, image: np.ndarray, tissue: int, scale: float, onto: tuple[int, ...]) -> None:
        """Set ``tissue`` inside the blob scaled by ``scale`` where the image holds ``onto``."""
        if scale <= 0 or self.e.size == 0:
            return
        sub = image[self.window]
        mask = self.e <= scale * scale
        allowed = sub == onto[0]
        for t in onto[1:]:
            allowed |= sub == t
        mask &= allowed
        np.copyto(sub, np.uint8(tissue), where=mask)


def _dome(t: float, lo: float, hi: float, peak: float, base_power: float = 0.5) -> float:
    """Cross-section scale along z: 0 outside (lo, hi), 1 at ``peak``, ellipsoidal towards
    ``hi`` and blunter (``base_power``) towards ``lo``, like a lung on its diaphragm."""
    if not lo < t < hi:
        return 0.0
    u = (t - peak) / ((peak - lo) if t < peak else (hi - peak))
    return float(max(0.0, 1.0 - u * u) ** (base_power if t < peak else 0.5))


def _body_template(
    xs: np.ndarray, ys: np.ndarray, half_w: float, half_h: float, fat: float, power: float
) -> np.ndarray:
    """Slice of air, a fat rim and soft tissue; a superellipse reads more like a torso."""
    x = np.abs(xs)[None, :]
    y = np.abs(ys)[:, None]
    outer = (x / half_w) ** power + (y / half_h) ** power <= 1
    inner = (x / (half_w - fat)) ** power + (y / (half_h - fat)) ** power <= 1
    image = np.where(outer, np.uint8(_FAT), np.uint8(_AIR)).astype(np.uint8)
    image[inner] = _SOFT
    return image


def _spine(template: np.ndarray, xs: np.ndarray, ys: np.ndarray, scale: float, y: float) -> _Blob:
    """Draw the vertebral arch and canal into ``template``; return the vertebral body, which
    slices draw as bone or disc."""
    _Blob(xs, ys, 0.0, y + 0.068 * scale, 0.040 * scale, 0.022 * scale).draw(
        template, _BONE, 1.0, (_SOFT,)
    )
    _Blob(xs, ys, 0.0, y + 0.063 * scale, 0.016 * scale, 0.014 * scale).draw(
        template, _SOFT, 1.0, (_BONE,)
    )
    return _Blob(xs, ys, 0.0, y, 0.045 * scale, 0.040 * scale)


def _chest_slices(
    rng: np.random.Generator,
    tissue: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    zs: np.ndarray,
    scale: float,
) -> dict[str, tuple[float, float, float, float, float, float]]:
    """Fill ``tissue`` with a chest; returns per side the lung (cx, cy, a, b, t_lo, t_hi)."""

    def jitter() -> float:  # a few per cent per seed, so phantoms are not all alike
        return float(rng.uniform(0.97, 1.03))

    body_w, body_h = 0.43 * scale * jitter(), 0.29 * scale * jitter()
    template = _body_template(xs, ys, body_w, body_h, 0.025 * scale, 2.4)
    vbody = _spine(template, xs, ys, scale, 0.165 * scale)
    sternum = _Blob(xs, ys, 0.0, -body_h + 0.05 * scale, 0.035 * scale, 0.011 * scale)
    trachea = _Blob(xs, ys, 0.0, -0.01 * scale, 0.022 * scale, 0.020 * scale)
    bronchi = [
        _Blob(xs, ys, sx * 0.045 * scale, 0.0, 0.014 * scale, 0.013 * scale) for sx in (-1.0, 1.0)
    ]
    lung_a, lung_b = 0.135 * scale * jitter(), 0.20 * scale * jitter()
    lung_cx, lung_cy = 0.205 * scale * jitter(), 0.025 * scale
    lungs = {
        side: (_Blob(xs, ys, sign * lung_cx, lung_cy, lung_a, lung_b), _LUNG_TISSUE[side])
        for side, sign in (("right", -1.0), ("left", 1.0))
    }
    heart = _Blob(xs, ys, 0.05 * scale, -0.06 * scale, 0.12 * scale, 0.09 * scale)
    # Vertebrae repeat every ~28 mm with a ~6 mm disc; the phase is per seed.
    period, disc, phase = 28.0, 6.0, float(rng.uniform(0.0, 28.0))

    slices = tissue.shape[0]
    lung_span = {side: (_LUNG_BASE_T[side], _LUNG_APEX_T) for side in lungs}
    lo, hi = _LUNG_BASE_T["left"], _LUNG_APEX_T
    for k in range(slices):
        image = tissue[k]
        np.copyto(image, template)
        t = (k + 0.5) / slices
        vbody.draw(image, _DISC if (zs[k] + phase) % period < disc else _BONE, 1.0, (_SOFT,))
        u = (t - lo) / (hi - lo)  # 0 at the left lung base, 1 at the apex
        if 0.12 < u < 1.05:
            sternum.draw(image, _BONE, 1.0, (_SOFT,))
        if u >= 0.62:
            trachea.draw(image, _AIRWAY, 1.0, (_SOFT,))
        elif u >= 0.48:
            for bronchus in bronchi:
                bronchus.draw(image, _AIRWAY, 1.0, (_SOFT,))
        for side, (blob, lung_tissue) in lungs.items():
            s_lo, s_hi = lung_span[side]
            blob.draw(
                image, lung_tissue, _dome(t, s_lo, s_hi, s_lo + 0.3 * (s_hi - s_lo), 0.3), (_SOFT,)
            )
        heart.draw(image, _BLOOD, _dome(u, 0.0, 0.6, 0.3), (_SOFT, _LUNG_R, _LUNG_L))
    return {
        side: (sign * lung_cx, lung_cy, lung_a, lung_b, *lung_span[side])
        for side, sign in (("right", -1.0), ("left", 1.0))
    }


def _abdomen_slices(
    rng: np.random.Generator,
    tissue: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    zs: np.ndarray,
    scale: float,
) -> None:
    """Fill ``tissue`` with an abdomen and pelvis: no lungs, so out of a chest model's scope."""
    body_w = 0.42 * scale * float(rng.uniform(0.97, 1.03))
    body_h = 0.32 * scale * float(rng.uniform(0.97, 1.03))
    template = _body_template(xs, ys, body_w, body_h, 0.05 * scale, 2.1)
    vbody = _spine(template, xs, ys, scale, 0.17 * scale)
    liver = _Blob(xs, ys, -0.16 * scale, -0.01 * scale, 0.17 * scale, 0.15 * scale)
    kidneys = [
        _Blob(xs, ys, sx * 0.13 * scale, 0.12 * scale, 0.045 * scale, 0.06 * scale)
        for sx in (-1.0, 1.0)
    ]
    iliac = [
        _Blob(xs, ys, sx * 0.22 * scale, 0.10 * scale, 0.10 * scale, 0.03 * scale)
        for sx in (-1.0, 1.0)
    ]
    gas = []
    for _ in range(6):
        cx, cy = rng.uniform(-0.22, 0.22) * scale, rng.uniform(-0.2, -0.02) * scale
        r = rng.uniform(0.015, 0.04) * scale
        t0 = rng.uniform(0.1, 0.5)
        gas.append((_Blob(xs, ys, float(cx), float(cy), float(r), float(r)), t0, t0 + 0.12))
    period, disc, phase = 30.0, 7.0, float(rng.uniform(0.0, 30.0))

    slices = tissue.shape[0]
    for k in range(slices):
        image = tissue[k]
        np.copyto(image, template)
        t = (k + 0.5) / slices
        vbody.draw(image, _DISC if (zs[k] + phase) % period < disc else _BONE, 1.0, (_SOFT,))
        liver.draw(image, _LIVER, _dome(t, 0.5, 1.1, 0.85), (_SOFT,))
        for kidney in kidneys:
            kidney.draw(image, _KIDNEY, _dome(t, 0.35, 0.72, 0.55), (_SOFT,))
        for blob, g0, g1 in gas:
            blob.draw(image, _GAS, _dome(t, g0, g1, (g0 + g1) / 2), (_SOFT,))
        for bone in iliac:
            bone.draw(image, _BONE, _dome(t, -0.05, 0.32, 0.18), (_SOFT,))


def _place_tumours(
    rng: np.random.Generator,
    tissue: np.ndarray,
    count: int,
    lungs: dict[str, tuple[float, float, float, float, float, float]],
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    spacing: tuple[float, float, float],
    voxel_mm3: float,
    scale: float = 1.0,
) -> list[tuple[Tumour, int]]:
    """Draw ``count`` spheres wholly inside a lung; returns each with its tissue class.

    A candidate is accepted only if every voxel within ``radius + largest spacing`` of its centre
    is lung of that side, so each tumour voxel's 6-neighbours are tumour or lung, and tumours
    never touch each other (an earlier tumour is no longer lung). The sphere drawn has the
    drawn radius times ``scale`` (at most 1): the same seed places the same tumours, smaller.
    """
    xs, ys, zs = axes
    ps_row, ps_col, st = spacing
    margin = max(spacing)
    n_k, n_r, n_c = tissue.shape
    placed: list[tuple[Tumour, int]] = []
    for index in range(count):
        for _ in range(_ATTEMPTS_PER_TUMOUR):
            side = "right" if rng.random() < 0.5 else "left"
            cx, cy, a, b, t_lo, t_hi = lungs[side]
            radius = round(float(rng.uniform(*_TUMOUR_RADIUS_MM)), 2)
            centre = (
                round(float(rng.uniform(cx - a, cx + a)), 2),
                round(float(rng.uniform(cy - b, cy + b)), 2),
                round(float(zs[0] + (rng.uniform(t_lo, t_hi) * n_k - 0.5) * st), 2),
            )
            hu = round(float(rng.uniform(*_TUMOUR_HU)), 1)
            lung = _LUNG_TISSUE[side]
            kc = round((centre[2] - zs[0]) / st)
            rc = round((centre[1] - ys[0]) / ps_row)
            cc = round((centre[0] - xs[0]) / ps_col)
            if not (0 <= kc < n_k and 0 <= rc < n_r and 0 <= cc < n_c):
                continue
            if tissue[kc, rc, cc] != lung:  # cheap rejection before the full check
                continue
            reach = radius + margin
            k0, k1 = _index_range(zs, centre[2] - reach, centre[2] + reach)
            r0, r1 = _index_range(ys, centre[1] - reach, centre[1] + reach)
            c0, c1 = _index_range(xs, centre[0] - reach, centre[0] + reach)
            if k0 is None or r0 is None or c0 is None:
                continue  # the margin would leave the volume
            box = tissue[k0:k1, r0:r1, c0:c1]
            d2 = (
                (zs[k0:k1, None, None] - centre[2]) ** 2
                + (ys[None, r0:r1, None] - centre[1]) ** 2
                + (xs[None, None, c0:c1] - centre[0]) ** 2
            )
            if not np.all(box[d2 <= reach * reach] == lung):
                continue
            radius = round(radius * scale, 2)
            sphere = d2 <= radius * radius
            voxels = int(np.count_nonzero(sphere))
            if voxels == 0:
                continue
            tissue_class = _TUMOUR_TISSUE_BASE + index
            box[sphere] = tissue_class
            tumour = Tumour(
                label=TUMOUR_LABEL_BASE + index,
                centre_mm=centre,
                radius_mm=radius,
                hu=hu,
                side=side,
                volume_mm3=voxels * voxel_mm3,
            )
            placed.append((tumour, tissue_class))
            break
        else:
            raise ValueError(
                f"tumours: could not fit tumour {index + 1} of {count} inside a lung; "
                "use fewer tumours or more slices"
            )
    return placed


def _index_range(axis: np.ndarray, lo: float, hi: float) -> tuple[int | None, int]:
    """Indices [i0, i1) of the ascending ``axis`` within [lo, hi]; None if it leaves the axis."""
    if lo < axis[0] or hi > axis[-1]:
        return None, 0
    return int(np.searchsorted(axis, lo)), int(np.searchsorted(axis, hi, side="right"))


def make_phantom(
    *,
    slices: int = 120,
    rows: int = 512,
    columns: int = 512,
    seed: int = 0,
    tumours: int = 2,
    pixel_spacing: float = 0.7,
    slice_thickness: float = 2.5,
    chest: bool = True,
    style: str = "simple",
    kernel: str | None = None,
    slice_spacing: float | None = None,
    emphysema: bool = False,
    effusion: bool = False,
    tumour_types: tuple[str, ...] | list[str] | None = None,
    tumour_scale: float = 1.0,
) -> Phantom:
    """Build a phantom in memory: HU volume, label map, geometry and tumour truth.

    ``tumour_scale`` (simple style, 0 < scale <= 1) shrinks every tumour's radius and leaves
    everything else as the seed draws it: the same patient with smaller tumours, e.g. the
    prior of a follow-up scan with known growth.

    ``style="realistic"`` (chest only) draws clinical-looking anatomy and tumours of
    :data:`TUMOUR_TYPES` (``tumour_types[i % len]`` for tumour ``i``, else drawn at random),
    renders slices of ``slice_thickness`` every ``slice_spacing`` mm (default: the thickness)
    from ≤ 1 mm planes with partial volume, with the noise texture of ``kernel`` ("soft" σ
    10-20 HU, "sharp" σ 40-90 HU with edge enhancement; default drawn by seed), a scan circle,
    and optional ``emphysema`` and pleural ``effusion``; body size varies by seed. Its
    ``structures`` map says which voxels are vessels, airways, fissures, ... Tumours there may
    touch the pleura, a vessel or the mediastinum (by type), never each other.

    Anatomy scales with the field of view (the smaller of ``rows`` and ``columns`` times
    ``pixel_spacing``), so a 128×128 phantom at 2.8 mm still looks like a chest. Lungs span the
    middle ~85 % of the stack and leave lung-free slices at both ends. Tumours have radius 4–15
    mm, nominal HU 0–60, and sit wholly inside one lung without touching each other; with
    ``chest=False`` there are no lungs and ``tumours`` is ignored. All randomness comes from
    ``numpy.random.default_rng(seed)``: the same arguments give byte-identical arrays.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range (the message names it: ``slices`` >= 1,
            ``rows``/``columns`` 32..4096, ``seed`` >= 0, ``tumours`` 0..MAX_TUMOURS, positive
            spacings, ``style``, ``kernel``, ``tumour_types``; the realistic-only arguments
            with ``style="simple"`` or ``chest=False``), or the tumours do not fit in the
            lungs (names ``tumours``).
    """
    slices = _int_arg("slices", slices, 1, 9999)  # 9999: file names are CT%04d.dcm
    rows = _int_arg("rows", rows, 32, 4096)
    columns = _int_arg("columns", columns, 32, 4096)
    seed = _int_arg("seed", seed, 0)
    tumours = _int_arg("tumours", tumours, 0, MAX_TUMOURS)
    ps = _canon(_float_arg("pixel_spacing", pixel_spacing))
    st = _canon(_float_arg("slice_thickness", slice_thickness))
    if not isinstance(chest, bool):
        raise TypeError(f"chest: must be a bool, not {type(chest).__name__}")
    if style not in STYLES:
        raise ValueError(f"style: must be one of {', '.join(STYLES)}, got {style!r}")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel: must be one of {', '.join(KERNELS)}, got {kernel!r}")
    realistic_only = {
        "kernel": kernel is not None,
        "slice_spacing": slice_spacing is not None,
        "emphysema": bool(emphysema),
        "effusion": bool(effusion),
        "tumour_types": tumour_types is not None,
    }
    if not isinstance(tumour_scale, (int, float)) or not 0.0 < tumour_scale <= 1.0:
        raise ValueError(f"tumour_scale: must be in (0, 1], got {tumour_scale!r}")
    if tumour_scale != 1.0 and (style != "simple" or not chest):
        raise ValueError("tumour_scale: only for style='simple' chest phantoms")
    if style == "simple" or not chest:
        given = [name for name, used in realistic_only.items() if used]
        if given:
            raise ValueError(f"{given[0]}: only for style='realistic' chest phantoms")
    else:
        spacing = (
            st if slice_spacing is None else _canon(_float_arg("slice_spacing", slice_spacing))
        )
        types = None
        if tumour_types is not None:
            types = tuple(tumour_types)
            if not types or any(t not in TUMOUR_TYPES for t in types):
                raise ValueError(
                    f"tumour_types: must be a non-empty sequence of {TUMOUR_TYPES}, got {types!r}"
                )
        return _realistic_phantom(
            slices=slices,
            rows=rows,
            columns=columns,
            seed=seed,
            tumours=tumours,
            ps=ps,
            thickness=st,
            spacing=spacing,
            kernel=kernel,
            emphysema=bool(emphysema),
            effusion=bool(effusion),
            types=types,
        )

    rng = np.random.default_rng(seed)
    # The image centre is at x = y = 0; the top slice at z = -50 mm, so every z is negative.
    origin = (
        _canon(-(columns - 1) / 2 * ps),
        _canon(-(rows - 1) / 2 * ps),
        _canon(-50.0 - (slices - 1) * st),
    )
    xs = origin[0] + np.arange(columns) * ps
    ys = origin[1] + np.arange(rows) * ps
    zs = origin[2] + np.arange(slices) * st
    scale = min(rows, columns) * ps
    # float32 grids halve the cost of the per-slice shape tests; geometry stays float64.
    xs32, ys32 = xs.astype(np.float32), ys.astype(np.float32)

    tissue = np.empty((slices, rows, columns), dtype=np.uint8)
    placed: list[tuple[Tumour, int]] = []
    if chest:
        lungs = _chest_slices(rng, tissue, xs32, ys32, zs, scale)
        placed = _place_tumours(
            rng, tissue, tumours, lungs, (xs, ys, zs), (ps, ps, st), ps * ps * st, tumour_scale
        )
    else:
        _abdomen_slices(rng, tissue, xs32, ys32, zs, scale)

    label_lut = np.zeros(256, dtype=np.uint8)
    hu_lut = np.zeros(256, dtype=np.float32)
    for t, (label, value) in _TISSUE.items():
        label_lut[t], hu_lut[t] = label, value
    for tumour, t in placed:
        label_lut[t], hu_lut[t] = tumour.label, tumour.hu

    labels = label_lut[tissue]
    hu = np.empty(tissue.shape, dtype=np.int16)
    # Slice by slice keeps the float temporaries to one slice (a 300×512×512 float32 volume
    # would be 300 MB); the draw order is fixed, so the noise is too.
    noise = np.empty((rows, columns), dtype=np.float32)
    for k in range(slices):
        rng.standard_normal(dtype=np.float32, out=noise)
        noise *= NOISE_SIGMA_HU
        noise += hu_lut[tissue[k]]
        np.rint(noise, out=noise)
        np.clip(noise, _HU_MIN, _HU_MAX, out=noise)
        hu[k] = noise
    hu.setflags(write=False)
    labels.setflags(write=False)
    return Phantom(
        hu=hu,
        labels=labels,
        pixel_spacing=(ps, ps),
        slice_thickness=st,
        origin=origin,
        tumours=tuple(t for t, _ in placed),
    )


def _realistic_phantom(
    *,
    slices: int,
    rows: int,
    columns: int,
    seed: int,
    tumours: int,
    ps: float,
    thickness: float,
    spacing: float,
    kernel: str | None,
    emphysema: bool,
    effusion: bool,
    types: tuple[str, ...] | None,
) -> Phantom:
    """The realistic style of :func:`make_phantom` (arguments already checked).

    Raises:
        ValueError: the tumours do not fit (names ``tumours``).
    """
    rng = np.random.default_rng([seed, 2])  # its own stream: the simple style's stays as it was
    origin = (
        _canon(-(columns - 1) / 2 * ps),
        _canon(-(rows - 1) / 2 * ps),
        _canon(-50.0 - (slices - 1) * spacing),
    )
    xs = origin[0] + np.arange(columns) * ps
    ys = origin[1] + np.arange(rows) * ps
    sampling = acquisition.plan_sampling(origin[2], slices, spacing, thickness)
    grid = Grid(xs, ys, sampling.zs, np.empty((len(sampling.zs), rows, columns), np.uint8))
    chest = anatomy.build_chest(rng, grid, emphysema=emphysema, effusion=effusion)
    centre_planes = sampling.first + np.arange(slices) * sampling.step
    label_planes = np.zeros(len(sampling.zs), dtype=bool)
    label_planes[centre_planes] = True
    placed = nodules.place_tumours(rng, grid, chest, tumours, types, label_planes)

    label_lut = np.zeros(256, dtype=np.uint8)
    hu_lut = np.zeros(256, dtype=np.float32)
    structure_lut = np.zeros(256, dtype=np.uint8)
    for t, (label_name, value, structure) in anatomy.TISSUES.items():
        label_lut[t], hu_lut[t] = LABELS[label_name], value
        structure_lut[t] = STRUCTURES[structure]
    for side in anatomy.SIDES:
        hu_lut[anatomy.VESSEL[side]] = chest.vessel_hu
    for p in placed:
        for t, value in (
            (anatomy.TUMOUR_CLASS_BASE + 2 * p.index, p.hu),
            (
                anatomy.TUMOUR_CLASS_BASE + 2 * p.index + 1,
                p.core_hu if p.core_hu is not None else p.hu,
            ),
        ):
            label_lut[t], hu_lut[t] = TUMOUR_LABEL_BASE + p.index, value
            structure_lut[t] = STRUCTURES["tumour"]
    labels = label_lut[grid.tissue[centre_planes]]
    structures = structure_lut[grid.tissue[centre_planes]]

    kernel = kernel or ("sharp" if rng.random() < 0.4 else "soft")
    sigma = round(float(rng.uniform(*acquisition.NOISE_RANGE_HU[kernel])), 1)
    lung_classes = np.zeros(256, dtype=np.float32)
    for side in anatomy.SIDES:
        lung_classes[[anatomy.LUNG[side], anatomy.FISSURE[side], anatomy.EMPHYSEMA[side]]] = 1
    # Dependent lung is denser: about -890 HU anteriorly to -830 HU posteriorly (supine).
    w, d = chest.body_semi
    lung_offset = np.broadcast_to(
        np.clip(30.0 * ys / d, -30.0, 30.0).astype(np.float32)[:, None], (rows, columns)
    ).copy()
    scan_diameter = _canon(min(rows, columns) * ps)
    outside = acquisition.outside_scan_circle(rows, columns, (ps, ps), scan_diameter)
    hu = acquisition.render_slices(
        rng,
        grid.tissue,
        sampling,
        slices,
        hu_lut,
        lung_classes,
        lung_offset,
        kernel,
        sigma,
        ps,
        outside,
    )
    del grid
    voxel = ps * ps * spacing
    counts = np.zeros(256, dtype=np.int64)
    for label_slice in labels:
        counts += np.bincount(label_slice.ravel(), minlength=256)
    found = tuple(
        Tumour(
            label=TUMOUR_LABEL_BASE + p.index,
            centre_mm=p.centre_mm,
            radius_mm=round(p.diameter_mm / 2.0, 3),
            hu=p.hu,
            side=p.side,
            volume_mm3=int(counts[TUMOUR_LABEL_BASE + p.index]) * voxel,
            type=p.type,
            density=p.density,
            shape=p.shape,
            location=p.location,
            diameter_mm=p.diameter_mm,
            core_hu=p.core_hu,
            core_diameter_mm=p.core_diameter_mm,
        )
        for p in placed
    )
    for a in (hu, labels, structures):
        a.setflags(write=False)
    return Phantom(
        hu=hu,
        labels=labels,
        pixel_spacing=(ps, ps),
        slice_thickness=thickness,
        origin=origin,
        tumours=found,
        slice_spacing=None if spacing == thickness else spacing,
        style="realistic",
        kernel=kernel,
        noise_sigma_hu=sigma,
        scan_diameter_mm=scan_diameter,
        structures=structures,
        anatomy={
            "body_width_mm": round(2 * w, 1),
            "body_depth_mm": round(2 * d, 1),
            "vessel_hu": round(chest.vessel_hu, 1),
            "vessel_segments": len(chest.vessels),
            "emphysema": emphysema,
            "effusion": effusion,
            "fine_plane_spacing_mm": round(float(sampling.zs[1] - sampling.zs[0]), 4)
            if len(sampling.zs) > 1
            else thickness,
        },
    )
