"""Nodule and mass candidates in the lung fields: blobs, not vessels, airways or chest wall.

A lung nodule is a compact, roughly round opacity; the things a naive threshold confuses it
with are tubes (vessels, airway walls seen along their length), sheets (fissures, pleura) and
structures outside the lung (heart, chest wall, mediastinum). The detector says so in numbers:

1. **Where**: nodules only inside :attr:`LungFields.search` (the lungs closed towards the
   pleura, so nodules on the pleura are in it, chest wall and mediastinum are not); masses of
   3-10 cm inside :attr:`LungFields.envelope` (closed further, so a mass that abuts the
   mediastinum, hilum or chest wall is inside while the lung wraps around it).
2. **Shape at several scales**: the Hessian of the Gaussian-smoothed CT at scales
   σ = 1.5 … 8 mm (nodules) and 10 … 20 mm on a coarser grid (masses) gives, per voxel, three
   curvatures. A bright blob curves down along all three axes alike; a vessel along two (its
   length is flat); a sheet along one. The blobness ``|λ3|² / |λ1|`` (Li et al., Med Phys
   2003; eigenvalues by decreasing magnitude, all negative, scale-normalised by σ²) is high
   for blobs only, and its roundness ``|λ3| / |λ1|`` does not depend on density: a
   ground-glass nodule is a blob at its own contrast. Each search works on a grid of about
   1.4 mm (nodules) or 3 mm (masses) in-plane; slices of half that spacing or less are
   averaged in twos or more (the mass search on 1 mm slices: in threes), which the scales
   do not resolve anyway.
3. **Candidates**: round local maxima of blobness in dense-enough tissue (ground glass
   included), examined in order of blobness per HU of contrast.
4. **Extent**: each candidate is the opacity grown from its centre above a threshold halfway
   between its core and the surrounding lung (again halfway to a ground-glass halo when there
   is one), inside a sphere a little larger than its scale, and opened so that a vessel it
   touches is cut off.
5. **Score**: a false-positive stage (:class:`NoduleScorer`, a small network) over the
   candidate's features: blobness and its roundness, elongation of the grown region, how much
   of its surroundings is lung, whether the analysis sphere cut it off, size, density and
   contrast, a ground-glass halo, and the learned segmentation model's tumour class when that
   model ran. Its weights were fitted on
   realistic synthetic phantoms (``packaging/models/lung_nodule_fp/train.py``), never on
   real cases.

Candidates are returned with their score; the caller applies the operating point.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from radfusion.errors import RadfusionError
from radfusion.operators.lungs import (
    LungFields,
    grow_in_plane,
    shrink_in_plane,
    shrink_slices,
    slice_factor,
)

__all__ = [
    "FEATURES",
    "NoduleCandidate",
    "NoduleScorer",
    "ScorerError",
    "TumourLookup",
    "box_of",
    "default_scorer_path",
    "find_nodules",
]

log = logging.getLogger("radfusion.operators.nodules")

FEATURES = (
    "log_blobness",  # ln σ²|λ3|²/|λ1| at the peak (HU)
    "shape",  # blobness per HU of contrast with the lung
    "roundness",  # |λ3|/|λ1| at the peak
    "elongation_excess",  # largest / smallest principal axis beyond 1.6 (a round nodule: 0)
    "lung_fraction",  # share of the region's surroundings that is lung
    "truncated",  # share of the region on the analysis sphere's edge
    "log_diameter",  # ln equivalent-sphere diameter, mm
    "core_hu",  # core density / 100
    "calcified",  # density above 200 HU / 100 (calcified or contrast-filled)
    "solid_fraction",  # share of the region above -300 HU
    "mass_pass",  # 1 when found by the mass pass
    "model_tumour",  # share of the region the learned model calls tumour (0.5: no model)
    "contrast",  # core density above the surrounding lung / 100
    "halo",  # 1 when grown to a ground-glass halo around a denser core
)
"""The features the false-positive stage scores, in the order of its weights."""


# The share of a candidate's voxels (a mask of the box) that the learned model calls tumour.
TumourLookup = Callable[[tuple[slice, slice, slice], np.ndarray], float]
"""A box of the source grid → where (bool, the box's shape) the learned segmentation model
sees tumour there."""


@dataclass(frozen=True)
class _Pass:
    """One search: its region of the lung fields, scales and working grid."""

    name: str
    scales_mm: tuple[float, ...]
    spacing_mm: float  # spacing of the working grid: in-plane about, slices at most
    radius_floor_mm: float  # analysis sphere at least this large
    max_candidates: int


NODULE_PASS = _Pass("nodule", (1.5, 2.5, 4.0, 6.0, 8.0), 1.4, 10.0, 600)
MASS_PASS = _Pass("mass", (10.0, 14.0, 20.0), 3.0, 25.0, 80)
_DENSE_HU = -750.0  # ground glass is denser than this; aerated lung (-850 ±) is not
_MIN_CONTRAST_HU = 100.0  # a candidate's core must stand this far above its surroundings
_MIN_DIAMETER_MM = 3.0
_MIN_ROUNDNESS = 0.5  # |λ3|/|λ1| at the best scale: a sphere 1, a vessel ~0
_MIN_BLOBNESS = 10.0  # HU: a ground-glass nodule (contrast ~150 HU) gives ~30, solid ~200
_DUPLICATE_OVERLAP = 0.3  # a candidate sharing this much with a better one is the same


class ScorerError(RadfusionError, ValueError):
    """A scorer file is missing, unreadable or does not match :data:`FEATURES`."""


@dataclass(frozen=True)
class NoduleScorer:
    """The false-positive stage: a small network over standardised :data:`FEATURES`.

    ``hidden`` holds the hidden layers, each ``(weights, biases)`` with one row of weights per
    unit, tanh between layers; ``weights`` and ``bias`` make the output logit from the last
    hidden layer (from the standardised features when there is none: a logistic regression).
    The score is the logit's sigmoid, shifted by the training script so that 0.5 is its stated
    operating point.

    Raises:
        ScorerError: the arrays' sizes do not chain up, or a value is not finite.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    hidden: tuple[tuple[tuple[tuple[float, ...], ...], tuple[float, ...]], ...] = ()
    _layers: list[tuple[np.ndarray, np.ndarray]] = field(
        init=False, repr=False, compare=False, default_factory=list
    )

    def __post_init__(self) -> None:
        if self.features != FEATURES:
            raise ScorerError(f"scorer features {self.features} != {FEATURES}")
        n = len(FEATURES)
        if not len(self.mean) == len(self.scale) == n:
            raise ScorerError(f"scorer: mean and scale need {n} values each")
        width = n
        values = [*self.mean, *self.weights, self.bias]
        for index, (rows, biases) in enumerate(self.hidden):
            if not rows or len(rows) != len(biases) or any(len(r) != width for r in rows):
                raise ScorerError(f"scorer: hidden layer {index + 1} does not take {width} inputs")
            width = len(rows)
            values += [v for row in rows for v in row] + list(biases)
        if len(self.weights) != width:
            raise ScorerError(f"scorer: the output needs {width} weights")
        if any(not math.isfinite(v) for v in values) or any(
            not (math.isfinite(v) and v > 0) for v in self.scale
        ):
            raise ScorerError("scorer: values must be finite and scales positive")
        layers = [
            (np.asarray(rows, dtype=np.float64), np.asarray(b, dtype=np.float64))
            for rows, b in self.hidden
        ]
        object.__setattr__(self, "_layers", layers)

    @classmethod
    def from_json(cls, path: Path) -> NoduleScorer:
        """Read a scorer written by the training script.

        Raises:
            ScorerError: the file is missing, not JSON or not a scorer.
        """
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                features=tuple(data["features"]),
                mean=tuple(float(v) for v in data["mean"]),
                scale=tuple(float(v) for v in data["scale"]),
                weights=tuple(float(v) for v in data["weights"]),
                bias=float(data["bias"]),
                hidden=tuple(
                    (
                        tuple(tuple(float(v) for v in row) for row in layer["weights"]),
                        tuple(float(v) for v in layer["biases"]),
                    )
                    for layer in data.get("hidden", ())
                ),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            if isinstance(err, ScorerError):
                raise
            raise ScorerError(f"{path}: not a nodule scorer ({err})") from None

    def to_json(self) -> dict[str, object]:
        """The scorer as :meth:`from_json` reads it."""
        return {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "hidden": [
                {"weights": [list(r) for r in rows], "biases": list(b)} for rows, b in self.hidden
            ],
            "weights": list(self.weights),
            "bias": self.bias,
        }

    def logit(self, values: Sequence[float]) -> float:
        """The output before the sigmoid."""
        x = (np.asarray(values, dtype=np.float64) - self.mean) / np.asarray(self.scale)
        for rows, biases in self._layers:
            x = np.tanh(rows @ x + biases)
        return float(np.dot(self.weights, x) + self.bias)

    def __call__(self, values: Sequence[float]) -> float:
        z = self.logit(values)
        return float(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z)))))


def default_scorer_path() -> Path:
    """The false-positive stage shipped with radfusion (fitted on synthetic phantoms only):
    ``packaging/models/lung_nodule_fp/scorer.json`` in the source tree,
    ``radfusion/models/...`` when installed."""
    root = Path(__file__).resolve().parent.parent
    installed = root / "models" / "lung_nodule_fp" / "scorer.json"
    return installed if installed.is_file() else root / "packaging" / installed.relative_to(root)


@dataclass(frozen=True, eq=False)
class NoduleCandidate:
    """A nodule candidate: its voxels on the source grid (a mask inside ``box``), its
    detection score in [0, 1] and the features the score was made of (:data:`FEATURES`)."""

    box: tuple[slice, slice, slice]
    mask: np.ndarray
    score: float
    diameter_mm: float  # equivalent-sphere diameter of the grown region
    core_hu: float
    texture: str  # "solid" | "part-solid" | "ground-glass"
    features: tuple[float, ...]

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.mask))


def _blobness(
    image: np.ndarray, sigma_mm: float, spacing: np.ndarray, where: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Scale-normalised bright-blob measure σ²·|λ3|²/|λ1| at the voxels ``where`` (0 where
    not all curvatures are negative) and the roundness |λ3|/|λ1| (1 for a sphere, near 0 for
    a tube or sheet), the Hessian in HU/mm² of the image smoothed by a
    Gaussian of ``sigma_mm``. Second differences and eigenvalues only where asked: those
    are the expensive part. ``where`` must not touch the array's faces."""
    sigma_vox = [float(sigma_mm / s) for s in spacing]
    smooth = ndimage.gaussian_filter(image, sigma_vox, mode="nearest", truncate=3.0).ravel()
    at = np.flatnonzero(where.ravel())
    strides = [int(np.prod(image.shape[i + 1 :])) for i in range(3)]
    h: dict[tuple[int, int], np.ndarray] = {}
    centre = smooth[at].astype(np.float64)
    for i in range(3):
        si = strides[i]
        h[i, i] = (smooth[at + si] - 2.0 * centre + smooth[at - si]) / spacing[i] ** 2
        for j in range(i + 1, 3):
            sj = strides[j]
            h[i, j] = (
                smooth[at + si + sj]
                - smooth[at + si - sj]
                - smooth[at - si + sj]
                + smooth[at - si - sj]
            ) / (4.0 * spacing[i] * spacing[j])
    l1, l3 = _extreme_eigenvalues_of(h)  # the most negative, the least negative
    roundness = np.where(l3 < 0, l3 / np.minimum(l1, -1e-6), 0.0)  # 1 sphere, ~0 tube
    blob = -l3 * roundness * (sigma_mm * sigma_mm)
    return blob.astype(np.float32), roundness.astype(np.float32)


def find_nodules(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    fields: LungFields,
    *,
    scorer: NoduleScorer | None,
    model_tumour: TumourLookup | None = None,
) -> list[NoduleCandidate]:
    """Nodule and mass candidates inside the lung fields, best score first, none sharing
    much of its voxels with a better one.

    ``scorer`` is the false-positive stage (None: every candidate, duplicates included, with
    score 0 and in no particular order, for collecting training features).
    ``model_tumour`` says where the learned segmentation model sees tumour, when a model ran.

    Raises:
        ValueError: the masks do not have the volume's shape.
    """
    if fields.right.shape != hu.shape:
        raise ValueError(f"lung fields shape {fields.right.shape} != volume shape {hu.shape}")
    lungs = fields.right | fields.left
    found: list[NoduleCandidate] = []
    for search_pass, name in ((NODULE_PASS, "search"), (MASS_PASS, "envelope")):
        region = fields.working(name)
        if region.any():
            found.extend(
                _run_pass(
                    search_pass,
                    hu,
                    spacing_mm,
                    (region, fields.factor),
                    lungs,
                    scorer,
                    model_tumour,
                )
            )
    if scorer is None:  # unscored: every candidate, for collecting training features
        return found
    found.sort(key=lambda c: -c.score)
    kept: list[NoduleCandidate] = []
    # Boxes of the kept candidates, (start, stop) per axis: only those whose box meets a
    # candidate's can share voxels with it (hundreds of candidates; pairs must stay cheap).
    starts = np.zeros((len(found), 3), dtype=np.int64)
    stops = np.zeros((len(found), 3), dtype=np.int64)
    for candidate in found:
        lo = np.array([s.start for s in candidate.box])
        hi = np.array([s.stop for s in candidate.box])
        n = len(kept)
        meets = np.flatnonzero(((starts[:n] < hi) & (stops[:n] > lo)).all(axis=1))
        if not any(_overlap(candidate, kept[i]) > _DUPLICATE_OVERLAP for i in meets):
            starts[n], stops[n] = lo, hi
            kept.append(candidate)
    return kept


def _overlap(a: NoduleCandidate, b: NoduleCandidate) -> float:
    """Share of ``a``'s voxels that are also ``b``'s."""
    inter = tuple(
        slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a.box, b.box, strict=True)
    )
    if any(s.start >= s.stop for s in inter):
        return 0.0
    in_a = tuple(
        slice(s.start - o.start, s.stop - o.start) for s, o in zip(inter, a.box, strict=True)
    )
    in_b = tuple(
        slice(s.start - o.start, s.stop - o.start) for s, o in zip(inter, b.box, strict=True)
    )
    shared = np.count_nonzero(a.mask[in_a] & b.mask[in_b])
    return float(shared) / max(1, a.voxels)


def box_of(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of a 3-D ``mask`` (not empty), one slice per axis."""
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    plane = np.asarray(mask.any(axis=0))
    rs, cs = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return (
        slice(int(ks[0]), int(ks[-1]) + 1),
        slice(int(rs[0]), int(rs[-1]) + 1),
        slice(int(cs[0]), int(cs[-1]) + 1),
    )


def _run_pass(
    search_pass: _Pass,
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    region: tuple[np.ndarray, int],
    lung_mask: np.ndarray,
    scorer: NoduleScorer | None,
    model_tumour: TumourLookup | None,
) -> list[NoduleCandidate]:
    """One search over ``region``: a mask on a grid of blocks of ``n`` × ``n`` source pixels
    (:meth:`LungFields.working`), taken as it is when the search's own blocks are made of
    whole such blocks (the same shares as the source-grid mask's, without making it)."""
    mask, grid = region
    pixel = min(spacing_mm[1], spacing_mm[2])
    factor = min(8, max(1, round(search_pass.spacing_mm / pixel)))
    if factor % grid:
        mask, grid = grow_in_plane(mask, grid, hu.shape), 1
    grid_box = box_of(mask)
    rows, columns = (
        slice(b.start * grid, hu.shape[a] if b.stop == mask.shape[a] else b.stop * grid)
        for a, b in ((1, grid_box[1]), (2, grid_box[2]))
    )
    box = (grid_box[0], rows, columns)
    slices = slice_factor(spacing_mm[0], search_pass.spacing_mm, box[0].stop - box[0].start)

    def shrink(volume: np.ndarray, by: int = factor) -> np.ndarray:
        return shrink_slices(shrink_in_plane(volume, by), slices)

    small = shrink(hu[box])
    search = shrink(mask[grid_box], factor // grid) > 0.5
    lungs = shrink(lung_mask[box]) > 0.5
    spacing = np.array([spacing_mm[0] * slices, spacing_mm[1] * factor, spacing_mm[2] * factor])
    if min(small.shape) < 3:
        return []

    # Outside the region reads as air for the filter: the chest wall and mediastinum must
    # not make a pleural nodule look like a ridge.
    image = np.where(search, np.maximum(small, -1000.0), -1000.0).astype(np.float32)
    # Dense enough to be a nodule, judged on a lightly smoothed image: a sharp kernel's
    # noise (σ up to ~90 HU) would otherwise break ground glass into specks.
    smoothed = ndimage.gaussian_filter(
        small, [max(0.5, 0.8 / s) if i else 0.0 for i, s in enumerate(spacing)]
    )
    dense = search & (smoothed > _DENSE_HU)
    dense[[0, -1]] = False  # the filter's differences need a neighbour on every side
    dense[:, [0, -1]] = False
    dense[:, :, [0, -1]] = False
    if not dense.any():
        return []
    values = np.zeros(int(np.count_nonzero(dense)), dtype=np.float32)
    round_of = np.zeros(len(values), dtype=np.float32)
    scale_of = np.zeros(len(values), dtype=np.uint8)
    for i, sigma in enumerate(search_pass.scales_mm):
        b, roundness = _blobness(image, sigma, spacing, dense)
        better = b > values
        values[better] = b[better]
        round_of[better] = roundness[better]
        scale_of[better] = i
    # Tubes and sheets are not candidates, however strong: only round-ish maxima are.
    values[round_of < _MIN_ROUNDNESS] = 0.0
    best = np.zeros_like(small)
    best_scale = np.zeros(small.shape, dtype=np.uint8)
    best_round = np.zeros(small.shape, dtype=np.float32)
    best[dense] = values
    best_scale[dense] = scale_of
    best_round[dense] = round_of
    peaks = (best == ndimage.maximum_filter(best, size=(3, 5, 5))) & (best > _MIN_BLOBNESS)
    coords = np.argwhere(peaks)
    # Examined in order of blobness per HU of contrast with the lung: shape, not density,
    # so a faint ground-glass nodule is not ranked below hundreds of dense vessel crossings.
    aerated = lungs & ~dense
    lung_hu = float(np.median(smoothed[aerated])) if aerated.any() else -850.0
    shape = best[peaks] / np.maximum(smoothed[peaks] - lung_hu, 50.0)
    order = np.argsort(-shape)[: search_pass.max_candidates]
    taken = np.zeros(small.shape, dtype=bool)
    out = []
    for index in order:
        k, r, c = (int(v) for v in coords[index])
        if taken[k, r, c]:
            continue
        sigma = search_pass.scales_mm[int(best_scale[k, r, c])]
        # Grown on the smoothed image: on a sharp kernel's noise a threshold near the lung's
        # own density would leak through the whole lung.
        grown = _grow_candidate(
            smoothed, search, lungs, spacing, (k, r, c), sigma, search_pass.radius_floor_mm
        )
        if grown is None:
            continue
        piece, local, features = grown
        # Later peaks inside this candidate's core are the same nodule; a leaky region must
        # not hide its neighbours, so only its part near the seed is taken.
        near = _ball(
            piece.shape,
            tuple(p - s.start for p, s in zip((k, r, c), local, strict=True)),
            spacing,
            features["diameter_mm"] / 2.0 + 2.0 * spacing.max(),
        )
        taken[local][piece & near] = True
        full = _to_source(piece, local, box, (slices, factor), hu.shape)
        if full is None:
            continue
        full_box, full_mask = full
        full_mask &= hu[full_box] > features["threshold"]
        if not full_mask.any():
            continue
        model = 0.5
        if model_tumour is not None:
            model = model_tumour(full_box, full_mask)
        vector = (
            math.log(max(float(best[k, r, c]), 1e-3)),
            float(shape[index]),
            float(best_round[k, r, c]),
            max(0.0, features["elongation"] - 1.6),
            features["lung_fraction"],
            features["truncated"],
            math.log(features["diameter_mm"]),
            max(-10.0, min(10.0, features["core_hu"] / 100.0)),
            max(0.0, features["core_hu"] - 200.0) / 100.0,
            features["solid_fraction"],
            1.0 if search_pass is MASS_PASS else 0.0,
            model,
            (features["core_hu"] - features["around_hu"]) / 100.0,
            features["halo"],
        )
        out.append(
            NoduleCandidate(
                box=full_box,
                mask=full_mask,
                score=scorer(vector) if scorer is not None else 0.0,
                diameter_mm=features["diameter_mm"],
                core_hu=features["core_hu"],
                texture=_texture(features["core_hu"], features["solid_fraction"]),
                features=vector,
            )
        )
    return out


def _ball(
    shape: tuple[int, ...], centre: tuple[int, ...], spacing: np.ndarray, radius_mm: float
) -> np.ndarray:
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in shape)]
    return (
        ((zz - centre[0]) * spacing[0]) ** 2
        + ((yy - centre[1]) * spacing[1]) ** 2
        + ((xx - centre[2]) * spacing[2]) ** 2
    ) <= radius_mm**2


def _grow_candidate(
    small: np.ndarray,
    search: np.ndarray,
    lungs: np.ndarray,
    spacing: np.ndarray,
    seed: tuple[int, int, int],
    sigma: float,
    radius_floor_mm: float,
) -> tuple[np.ndarray, tuple[slice, slice, slice], dict[str, float]] | None:
    """The opacity around ``seed``: grown above the half-way threshold inside a sphere of
    about three times the scale (at least ``radius_floor_mm``), opened against attached
    vessels; with its features."""
    radius_mm = max(3.0 * sigma, radius_floor_mm)
    half = [max(1, int(np.ceil(radius_mm / s))) for s in spacing]
    lk, lr, lc = (
        slice(max(0, p - h), min(n, p + h + 1))
        for p, h, n in zip(seed, half, small.shape, strict=True)
    )
    local = (lk, lr, lc)
    patch = small[local]
    centre = tuple(p - s.start for p, s in zip(seed, local, strict=True))
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in patch.shape)]
    dist = np.sqrt(
        ((zz - centre[0]) * spacing[0]) ** 2
        + ((yy - centre[1]) * spacing[1]) ** 2
        + ((xx - centre[2]) * spacing[2]) ** 2
    )
    core = float(np.median(patch[dist <= max(sigma, 1.5 * spacing.min())]))
    shell = (dist > 1.6 * radius_mm / 2) & (dist <= radius_mm) & lungs[local]
    around = float(np.median(patch[shell])) if shell.any() else -850.0
    if core - around < _MIN_CONTRAST_HU:
        return None
    threshold = (core + around) / 2.0
    within = search[local] & (dist <= radius_mm)
    mask = (patch > threshold) & within
    halo_found = 0.0
    # A part-solid nodule: ground glass around the solid core, denser than the lung outside
    # it. Its extent is the ground glass's, so threshold again halfway to that level. A halo
    # is a layer (still dense 2-4 mm out), not the partial-volume shell every solid nodule
    # has (dense within about a voxel only).
    if mask.any():
        # Distances matter up to 4 mm only: the mask's box widened by that much is exact.
        near = _widened_box(mask, [int(np.ceil(4.0 / s)) + 1 for s in spacing])
        outside = ndimage.distance_transform_edt(~mask[near], sampling=spacing)
        lung_near = (within & lungs[local])[near]
        inner = lung_near & (outside > 0) & (outside <= 2.0)
        outer = lung_near & (outside > 2.0) & (outside <= 4.0)
        if inner.any() and outer.any():
            halo = float(np.median(patch[near][inner]))
            beyond = float(np.median(patch[near][outer]))
            if min(halo, beyond) - around > _MIN_CONTRAST_HU and halo < threshold:
                threshold = (min(halo, beyond) + around) / 2.0
                mask = (patch > threshold) & within
                halo_found = 1.0
    # Cut attached vessels: open by a ball of about a third of the scale.
    r_open = [max(0, round(sigma / 3.0 / s)) for s in spacing]
    if any(r_open):
        # An ellipsoid in voxels, a ball in mm (a box would trim a nodule's poles).
        ball = _ball(
            tuple(2 * r + 1 for r in r_open), tuple(r_open), spacing, max(sigma / 3.0, 1e-3)
        )
        ball[tuple(r_open)] = True
        opened = ndimage.binary_opening(mask, structure=ball)
        if opened[centre]:
            mask = opened
    labels, _ = ndimage.label(mask)
    if not labels[centre]:
        return None
    region = labels == labels[centre]
    voxel_mm3 = float(np.prod(spacing))
    volume = float(region.sum()) * voxel_mm3
    diameter = float((6.0 * volume / np.pi) ** (1.0 / 3.0))
    if diameter < _MIN_DIAMETER_MM:
        return None
    pts = np.argwhere(region) * spacing
    if len(pts) >= 4:
        low, high = _extreme_eigenvalues(np.cov(pts.T) + np.eye(3) * (spacing.max() ** 2 / 12.0))
        elongation = float(np.sqrt(high / max(low, 1e-6)))
    else:
        elongation = 1.0
    # Surroundings: the shell just outside the region; lung there = surrounded by lung.
    outside = ndimage.binary_dilation(region, iterations=2) & ~region
    lung_fraction = float((lungs[local] & outside).sum()) / max(1, int(outside.sum()))
    # A region touching the sphere's edge continues beyond it (a vessel, or the chest wall).
    edge = region & (dist > radius_mm - spacing.max())
    truncated = float(edge.sum()) / max(1, int(region.sum()))
    solid = float((patch[region] > -300.0).mean())
    return (
        region,
        local,
        {
            "diameter_mm": diameter,
            "core_hu": core,
            "around_hu": around,
            "threshold": threshold,
            "elongation": elongation,
            "lung_fraction": lung_fraction,
            "truncated": truncated,
            "solid_fraction": solid,
            "halo": halo_found,
        },
    )


def _widened_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask`` (not empty) widened by ``margin`` voxels per axis."""
    box = box_of(mask)
    k, r, c = (
        slice(max(0, b.start - m), min(n, b.stop + m))
        for b, m, n in zip(box, margin, mask.shape, strict=True)
    )
    return k, r, c


def _extreme_eigenvalues_of(
    h: dict[tuple[int, int], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest eigenvalue of many symmetric 3×3 matrices given by their upper
    triangle (``h[i, j]``, i <= j, one array each), in closed form (Smith 1961): several times
    faster than a batched LAPACK call over every dense voxel of a CT."""
    q = (h[0, 0] + h[1, 1] + h[2, 2]) / 3.0
    d0, d1, d2 = h[0, 0] - q, h[1, 1] - q, h[2, 2] - q
    off = h[0, 1] ** 2 + h[0, 2] ** 2 + h[1, 2] ** 2
    p = np.sqrt((d0 * d0 + d1 * d1 + d2 * d2 + 2.0 * off) / 6.0)
    safe = np.where(p > 0, p, 1.0)
    det = (
        d0 * (d1 * d2 - h[1, 2] ** 2)
        - h[0, 1] * (h[0, 1] * d2 - h[1, 2] * h[0, 2])
        + h[0, 2] * (h[0, 1] * h[1, 2] - d1 * h[0, 2])
    )
    r = np.clip(det / (2.0 * safe**3), -1.0, 1.0)
    phi = np.arccos(r) / 3.0
    largest = q + 2.0 * p * np.cos(phi)
    smallest = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    return smallest, largest


def _extreme_eigenvalues(a: np.ndarray) -> tuple[float, float]:
    """Smallest and largest eigenvalue of a symmetric 3×3 matrix, in closed form (Smith 1961):
    LAPACK's call costs about a millisecond here, for hundreds of candidates."""
    q = float(np.trace(a)) / 3.0
    off = float(a[0, 1] ** 2 + a[0, 2] ** 2 + a[1, 2] ** 2)
    p = math.sqrt((float(((np.diag(a) - q) ** 2).sum()) + 2.0 * off) / 6.0)
    if p == 0.0:
        return q, q
    r = max(-1.0, min(1.0, float(np.linalg.det((a - q * np.eye(3)) / p)) / 2.0))
    phi = math.acos(r) / 3.0
    return q + 2.0 * p * math.cos(phi + 2.0 * math.pi / 3.0), q + 2.0 * p * math.cos(phi)


def _to_source(
    region: np.ndarray,
    local: tuple[slice, slice, slice],
    box: tuple[slice, slice, slice],
    factors: tuple[int, int],
    shape: tuple[int, ...],
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """The region (working grid, inside ``local`` of the search box) on the source grid;
    ``factors``: source slices and in-plane pixels per working voxel."""
    slices, factor = factors
    up = np.repeat(np.repeat(np.repeat(region, slices, axis=0), factor, axis=1), factor, axis=2)
    starts = (
        box[0].start + local[0].start * slices,
        box[1].start + local[1].start * factor,
        box[2].start + local[2].start * factor,
    )
    stops = [min(s + n, limit) for s, n, limit in zip(starts, up.shape, shape, strict=True)]
    full_box = (
        slice(starts[0], stops[0]),
        slice(starts[1], stops[1]),
        slice(starts[2], stops[2]),
    )
    up = up[: stops[0] - starts[0], : stops[1] - starts[1], : stops[2] - starts[2]]
    if not up.any():
        return None
    return full_box, up.copy()


def _texture(core_hu: float, solid_fraction: float) -> str:
    if core_hu < -300.0:
        return "ground-glass"
    return "solid" if solid_fraction > 0.8 else "part-solid"
