"""Volume assembly: a CT series → a 3D array in HU with its LPS geometry.

Slices are ordered along the slice normal (not by InstanceNumber, which scanners number in
either direction). Geometry the app cannot handle correctly is refused with a reason rather
than silently distorted: inconsistent orientation, pixel spacing or matrix, duplicate
positions, gantry tilt (slice positions not along the normal) and irregular slice spacing
(e.g. missing slices). Single-frame CT and Enhanced CT (multi-frame, per-frame positions)
are both read; compressed transfer syntaxes decode through pydicom's pixel handlers.

Pixels matching Pixel Padding Value (or the range it spans with Pixel Padding Range Limit),
which scanners write outside the scan circle, become air (-1024 HU): the match is on the stored
value before the rescale (PS3.3 C.7.5.1.1.2), so padding never decodes to a made-up HU such as
-3024 or +62512.

The series selector hands over every qualifying series, best first; the first one that makes
a regular volume is used, and when none does, the refusal names each series and its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset

from radfusion.errors import RadfusionError
from radfusion.logs import uid_tag
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.series_selector import SeriesCandidate

__all__ = [
    "PADDING_HU",
    "Volume",
    "VolumeError",
    "VolumeOperator",
    "assemble_first_usable",
    "assemble_volume",
    "read_series",
]

log = logging.getLogger("radfusion.operators.volume")

_SPACING_TOLERANCE = 0.1  # relative deviation of a slice gap from the median gap
_TILT_TOLERANCE_MM = 0.5  # in-plane drift of slice positions allowed over the series
PADDING_HU = -1024.0  # what padded pixels (outside the scan circle) become: air
_HU_LIMIT = float(np.finfo(np.float32).max)  # the volume holds float32


class VolumeError(RadfusionError, ValueError):
    """The series cannot be assembled into a regular volume; the message says why."""


@dataclass(frozen=True)
class Volume:
    """A CT volume in HU, indexed [k, r, c], with the geometry to map it to the patient."""

    hu: np.ndarray  # float32 [slices, rows, columns]
    spacing_mm: tuple[float, float, float]  # (between slices, between rows, between columns)
    affine: np.ndarray  # 4×4: (c, r, k, 1) → LPS mm
    FrameOfReferenceUID: str
    source_images: tuple[Dataset, ...]  # full datasets in k order (one per slice; for
    # Enhanced CT the same dataset repeats, one entry per frame)
    frame_numbers: tuple[int, ...]  # 1-based frame of source_images[k] (1 for single-frame)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)


def _attr(ds: Dataset, keyword: str, sequence: str, frame: Dataset | None = None) -> Any:
    """An attribute from the top level, the per-frame or the shared functional groups (its
    value as pydicom gives it: the type depends on the VR and the value multiplicity)."""
    if keyword in ds:
        return ds.get(keyword)
    for groups in (frame, *(ds.get("SharedFunctionalGroupsSequence") or [])):
        if groups is not None and sequence in groups:
            item = groups[sequence][0]
            if keyword in item:
                return item.get(keyword)
    return None


def _frames(ds: Dataset) -> list[tuple[Dataset | None, int]]:
    n = _number(ds.get("NumberOfFrames", 1) or 1, "Number of Frames")
    if n < 1 or n != int(n):
        raise VolumeError(f"Number of Frames is {n}")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n > 1 and (per_frame is None or len(per_frame) < n):
        raise VolumeError("multi-frame image without per-frame functional groups for each frame")
    return [(per_frame[i] if per_frame is not None else None, i + 1) for i in range(int(n))]


def _number(value: object, what: str) -> float:
    """``value`` as a finite number, or VolumeError naming ``what``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise VolumeError(f"{what} is not a number: {value!r}") from None
    if not np.isfinite(number):
        raise VolumeError(f"{what} is {number}")
    return number


def _vector(value: object, size: int, what: str) -> np.ndarray:
    """``value`` as ``size`` finite numbers, or VolumeError naming ``what``."""
    try:
        vector = np.asarray(value, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise VolumeError(f"{what} is not numeric") from None
    if vector.size != size or not np.isfinite(vector).all():
        shown = ", ".join(f"{v:g}" for v in vector[:8])
        raise VolumeError(f"{what} must hold {size} finite numbers, not [{shown}]")
    return vector


def _stored_value(value: object, bits: int, signed: bool) -> int | None:
    """A padding attribute as the decoded pixels represent it: its stored bit pattern cut to
    ``bits`` (Bits Stored), read as signed or unsigned like the pixels (pydicom decodes them so,
    masking the unused high bits). The pattern, not the number, counts, so a value written with
    the wrong sign (0xF830 given as -2000 in an SS element for unsigned pixels, or the
    reverse) still matches. None: the value is not an integer."""
    if isinstance(value, bytes | bytearray):  # an ambiguous VR left undecoded: little endian
        value = int.from_bytes(bytes(value)[:2], "little") if value else None
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    pattern = value & ((1 << bits) - 1)
    if signed and pattern >> (bits - 1):
        pattern -= 1 << bits
    return pattern


def _padding_range(ds: Dataset, pixels: np.ndarray) -> tuple[int, int] | None:
    """The inclusive range of decoded stored values that are padding in ``ds``'s pixels, or
    None when there is none (no Pixel Padding Value, float pixels or an unusable value).

    Pixel Padding Value lives in the General Equipment and Image Pixel modules, so at the top
    level for Enhanced CT too; Pixel Padding Range Limit, when present, is the range's other
    end (in either order); without it the value alone is padding."""
    if pixels.dtype.kind not in "iu" or "PixelPaddingValue" not in ds:
        return None
    width = pixels.dtype.itemsize * 8
    bits = ds.get("BitsStored")
    bits = min(int(bits), width) if isinstance(bits, int) and bits > 0 else width
    representation = ds.get("PixelRepresentation")
    signed = representation == 1 if representation in (0, 1) else pixels.dtype.kind == "i"
    value = _stored_value(ds.get("PixelPaddingValue"), bits, signed)
    if value is None:
        return None
    limit = value
    if "PixelPaddingRangeLimit" in ds:
        range_limit = _stored_value(ds.get("PixelPaddingRangeLimit"), bits, signed)
        if range_limit is not None:
            limit = range_limit
    low, high = min(value, limit), max(value, limit)
    info = np.iinfo(pixels.dtype)
    if high < info.min or low > info.max:  # no decoded pixel can hold it
        return None
    return max(low, int(info.min)), min(high, int(info.max))


def assemble_volume(datasets: Sequence[Dataset]) -> Volume:
    """Build a ``Volume`` from the full datasets (with pixel data) of one series.

    Raises:
        VolumeError: the geometry is inconsistent, tilted or irregular (message says how),
            or the pixel data cannot be decoded.
    """
    if not datasets:
        raise VolumeError("no images")
    multi_frame = [ds for ds in datasets if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi_frame and len(datasets) > 1:
        # The results must reference each slice as (image, frame) of one object; several
        # multi-frame objects (or a mix) in one series is not a layout the writers support.
        raise VolumeError(
            f"series holds {len(multi_frame)} multi-frame image(s) among {len(datasets)} "
            "images, but only one multi-frame image or single-frame images are supported"
        )
    slices: list[tuple[Dataset, Dataset | None, int]] = []  # (ds, frame item, frame number)
    for ds in datasets:
        slices.extend((ds, item, number) for item, number in _frames(ds))
    orientations, positions, spacings, matrices = [], [], [], []
    for ds, item, _ in slices:
        iop = _attr(ds, "ImageOrientationPatient", "PlaneOrientationSequence", item)
        ipp = _attr(ds, "ImagePositionPatient", "PlanePositionSequence", item)
        ps = _attr(ds, "PixelSpacing", "PixelMeasuresSequence", item)
        if iop is None or ipp is None or ps is None:
            raise VolumeError("an image lacks orientation, position or pixel spacing")
        orientations.append(_vector(iop, 6, "Image Orientation (Patient)"))
        positions.append(_vector(ipp, 3, "Image Position (Patient)"))
        spacing = _vector(ps, 2, "Pixel Spacing")
        if (spacing <= 0).any():
            raise VolumeError(f"Pixel Spacing must be positive, not {spacing[0]:g}\\{spacing[1]:g}")
        spacings.append(spacing)
        if ds.get("Rows") is None or ds.get("Columns") is None:
            raise VolumeError("an image lacks Rows or Columns")
        matrix = (int(_number(ds.Rows, "Rows")), int(_number(ds.Columns, "Columns")))
        if min(matrix) < 1:
            raise VolumeError(f"an image has {matrix[0]} rows and {matrix[1]} columns")
        matrices.append(matrix)
    iop = orientations[0]
    row_norm, col_norm = np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])
    if abs(row_norm - 1) > 0.01 or abs(col_norm - 1) > 0.01 or abs(iop[:3] @ iop[3:]) > 0.01:
        raise VolumeError(
            "Image Orientation (Patient) "
            + "\\".join(f"{v:g}" for v in iop)
            + " is not two orthogonal unit vectors"
        )
    if any(np.abs(o - iop).max() > 1e-3 for o in orientations):
        raise VolumeError("images have different orientations")
    if any(np.abs(s - spacings[0]).max() > 1e-3 for s in spacings):
        raise VolumeError("images have different pixel spacings")
    if len(set(matrices)) != 1:
        raise VolumeError("images have different matrix sizes")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    order = np.argsort([float(p @ normal) for p in positions], kind="stable")
    pos = np.asarray(positions)[order]
    along = pos @ normal
    if len(pos) > 1:
        gaps = np.diff(along)
        if np.any(gaps < 1e-3):
            raise VolumeError("two images share a position (duplicate slices or several stacks)")
        step = float(np.median(gaps))
        if np.abs(gaps - step).max() > _SPACING_TOLERANCE * step:
            raise VolumeError(
                f"irregular slice spacing: gaps {gaps.min():.2f} to {gaps.max():.2f} mm around "
                f"{step:.2f} mm (missing slices?)"
            )
        drift = (pos - pos[0]) - np.outer(along - along[0], normal)
        if np.abs(drift).max() > _TILT_TOLERANCE_MM:
            raise VolumeError(
                f"slice positions drift {np.abs(drift).max():.1f} mm off the slice normal "
                "(gantry tilt), and tilted acquisitions are not supported"
            )
    else:
        thickness = datasets[0].get("SliceThickness")
        step = _number(thickness, "Slice Thickness") if thickness else 1.0
        if step <= 0:
            raise VolumeError(f"Slice Thickness is {step}")
    row_spacing, col_spacing = (float(v) for v in spacings[0])
    hu = np.empty((len(slices), *matrices[0]), dtype=np.float32)
    # Integer pixels are rescaled in float64 in one reused buffer: two fresh float64
    # temporaries per slice (2 MB each at 512²) cost more than the arithmetic.
    rescaled = np.empty(matrices[0], dtype=np.float64)
    padded = np.empty(matrices[0], dtype=bool)  # reused: which pixels of a frame are padding
    in_range = np.empty(matrices[0], dtype=bool)
    decoded: dict[int, np.ndarray] = {}
    padding: dict[int, tuple[int, int] | None] = {}
    for k, idx in enumerate(order):
        ds, item, number = slices[idx]
        try:
            if id(ds) not in decoded:
                decoded[id(ds)] = ds.pixel_array
        except Exception as err:  # pydicom: missing decoder plugin, corrupt data, ...
            raise VolumeError(f"pixel data cannot be decoded: {err}") from None
        pixels = decoded[id(ds)]
        if pixels.ndim == 3 and number > pixels.shape[0]:
            raise VolumeError(f"frame {number} is missing: the pixel data holds {len(pixels)}")
        frame = pixels[number - 1] if pixels.ndim == 3 else pixels
        if frame.shape != matrices[0]:
            raise VolumeError(
                f"pixel data decodes to {frame.shape[:2]}, not Rows x Columns {matrices[0]}"
            )
        slope = _attr(ds, "RescaleSlope", "PixelValueTransformationSequence", item)
        intercept = _attr(ds, "RescaleIntercept", "PixelValueTransformationSequence", item)
        scale = _number(slope if slope is not None else 1, "Rescale Slope")
        offset = _number(intercept or 0, "Rescale Intercept")
        if frame.dtype.kind in "iu":  # stored integers: float64, as the expression below gives
            info = np.iinfo(frame.dtype)
            if abs(scale) * max(-float(info.min), float(info.max)) + abs(offset) > _HU_LIMIT:
                raise VolumeError(f"Rescale Slope {scale:g} and Intercept {offset:g} overflow")
            np.multiply(frame, scale, out=rescaled)
            np.add(rescaled, offset, out=rescaled)
            hu[k] = rescaled
        else:  # float pixel data keeps its own precision
            hu[k] = frame * scale + offset
            if not np.isfinite(hu[k]).all():
                raise VolumeError("float pixel data rescales to values that are not finite")
        if id(ds) not in padding:
            padding[id(ds)] = _padding_range(ds, pixels)
        if (pad := padding[id(ds)]) is not None:
            # Matched on the stored values, before the rescale: one or two vectorised
            # compares per frame.
            low, high = pad
            if low == high:
                np.equal(frame, low, out=padded)
            else:
                np.greater_equal(frame, low, out=padded)
                np.less_equal(frame, high, out=in_range)
                np.logical_and(padded, in_range, out=padded)
            np.copyto(hu[k], PADDING_HU, where=padded)
        if pixels.ndim == 2:
            # A single-frame image is done with: its decoded copy goes now, not after the
            # series, so the next slice decodes into the same memory (fresh pages cost more
            # than the decoding on these machines) and 150 MB less is held at 300 slices.
            del decoded[id(ds)]
            _forget_decoded(ds)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing  # column index c moves along the row direction
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = pos[0]
    frame_of_reference = str(datasets[0].get("FrameOfReferenceUID", ""))
    return Volume(
        hu=hu,
        spacing_mm=(step, row_spacing, col_spacing),
        affine=affine,
        FrameOfReferenceUID=frame_of_reference,
        source_images=tuple(slices[i][0] for i in order),
        frame_numbers=tuple(slices[i][2] for i in order),
    )


def read_series(files: Sequence[Path]) -> list[Dataset]:
    """Read the full datasets of a series, in the order of ``files``.

    Raises:
        VolumeError: a file cannot be read (gone since selection, truncated, not DICOM).
    """
    datasets: list[Dataset] = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            # No path in the reason: spool file names are SOP Instance UIDs.
            raise VolumeError(f"an image cannot be read ({type(err).__name__})") from None
    return datasets


def _forget_decoded(ds: Dataset) -> None:
    """Free pydicom's decoded copy of a dataset's pixels (it decodes again if asked)."""
    ds._pixel_array = None
    ds._pixel_id = {}


def _drop_pixels(ds: Dataset) -> None:
    """Free a dataset's pixel data and pydicom's decoded copy (half the memory of a study)."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    _forget_decoded(ds)


def _ascii(text: str) -> str:
    """Reasons end up in SR text and logs: keep them plain ASCII whatever a library said."""
    return text.encode("ascii", "replace").decode("ascii")


def _assemble_candidate(candidate: SeriesCandidate) -> Volume:
    """Read and assemble one series; its datasets keep their headers only afterwards.

    Raises:
        VolumeError: the series cannot be read or assembled; malformed attribute values
            (which pydicom and numpy report as ValueError/TypeError/AttributeError) included.
    """
    datasets: list[Dataset] = []
    try:
        datasets = read_series(candidate.files)
        return assemble_volume(datasets)
    except VolumeError:
        raise
    except (ValueError, TypeError, AttributeError) as err:
        # A value that does not parse (e.g. a DS that is not a number) must cost this series,
        # not the study: the next candidate may be fine.
        raise VolumeError(f"malformed image attributes ({type(err).__name__})") from None
    finally:
        for ds in datasets:  # the HU array holds the pixels now; keep headers only
            _drop_pixels(ds)


def assemble_first_usable(candidates: Sequence[SeriesCandidate]) -> Volume:
    """The volume of the first candidate series that assembles, trying them in order.

    The returned volume's ``source_images`` carry no pixel data (its HU array holds them).

    Raises:
        VolumeError: no candidate assembles (or there are none); the message names each
            series by its label (Series Number, else a hashed tag; never the UID) with its
            reason, in order.
    """
    reasons = []
    for candidate in candidates:
        try:
            volume = _assemble_candidate(candidate)
        except VolumeError as err:
            reason = _ascii(str(err))
            reasons.append(f"{candidate.label}: {reason}")
            log.info("series %s cannot be used: %s", uid_tag(candidate.SeriesInstanceUID), reason)
            continue
        if reasons:
            log.warning(
                "series %s used after %d preferred series could not be assembled",
                uid_tag(candidate.SeriesInstanceUID),
                len(reasons),
            )
        return volume
    # Each part starts with its series' label, so the parts stay apart for a reader.
    raise VolumeError("; ".join(reasons) if reasons else "no series to assemble")


class VolumeOperator(Operator):
    """Input ``selection`` (``SeriesSelection`` or None) → output ``volume``
    (``Volume`` of the first candidate series that assembles, or a ``VolumeError`` instance
    carrying every candidate's reason, or None when there was no selection).

    :attr:`timings` holds the seconds spent reading and assembling (``load``) after a run.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        **kw: object,
    ) -> None:
        self.timings: dict[str, float] = {}  # this operator's stage seconds, read after a run
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("selection")
        spec.output("volume")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        selection = op_input.receive("selection")
        result: Volume | VolumeError | None = None
        started = time.perf_counter()
        if selection is not None:
            try:
                result = assemble_first_usable(selection.candidates)
            except VolumeError as err:
                result = err
        self.timings["load"] = time.perf_counter() - started
        op_output.emit(result, "volume")
