"""What one CT image's header says about its geometry, read the same way for classic CT,
Enhanced CT and Legacy Converted Enhanced CT (attributes at the top level or in the functional
groups), and leniently: a missing or malformed value reads as None, never as an exception."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

__all__ = [
    "axial_angle",
    "frame_count",
    "functional_value",
    "image_type",
    "numbers",
    "orientation",
    "pixel_spacing",
]


def functional_value(ds: Dataset, keyword: str, sequence: str) -> object:
    """An attribute from the top level, else (Enhanced CT) the shared functional groups, else
    the first frame's (the volume stage checks that every frame agrees)."""
    value = ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if value is None and ds.get(groups):
            item = ds[groups][0]
            if item.get(sequence):
                value = item[sequence][0].get(keyword)
    return value


def frame_count(ds: Dataset) -> int:
    """Number of slices an image contributes; a malformed Number of Frames counts as one."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def numbers(value: object, count: int) -> np.ndarray | None:
    """``value`` as ``count`` finite floats, or None when it is missing or malformed."""
    if value is None:
        return None
    # One value reads as a number (or, malformed, a string); several as a MultiValue.
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        items: Sequence[Any] = value
    else:
        items = [value]
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return np.asarray(values)


def orientation(ds: Dataset) -> np.ndarray | None:
    """Image Orientation (Patient) as 6 direction cosines; None if missing or degenerate."""
    iop = numbers(functional_value(ds, "ImageOrientationPatient", "PlaneOrientationSequence"), 6)
    if iop is None or np.linalg.norm(np.cross(iop[:3], iop[3:])) < 0.5:
        return None  # not two (near-)orthogonal unit vectors: no slice normal to speak of
    return iop


def pixel_spacing(ds: Dataset) -> np.ndarray | None:
    """Pixel Spacing (row, column) in mm; None if missing or malformed."""
    return numbers(functional_value(ds, "PixelSpacing", "PixelMeasuresSequence"), 2)


def image_type(ds: Dataset) -> set[str]:
    """Image Type's values, upper case."""
    value = ds.get("ImageType") or []
    # A single value reads as a plain string; iterating it would give its characters.
    values = [value] if isinstance(value, str) else value
    return {str(v).strip().upper() for v in values}


def axial_angle(iop: np.ndarray) -> float:
    """Degrees between the slice normal and the patient's long (z) axis."""
    normal = np.cross(iop[:3], iop[3:])
    return float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / np.linalg.norm(normal)))))
