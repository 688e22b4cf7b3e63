"""How a scanner turns the realistic phantom into slices: partial volume, kernel, noise, FOV.

The anatomy is drawn on fine planes (at most 1 mm apart, the output slice centres among them);
a slice of thickness T is the mean of the fine planes within T/2 of its centre, each weighted
by how much of its own 1-plane-spacing slab lies in the slice (a box slice profile). So a 5 mm
slice through a 6 mm nodule shows it at intermediate HU, as a scanner does. Slice spacing may
differ from the thickness (overlapping or gapped reconstructions).

Kernels: ``soft`` blurs slightly (point spread σ 0.45 mm) and adds spatially correlated noise
(σ 10-20 HU); ``sharp`` enhances edges (unsharp mask) and adds high-frequency noise (σ 40-90 HU).
Pixels outside the scan circle (diameter = the smaller image side) are air at exactly -1024 HU,
which the DICOM writer replaces by the vendor's padding value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "KERNELS",
    "NOISE_RANGE_HU",
    "Sampling",
    "outside_scan_circle",
    "plan_sampling",
    "render_slices",
]

KERNELS = ("soft", "sharp")
NOISE_RANGE_HU: dict[str, tuple[float, float]] = {"soft": (10.0, 20.0), "sharp": (40.0, 90.0)}
_MAX_FINE_MM = 1.0
_HU_MIN, _HU_MAX = -1024, 3071


@dataclass(frozen=True)
class Sampling:
    """Fine planes of a stack: ``zs`` (mm), slice ``k``'s centre plane ``first + k * step``,
    and the plane offsets and weights of its slice profile."""

    zs: np.ndarray
    first: int
    step: int
    offsets: np.ndarray  # int, relative to the centre plane
    weights: np.ndarray  # float32, sum 1


def plan_sampling(z0: float, slices: int, spacing: float, thickness: float) -> Sampling:
    """Fine planes for ``slices`` slices from ``z0``, ``spacing`` apart, ``thickness`` thick."""
    step = max(1, math.ceil(spacing / _MAX_FINE_MM - 1e-9))
    dz = spacing / step
    half = thickness / 2.0
    reach = math.ceil(half / dz - 0.5 + 1e-9)
    offsets = np.arange(-reach, reach + 1)
    # Overlap of each plane's slab [o·dz - dz/2, o·dz + dz/2] with the slice [-T/2, T/2].
    lo = np.maximum(offsets * dz - dz / 2, -half)
    hi = np.minimum(offsets * dz + dz / 2, half)
    weights = np.clip(hi - lo, 0.0, None)
    keep = weights > 1e-9
    offsets, weights = offsets[keep], weights[keep]
    first = int(-offsets.min())
    n_fine = first + (slices - 1) * step + int(offsets.max()) + 1
    zs = z0 + (np.arange(n_fine) - first) * dz
    return Sampling(zs, first, step, offsets, (weights / weights.sum()).astype(np.float32))


def outside_scan_circle(
    rows: int, cols: int, pixel_spacing: tuple[float, float], diameter_mm: float
) -> np.ndarray:
    """Bool ``[r, c]``: pixels whose centres lie outside the scan circle of ``diameter_mm``
    centred on the image (what scanners fill with their padding value)."""
    y = (np.arange(rows) - (rows - 1) / 2)[:, None] * pixel_spacing[0]
    x = (np.arange(cols) - (cols - 1) / 2)[None, :] * pixel_spacing[1]
    return x * x + y * y > (diameter_mm / 2.0) ** 2


def _kernel1d(sigma: float) -> np.ndarray:
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(image: np.ndarray, k: np.ndarray) -> np.ndarray:
    out = ndimage.correlate1d(image, k, axis=0, mode="nearest")
    return ndimage.correlate1d(out, k, axis=1, mode="nearest")


def render_slices(
    rng: np.random.Generator,
    tissue: np.ndarray,
    sampling: Sampling,
    slices: int,
    hu_lut: np.ndarray,
    lung_classes: np.ndarray,
    lung_offset: np.ndarray,
    kernel: str,
    sigma: float,
    pixel_spacing: float,
    outside: np.ndarray,
) -> np.ndarray:
    """The int16 HU slices: partial-volume mean, kernel, noise, scan circle.

    ``hu_lut`` maps a class to its nominal HU; ``lung_classes`` (bool per class) marks lung
    parenchyma, which gets ``lung_offset`` (a per-pixel HU field: denser dependent lung) added.
    ``outside`` (bool ``[r, c]``) is set to -1024 HU after the noise: outside the scan circle.
    """
    rows, cols = tissue.shape[1:]
    out = np.empty((slices, rows, cols), dtype=np.int16)
    acc = np.empty((rows, cols), dtype=np.float32)
    noise = np.empty((rows, cols), dtype=np.float32)
    psf = _kernel1d(0.45 / pixel_spacing) if 0.45 / pixel_spacing > 0.25 else None
    k_noise = _kernel1d(max(0.7, 0.9 / pixel_spacing))
    k2 = np.outer(k_noise, k_noise)
    if kernel == "soft":
        noise_scale = sigma / math.sqrt(float((k2 * k2).sum()))
    else:
        centre = k2.size // 2
        var = 1.0 - 2.0 * float(k2.flat[centre]) + float((k2 * k2).sum())
        noise_scale = sigma / math.sqrt(var)
    k_edge = _kernel1d(max(0.6, 0.7 / pixel_spacing))
    for k in range(slices):
        acc.fill(0.0)
        centre_plane = sampling.first + k * sampling.step
        for o, wgt in zip(sampling.offsets, sampling.weights, strict=True):
            plane = tissue[centre_plane + int(o)]
            value = hu_lut[plane]
            value += lung_offset * lung_classes[plane]
            value *= wgt
            acc += value
        if kernel == "soft":
            image = _blur(acc, psf) if psf is not None else acc
        else:
            image = acc + 0.7 * (acc - _blur(acc, k_edge))  # edge enhancement
        rng.standard_normal(dtype=np.float32, out=noise)
        shaped = _blur(noise, k_noise)
        if kernel == "sharp":
            shaped = noise - shaped  # high-pass: the grainy texture of sharp kernels
        image += noise_scale * shaped
        np.rint(image, out=image)
        np.clip(image, _HU_MIN, _HU_MAX, out=image)
        image[outside] = _HU_MIN
        out[k] = image
    return out
