"""Series selection: the axial CT series of a study that the app can use, best first.

Scanners send more than the series an app wants: localizers (scouts, topograms), secondary
captures, dose reports, reformats in other planes, thick and thin reconstructions. The
selector keeps CT image series with enough axial slices, skips the rest with a reason each,
and orders the ones it keeps by preference: most slices (the thinnest reconstruction) first.
The volume stage tries them in that order, so a preferred series that cannot be assembled
does not cost the study its results.

Real series are not always clean: a scanner may put a scout, a stray reformat or a screen
capture under the same Series Instance UID as the axial images. Such images are left out of
the series (counted, with the reason) rather than the whole series being skipped, as long as
what remains still qualifies. Leaving an image out never hides a gap: the volume stage refuses
irregular slice spacing, so a dropped image that was really a slice of the stack still stops
that series.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset

from radfusion.logs import uid_tag

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "SeriesCandidate",
    "SeriesSelection",
    "SeriesSelectorOperator",
    "read_headers",
    "select_series",
]

log = logging.getLogger("radfusion.operators.series_selector")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
_CT_CLASSES = {
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
}
_AXIAL_TOLERANCE_DEG = 30.0  # a tilted gantry is still axial; coronal/sagittal are not
_GEOMETRY_TOLERANCE = 1e-3  # as the volume stage: direction cosines and spacings (mm) agree

NOT_CT_STORAGE = "not CT image storage (e.g. secondary capture, dose report)"
LOCALIZER = "localizer (scout/topogram)"
DUPLICATE = "duplicate SOP Instance UID (the same image twice)"


@dataclass(frozen=True)
class SeriesCandidate:
    """A series that qualifies for processing, with the images to use.

    ``files`` and ``headers`` hold only the images kept (in the order they came); ``dropped``
    counts the images left out of the series, by reason.
    """

    SeriesInstanceUID: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    slices: int
    dropped: tuple[tuple[str, int], ...] = ()  # (reason, number of images)
    SeriesNumber: int | None = None

    @property
    def label(self) -> str:
        """The series as logs and reports name it, without its UID: ``series 3 (120 slices)``
        (a hashed tag stands in for a missing Series Number)."""
        number = self.SeriesNumber
        name = number if number is not None else uid_tag(self.SeriesInstanceUID)
        return f"series {name} ({self.slices} slices)"


@dataclass(frozen=True)
class SeriesSelection:
    """The series of a study the app could use, in preference order, and why every other
    series was not.

    Raises:
        ValueError: ``candidates`` is empty (no selection is ``None``, not an empty one).
    """

    candidates: tuple[SeriesCandidate, ...]  # best first
    skipped: tuple[tuple[str, str], ...]  # (SeriesInstanceUID, reason)

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("candidates: a selection needs at least one series")

    @property
    def preferred(self) -> SeriesCandidate:
        """The series to try first."""
        return self.candidates[0]

    def candidate(self, series_instance_uid: str) -> SeriesCandidate:
        """The candidate with this Series Instance UID.

        Raises:
            KeyError: no candidate has it.
        """
        for candidate in self.candidates:
            if candidate.SeriesInstanceUID == series_instance_uid:
                return candidate
        raise KeyError(f"no candidate series {uid_tag(series_instance_uid)}")


def read_headers(files: Iterable[Path]) -> list[tuple[Path, Dataset]]:
    """Read each file's header (no pixel data); unreadable files are logged and skipped."""
    out = []
    for f in files:
        try:
            out.append((Path(f), pydicom.dcmread(f, stop_before_pixels=True)))
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            # Spool file names are SOP Instance UIDs, and error texts repeat the path: tag them.
            log.warning(
                "skipping unreadable file %s: %s", uid_tag(Path(f).name), type(err).__name__
            )
    return out


# -- one image -------------------------------------------------------------------------------


def _frames(ds: Dataset) -> int:
    """Number of slices an image contributes; a malformed Number of Frames counts as one."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _functional(ds: Dataset, keyword: str, sequence: str) -> object:
    """An attribute from the top level, else (Enhanced CT) the shared functional groups, else
    the first frame's (the volume stage checks that every frame agrees)."""
    value = ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if value is None and ds.get(groups):
            item = ds[groups][0]
            if item.get(sequence):
                value = item[sequence][0].get(keyword)
    return value


def _numbers(value: object, count: int) -> np.ndarray | None:
    """``value`` as ``count`` finite floats, or None when it is missing or malformed."""
    if value is None:
        return None
    # One value reads as a number (or, malformed, a string); several as a MultiValue.
    many = isinstance(value, Sequence) and not isinstance(value, str | bytes)
    try:
        values = [float(v) for v in (value if many else [value])]
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return np.asarray(values)


def _orientation(ds: Dataset) -> np.ndarray | None:
    """Image Orientation (Patient) as 6 direction cosines; None if missing or degenerate."""
    iop = _numbers(_functional(ds, "ImageOrientationPatient", "PlaneOrientationSequence"), 6)
    if iop is None or np.linalg.norm(np.cross(iop[:3], iop[3:])) < 0.5:
        return None  # not two (near-)orthogonal unit vectors: no slice normal to speak of
    return iop


def _pixel_spacing(ds: Dataset) -> np.ndarray | None:
    return _numbers(_functional(ds, "PixelSpacing", "PixelMeasuresSequence"), 2)


def _image_type(ds: Dataset) -> set[str]:
    value = ds.get("ImageType") or []
    # A single value reads as a plain string; iterating it would give its characters.
    values = [value] if isinstance(value, str) else value
    return {str(v).strip().upper() for v in values}


def _axial_angle(iop: np.ndarray) -> float:
    """Degrees between the slice normal and the patient's long (z) axis."""
    normal = np.cross(iop[:3], iop[3:])
    return float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / np.linalg.norm(normal)))))


def _image_problem(ds: Dataset) -> str | None:
    """Why this image cannot be a slice of an axial CT volume; None when it can."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality != "CT":
        return f"modality {modality or 'missing'}, not CT"
    if str(ds.get("SOPClassUID", "")) not in _CT_CLASSES:
        return NOT_CT_STORAGE
    if not str(ds.get("SOPInstanceUID", "") or ""):
        return "no SOP Instance UID"  # the results could not reference it
    if "LOCALIZER" in _image_type(ds):
        return LOCALIZER
    if ds.get("Rows") is None or ds.get("Columns") is None:
        return "no image pixel data"
    iop = _orientation(ds)
    if iop is None:
        return "no valid Image Orientation (Patient)"
    angle = _axial_angle(iop)
    if angle > _AXIAL_TOLERANCE_DEG:
        return f"not axial (slice normal {angle:.0f} degrees from the patient's long axis)"
    single_frame = _frames(ds) == 1 and "PerFrameFunctionalGroupsSequence" not in ds
    if single_frame and _numbers(ds.get("ImagePositionPatient"), 3) is None:
        return "no valid Image Position (Patient)"  # Enhanced CT: per frame, checked later
    return None


# -- one series ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """What the images of one stack share: orientation, matrix and pixel spacing."""

    orientation: np.ndarray
    matrix: tuple[int, int]
    spacing: np.ndarray | None

    def difference(self, other: _Geometry) -> str | None:
        """How ``other`` differs from this geometry (the first attribute that does), or None."""
        if np.abs(self.orientation - other.orientation).max() > _GEOMETRY_TOLERANCE:
            return "orientation differs from the rest of the series"
        if self.matrix != other.matrix:
            return "matrix size (Rows/Columns) differs from the rest of the series"
        if (self.spacing is None) != (other.spacing is None) or (
            self.spacing is not None
            and other.spacing is not None
            and np.abs(self.spacing - other.spacing).max() > _GEOMETRY_TOLERANCE
        ):
            return "pixel spacing differs from the rest of the series"
        return None


def _geometry(ds: Dataset) -> _Geometry:
    """The geometry of an image that passed :func:`_image_problem` (so it has orientation and
    a matrix; a malformed Rows/Columns reads as 0 x 0, a stack of its own)."""
    orientation = _orientation(ds)
    assert orientation is not None  # checked by _image_problem
    try:
        matrix = (int(ds.Rows), int(ds.Columns))
    except (TypeError, ValueError):
        matrix = (0, 0)
    return _Geometry(orientation, matrix, _pixel_spacing(ds))


Item = tuple[Path, Dataset]


def _main_stack(items: Sequence[Item]) -> tuple[list[Item], list[str]] | str:
    """Split usable images into stacks of one geometry and keep the one with most slices.

    Returns the kept images and a reason for each image left out, or a reason to skip the
    series when two stacks tie for most slices (no way to tell which one is meant).
    """
    stacks: list[list[tuple[_Geometry, Item]]] = []  # the first member is the reference
    for item in items:
        geometry = _geometry(item[1])
        for members in stacks:
            if members[0][0].difference(geometry) is None:
                members.append((geometry, item))
                break
        else:
            stacks.append([(geometry, item)])

    def size(members: list[tuple[_Geometry, Item]]) -> int:
        return sum(_frames(ds) for _, (_, ds) in members)

    stacks.sort(key=size, reverse=True)  # stable: equal stacks keep the order they came in
    if len(stacks) > 1 and size(stacks[0]) == size(stacks[1]):
        return (
            f"images form {len(stacks)} stacks with different orientation, matrix or pixel "
            f"spacing, the largest two of {size(stacks[0])} slices each"
        )
    main = stacks[0][0][0]
    reasons = [
        # Within tolerance of another stack's first image but not of the main stack's: the
        # chain of small differences still makes it a different geometry.
        main.difference(geometry) or "geometry differs from the rest of the series"
        for members in stacks[1:]
        for geometry, _ in members
    ]
    return [item for _, item in stacks[0]], reasons


def _series_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("SeriesNumber")
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _counted(reasons: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """Reasons with their number of images, most frequent first."""
    return tuple(Counter(reasons).most_common())


def _candidate(uid: str, items: Sequence[Item], min_slices: int) -> SeriesCandidate | str:
    """The usable part of one series, or the reason the series is skipped."""
    dropped: list[str] = []
    usable: list[Item] = []
    seen: set[str] = set()
    for path, ds in items:
        sop = str(ds.get("SOPInstanceUID", ""))
        problem = DUPLICATE if sop and sop in seen else _image_problem(ds)
        seen.add(sop)
        if problem is None:
            usable.append((path, ds))
        else:
            dropped.append(problem)
    if not usable:
        # Nothing to keep: the series is what most of its images are (a localizer series,
        # a dose report, a sagittal reformat ...).
        return _counted(dropped)[0][0]
    stack = _main_stack(usable)
    if isinstance(stack, str):
        return stack
    kept, strays = stack
    dropped.extend(strays)
    slices = sum(_frames(ds) for _, ds in kept)
    left_out = f" after leaving out {len(dropped)} image(s)" if dropped else ""
    if slices < min_slices:
        return f"{slices} slice(s), fewer than the {min_slices} required{left_out}"
    candidate = SeriesCandidate(
        uid,
        tuple(p for p, _ in kept),
        tuple(ds for _, ds in kept),
        slices,
        _counted(dropped),
        _series_number(kept[0][1]),
    )
    if dropped:
        log.info(
            "series %s: left out %d of %d image(s): %s",
            uid_tag(uid),
            len(dropped),
            len(items),
            "; ".join(f"{reason} ({n})" for reason, n in candidate.dropped),
        )
    return candidate


def select_series(
    files: Iterable[tuple[Path, Dataset]], *, min_slices: int = 50
) -> SeriesSelection | None:
    """The CT series the app could process, best first; None when no series qualifies.

    Candidates are ordered by number of slices (most first), then by Series Instance UID, so
    the order does not depend on the order the files came in. The reason each series was
    skipped is logged and returned with the selection.
    """
    by_series: dict[str, list[Item]] = {}
    for path, ds in files:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((path, ds))
    candidates: list[SeriesCandidate] = []
    skipped: list[tuple[str, str]] = []
    for uid, items in by_series.items():
        outcome = _candidate(uid, items, min_slices) if uid else "no Series Instance UID"
        if isinstance(outcome, SeriesCandidate):
            candidates.append(outcome)
        else:
            skipped.append((uid, outcome))
            log.info("series %s skipped: %s", uid_tag(uid), outcome)
    if not candidates:
        return None
    candidates.sort(key=lambda c: (c.slices, c.SeriesInstanceUID), reverse=True)
    return SeriesSelection(tuple(candidates), tuple(skipped))


class SeriesSelectorOperator(Operator):
    """Input ``files`` (list of paths of one study) → output ``selection``
    (``SeriesSelection``, or ``None`` when the study has no usable CT series)."""

    def __init__(self, fragment: Fragment, *args: object, min_slices: int = 50, **kw: object):
        self.min_slices = min_slices
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("files")
        spec.output("selection")

    def compute(self, op_input: object, op_output: object, context: object) -> None:
        files = op_input.receive("files")  # type: ignore[attr-defined]
        selection = select_series(read_headers(files), min_slices=self.min_slices)
        op_output.emit(selection, "selection")  # type: ignore[attr-defined]
