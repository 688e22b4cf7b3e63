"""A segmentation model and the processing around it: what a site swaps to use its own model.

A model is described by a small YAML file (``model.yaml``) beside its TorchScript file::

    name: radfusion-lung-ct            # goes into the SEG/SR algorithm identification
    version: 0.1.0
    model: model.ts                    # TorchScript, relative to this file
    spacing_mm: [2.0, 1.5, 1.5]        # the grid the model sees: (slice, row, column) spacing
    intensity: {hu_min: -1000, hu_max: 500}   # HU clipped to this window, scaled to [0, 1]
    labels: {1: lung, 2: tumour}       # output channel → class; channel 0 is background
    roi_size: [96, 256, 256]           # sliding-window patch on the model grid
    overlap: 0.25
    demonstration: true                # results say "demonstration, not for clinical use"

Processing: the HU volume is resampled to ``spacing_mm`` (area averaging when shrinking, so
partial volumes are kept; linear when growing), clipped and scaled; the network runs over it
in sliding windows and gives class probabilities; these are interpolated linearly back to the
source grid and the most likely class is taken per source voxel. Interpolating probabilities
(not hard labels) keeps boundaries sub-voxel accurate at the source resolution.

Nothing here knows DICOM or the network: ``segment`` takes an array and a predictor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from radfusion.model_config import (
    ModelConfigError,
    SegmentationModelConfig,
    default_model_config_path,
)

__all__ = [
    "ClassMap",
    "ModelConfigError",
    "Predictor",
    "SegmentationModelConfig",
    "default_model_config_path",
    "load_torchscript",
    "model_grid_shape",
    "preprocess",
    "probabilities_to_classes",
    "segment",
    "segment_map",
]

log = logging.getLogger("radfusion.operators.segmentation")

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch ``[B, 1, D, H, W]`` (float32, scaled intensities) to logits ``[B, C, D, H, W]``.
The in-process TorchScript module is one (:func:`load_torchscript`); a Triton client is
another (``radfusion.integrations.inference.triton.TritonPredictor``). A predictor that wants
several patches per call says how many in an attribute ``windows_per_call``."""

_OUTPUT_CHUNK_SLICES = 32  # source slices resolved at a time: bounds memory on 500+ slices


def load_torchscript(path: Path, threads: int = 0) -> Predictor:
    """Load a TorchScript model for in-process CPU inference.

    Raises:
        ModelConfigError: the file is not a loadable TorchScript model.
    """
    if threads:
        torch.set_num_threads(threads)
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelConfigError(f"{path}: not a loadable TorchScript model: {exc}") from exc

    def predict(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(batch)

    return predict


def model_grid_shape(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    target_mm: tuple[float, float, float],
) -> tuple[int, int, int]:
    """The shape of a volume of ``shape`` at ``spacing_mm`` resampled to ``target_mm``."""
    depth, height, width = (
        max(1, round(n * s / t)) for n, s, t in zip(shape, spacing_mm, target_mm, strict=True)
    )
    return depth, height, width


def resample(volume: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resample ``[C, D, H, W]`` to ``shape``: area averaging along axes that shrink, linear
    interpolation along axes that grow (both with pixel-centre alignment)."""
    x = volume[None]
    depth, height, width = (min(n, m) for n, m in zip(x.shape[2:], shape, strict=True))
    shrink = (depth, height, width)
    if shrink != tuple(x.shape[2:]):
        x = F.adaptive_avg_pool3d(x, shrink)
    if shrink != tuple(shape):
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return x[0]


def preprocess(
    hu: np.ndarray, spacing_mm: tuple[float, float, float], config: SegmentationModelConfig
) -> torch.Tensor:
    """HU volume ``[k, r, c]`` → the model's input ``[1, D, H, W]`` on its grid, in [0, 1]."""
    # Out of place: the caller's HU volume is measured later and must keep its values.
    x = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None]
    x = x.clamp(config.hu_min, config.hu_max)
    x = resample(x, model_grid_shape(hu.shape, spacing_mm, config.spacing_mm))
    return (x - config.hu_min) / (config.hu_max - config.hu_min)


def _stencil(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation stencil from ``n_in`` to ``n_out`` samples with pixel-centre
    alignment: lower index, upper index and the upper weight per output sample."""
    z = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lower = np.floor(z).astype(np.intp)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (z - lower).astype(np.float32)


def _argmax_channels(p: np.ndarray) -> np.ndarray:
    """``p.argmax(axis=0)`` as uint8, for a few channels (``p``: ``[C, ...]``, C ≤ 255).

    numpy's argmax along the leading axis walks the array with a large stride (0.1-0.5 s for
    3 × 150 × 240² on these machines); comparing whole channels gives the same indices (the
    first maximum wins ties) in a fraction of that. NaN, which argmax ranks first, is left to
    argmax itself: a NaN or infinity makes the sum NaN or infinite."""
    if p.shape[0] > 255 or not np.isfinite(p.sum(dtype=np.float64)):
        return p.argmax(axis=0).astype(np.uint8)
    best = np.zeros(p.shape[1:], dtype=np.uint8)
    top = p[0]
    for channel in range(1, p.shape[0]):
        higher = p[channel] > top
        best[higher] = channel
        top = np.maximum(top, p[channel])
    return best


@dataclass(frozen=True, eq=False)
class ClassMap:
    """The model's classes on a source grid of ``shape`` (``[k, r, c]``), resolved on demand:
    per source voxel, the most likely class of the trilinearly interpolated probabilities.

    A linear blend of probability vectors that share their most likely class keeps that class,
    so only voxels whose 2×2×2 model-grid neighbourhood disagrees (``mixed``) are interpolated;
    the rest take the class of the neighbourhood. :meth:`full` resolves every voxel (0.8 s for
    512² × 133 here), :meth:`at` only chosen voxels of a box: the detector asks for a few
    hundred candidates' voxels and never needs the whole map.
    """

    probabilities: np.ndarray  # [C, D, H, W] float32 on the model grid
    shape: tuple[int, int, int]
    best: np.ndarray  # [D, H, W] uint8: the most likely class per model-grid voxel
    mixed: np.ndarray  # [D, H, W] bool: the cell with this lower corner spans several classes
    stencils: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]  # per axis (lower, upper, w)

    @classmethod
    def from_probabilities(
        cls, probabilities: torch.Tensor, shape: tuple[int, int, int]
    ) -> ClassMap:
        """Class probabilities ``[C, D, H, W]`` on the model grid, for a source grid of
        ``shape``."""
        p = probabilities.float().numpy()
        depth, height, width = p.shape[1:]
        best = _argmax_channels(p)
        stencils = tuple(
            _stencil(n_out, n_in) for n_out, n_in in zip(shape, (depth, height, width), strict=True)
        )
        # mixed[d, h, w]: the cell whose lower corner is (d, h, w) spans more than one class.
        # Its upper corner is clamped to the grid; at the edge that repeats a lower corner, so
        # shifted views (no copies) over the interior find the same cells.
        mixed = np.zeros(best.shape, dtype=bool)
        for dk in (0, 1):
            for dr in (0, 1):
                for dc in (0, 1):
                    if dk or dr or dc:
                        inner = mixed[: depth - dk, : height - dr, : width - dc]
                        inner |= (
                            best[: depth - dk, : height - dr, : width - dc] != best[dk:, dr:, dc:]
                        )
        size = (int(shape[0]), int(shape[1]), int(shape[2]))
        return cls(p, size, best, mixed, stencils)

    def full(self) -> np.ndarray:
        """The class map of the whole source grid (uint8)."""
        (zl, _, _), (yl, _, _), (xl, _, _) = self.stencils
        out = np.empty(self.shape, dtype=np.uint8)
        for start in range(0, self.shape[0], _OUTPUT_CHUNK_SLICES):
            ks = slice(start, min(start + _OUTPUT_CHUNK_SLICES, self.shape[0]))
            # Source slices usually share model-grid slices (1 mm source, 2 mm grid): resolve
            # each grid slice in the plane once, then copy it to the source slices it serves
            # ("clip": np.take then writes into out directly instead of through a buffer).
            planes, plane_of = np.unique(zl[ks], return_inverse=True)
            np.take(self.best[planes][:, yl][:, :, xl], plane_of, axis=0, out=out[ks], mode="clip")
            u, r, c = np.nonzero(self.mixed[planes][:, yl][:, :, xl])
            if not len(u):
                continue
            bounds = np.searchsorted(u, np.arange(len(planes) + 1))
            parts = [(bounds[j], bounds[j + 1]) for j in plane_of]  # source slice → its voxels
            k = np.repeat(np.arange(ks.start, ks.stop), [hi - lo for lo, hi in parts])
            r = np.concatenate([r[lo:hi] for lo, hi in parts])
            c = np.concatenate([c[lo:hi] for lo, hi in parts])
            out[k, r, c] = self._blend(k, r, c)
        return out

    def at(self, box: tuple[slice, slice, slice], where: np.ndarray) -> np.ndarray:
        """The classes of the voxels of ``box`` (steps of 1) where ``where`` (a bool array of
        the box's shape) is True, in :func:`numpy.nonzero` order: the same values as
        ``full()[box][where]``, resolving only those voxels (a nodule candidate fills a
        fraction of its box)."""
        (zl, _, _), (yl, _, _), (xl, _, _) = self.stencils
        ks, rs, cs = (np.arange(*b.indices(n)) for b, n in zip(box, self.shape, strict=True))
        u, v, w = np.nonzero(where)
        k, r, c = ks[u], rs[v], cs[w]
        gk, gr, gc = zl[k], yl[r], xl[c]
        out = self.best[gk, gr, gc]
        mixed = self.mixed[gk, gr, gc]
        if mixed.any():
            out[mixed] = self._blend(k[mixed], r[mixed], c[mixed])
        return out

    def _blend(self, k: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
        """The most likely class of the trilinearly interpolated probabilities at source
        voxels (k, r, c)."""
        (zl, zu, zw), (yl, yu, yw), (xl, xu, xw) = self.stencils
        p = self.probabilities
        blend = np.zeros((p.shape[0], len(k)), dtype=np.float32)
        for zi, zf in ((zl[k], 1 - zw[k]), (zu[k], zw[k])):
            for yi, yf in ((yl[r], 1 - yw[r]), (yu[r], yw[r])):
                for xi, xf in ((xl[c], 1 - xw[c]), (xu[c], xw[c])):
                    blend += p[:, zi, yi, xi] * (zf * yf * xf)
        return _argmax_channels(blend)


def probabilities_to_classes(
    probabilities: torch.Tensor, shape: tuple[int, int, int]
) -> np.ndarray:
    """Class probabilities ``[C, D, H, W]`` on the model grid → class map of ``shape`` (uint8):
    per source voxel, the most likely class of the trilinearly interpolated probabilities (see
    :class:`ClassMap`)."""
    return ClassMap.from_probabilities(probabilities, shape).full()


def segment_map(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    predictor: Predictor,
    config: SegmentationModelConfig,
    *,
    timings: dict[str, float] | None = None,
    windows_per_call: int = 1,
) -> ClassMap:
    """Segment a HU volume ``[k, r, c]``; returns its class map (0 background, else the
    model's output channel, see ``config.labels``), resolved on the same grid on demand.

    ``timings``, if given, receives seconds per stage (preprocess, inference, postprocess).
    ``windows_per_call``: sliding-window patches handed to the predictor at once (a remote
    predictor sends them as concurrent requests; in process, one keeps memory low).

    Raises:
        ValueError: ``hu`` is not 3-D or the predictor's output has the wrong shape.
    """
    from monai.inferers import sliding_window_inference  # heavy: only when segmenting

    if hu.ndim != 3:
        raise ValueError(f"expected a 3-D volume [k, r, c], got shape {hu.shape}")
    t0 = time.perf_counter()
    x = preprocess(hu, spacing_mm, config)
    t1 = time.perf_counter()
    # Windows are always roi_size (a volume smaller than that is padded), so the network sees
    # the shapes it was traced and trained with.
    with torch.inference_mode():
        logits = sliding_window_inference(
            x[None],
            roi_size=config.roi_size,
            sw_batch_size=windows_per_call,
            predictor=predictor,
            overlap=config.overlap,
            mode="gaussian",
        )
    if not isinstance(logits, torch.Tensor) or logits.shape[2:] != x.shape[1:]:
        raise ValueError(
            f"model output shape {getattr(logits, 'shape', None)} does not match "
            f"its input {tuple(x.shape)}"
        )
    if logits.shape[1] != len(config.labels) + 1:
        raise ValueError(
            f"model gives {logits.shape[1]} channels, model.yaml names "
            f"{len(config.labels)} classes + background"
        )
    t2 = time.perf_counter()
    with torch.inference_mode():
        classes = ClassMap.from_probabilities(torch.softmax(logits[0], dim=0), hu.shape)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(preprocess=t1 - t0, inference=t2 - t1, postprocess=t3 - t2)
    return classes


def segment(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    predictor: Predictor,
    config: SegmentationModelConfig,
    *,
    timings: dict[str, float] | None = None,
    windows_per_call: int = 1,
) -> np.ndarray:
    """:func:`segment_map` resolved on the whole source grid: the class map (0 background,
    else the model's output channel, see ``config.labels``), uint8, ``hu``'s shape. The
    postprocess seconds include resolving it.

    Raises:
        ValueError: as :func:`segment_map`.
    """
    classes = segment_map(
        hu, spacing_mm, predictor, config, timings=timings, windows_per_call=windows_per_call
    )
    started = time.perf_counter()
    full = classes.full()
    if timings is not None:
        timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - started
    return full
