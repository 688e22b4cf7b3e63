"""Drawing primitives for the realistic phantom: 3-D shapes rasterised into a tissue-class grid.

A :class:`Grid` is the fine sampling of a phantom: axes ``xs``, ``ys``, ``zs`` in LPS mm and a
uint8 tissue-class volume indexed ``[j, r, c]`` (fine plane, row, column). Every shape is
evaluated only on its own bounding box, so drawing a thousand small vessel segments costs about
as much as one slice. A drawing never sets a class directly: it maps the classes it covers
through a 256-entry table (``lut``), so one call can turn right lung into right-lung vessel and
mediastinal fat into blood while leaving bone alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "identity_lut"]


def identity_lut() -> np.ndarray:
    """A class table that leaves every class as it is; callers set the entries to change."""
    return np.arange(256, dtype=np.uint8)


@dataclass
class Grid:
    """The fine sampling grid of a phantom and its tissue-class volume.

    ``tissue`` is uint8 ``[j, r, c]``; ``xs``/``ys``/``zs`` are ascending float64 axes (mm).
    """

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray
    tissue: np.ndarray

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices ``[j, r, c]`` of the voxels whose centres lie in ``[lo, hi]`` (x, y, z);
        None if none do."""
        c0, c1 = np.searchsorted(self.xs, lo[0]), np.searchsorted(self.xs, hi[0], side="right")
        r0, r1 = np.searchsorted(self.ys, lo[1]), np.searchsorted(self.ys, hi[1], side="right")
        j0, j1 = np.searchsorted(self.zs, lo[2]), np.searchsorted(self.zs, hi[2], side="right")
        if c0 >= c1 or r0 >= r1 or j0 >= j1:
            return None
        return slice(int(j0), int(j1)), slice(int(r0), int(r1)), slice(int(c0), int(c1))

    def at(self, point: np.ndarray) -> int:
        """The class of the voxel nearest ``point`` (x, y, z mm); 0 (air) outside the grid."""
        idx = []
        for axis, v in zip(
            (self.zs, self.ys, self.xs), (point[2], point[1], point[0]), strict=True
        ):
            step = float(axis[1] - axis[0]) if len(axis) > 1 else 1.0
            i = round((float(v) - float(axis[0])) / step)
            if not 0 <= i < len(axis):
                return 0
            idx.append(i)
        return int(self.tissue[idx[0], idx[1], idx[2]])

    def offsets(
        self, window: tuple[slice, slice, slice], centre: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable float32 offsets (dz[:,1,1], dy[1,:,1], dx[1,1,:]) of a window's voxel
        centres from ``centre`` (x, y, z)."""
        dz = (self.zs[window[0]] - centre[2]).astype(np.float32)[:, None, None]
        dy = (self.ys[window[1]] - centre[1]).astype(np.float32)[None, :, None]
        dx = (self.xs[window[2]] - centre[0]).astype(np.float32)[None, None, :]
        return dz, dy, dx

    def apply(self, window: tuple[slice, slice, slice], inside: np.ndarray, lut: np.ndarray) -> int:
        """Map the classes of the ``inside`` voxels of ``window`` through ``lut``; returns how
        many voxels changed."""
        sub = self.tissue[window]
        new = lut[sub]
        inside &= new != sub
        np.copyto(sub, new, where=inside)
        return int(np.count_nonzero(inside))

    def capsule(
        self,
        a: np.ndarray,
        b: np.ndarray,
        ra: float,
        rb: float,
        lut: np.ndarray,
        where: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> int:
        """Draw a tapering cylinder with round ends from ``a`` (radius ``ra``) to ``b``
        (radius ``rb``), mm. ``where`` may restrict it further (given the window's classes).
        Returns the number of voxels changed."""
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        reach = max(ra, rb)
        window = self.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if window is None:
            return 0
        dz, dy, dx = self.offsets(window, a)
        v = (b - a).astype(np.float32)
        v2 = float(v @ v)
        dot = dx * v[0] + dy * v[1] + dz * v[2]
        t = np.clip(dot / v2, 0.0, 1.0) if v2 > 0 else np.zeros_like(dot)
        p2 = dx * dx + dy * dy + dz * dz
        d2 = p2 - 2.0 * t * dot + t * t * v2
        r = ra + t * (rb - ra)
        inside = d2 <= r * r
        if where is not None:
            inside &= where(self.tissue[window])
        return self.apply(window, inside, lut)

    def ellipsoid(
        self, centre: np.ndarray, semi: tuple[float, float, float], lut: np.ndarray
    ) -> int:
        """Draw an axis-aligned ellipsoid with semi-axes ``semi`` (x, y, z) mm."""
        centre = np.asarray(centre, dtype=np.float64)
        s = np.asarray(semi, dtype=np.float64)
        window = self.box(centre - s, centre + s)
        if window is None:
            return 0
        dz, dy, dx = self.offsets(window, centre)
        inside = (dx / s[0]) ** 2 + (dy / s[1]) ** 2 + (dz / s[2]) ** 2 <= 1.0
        return self.apply(window, inside, lut)
