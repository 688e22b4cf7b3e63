"""Series selection: the axial CT series of a study that the app can use, best first.

Scanners send more than the series an app wants: localizers (scouts, topograms), secondary
captures, dose reports, reformats in other planes, thick and thin reconstructions. The
selector keeps CT image series that cover enough of the patient along the long axis with slices
close enough together (:class:`SelectionRule`; a count of slices would refuse a 30 x 8 mm chest
and accept 60 x 1 mm of it), and skips every other series with a reason that names it and the
values (``series 3 (ThoraxRoutine B70f): z coverage 90 mm < 150 mm ...``).

Several reconstructions of one acquisition (the same Frame of Reference and overlapping slice
positions, but another Convolution Kernel or Slice Thickness) are one choice, not several: the
rule's ``reconstruction_preference`` (default: thinnest slices, then a soft kernel, see
:func:`kernel_class`) picks one and the others are skipped, each saying which was chosen and
why; :attr:`SeriesSelection.choice` says why the preferred series was. Series that remain are
ordered by the same preference, then z coverage, then number of slices. The volume stage tries
them in that order, so a preferred series that cannot be assembled does not cost the study its
results (copies that differ in neither kernel nor thickness stay such fallbacks).

When nothing qualifies, the selection holds no candidates, only the reasons and the images of
the series that came closest, which a refusal SR references (see
:mod:`radfusion.operators.results_writer`).

Real series are not always clean: a scanner may put a scout, a stray reformat or a screen
capture under the same Series Instance UID as the axial images. Such images are left out of
the series (counted, with the reason) rather than the whole series being skipped, as long as
what remains still qualifies. Leaving an image out never hides a gap: the volume stage refuses
irregular slice spacing (naming the gaps in mm), so a dropped image that was really a slice of
the stack still stops that series.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
import pydicom
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset

from radfusion.errors import RadfusionError
from radfusion.logs import uid_tag
from radfusion.operators.ct_headers import (
    axial_angle,
    frame_count,
    functional_value,
    image_type,
    numbers,
    orientation,
    pixel_spacing,
)
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.series_names import (
    convolution_kernel,
    kernel_class,
    mm_text,
    series_label,
    series_name,
    series_number,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "PREFERENCES",
    "NoSeriesQualifies",
    "Preference",
    "SelectionRule",
    "SeriesCandidate",
    "SeriesSelection",
    "SeriesSelectorOperator",
    "SkippedSeries",
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

Preference = Literal["thinnest", "thickest", "soft_kernel", "sharp_kernel"]
PREFERENCES: tuple[Preference, ...] = get_args(Preference)


class _RuleSettings(Protocol):
    """What :meth:`SelectionRule.from_settings` reads (``apps.lung_ct`` in the configuration).

    Read-only properties, so that a settings object may narrow them (a list for the sequence).
    """

    @property
    def min_z_coverage_mm(self) -> float: ...
    @property
    def max_slice_spacing_mm(self) -> float: ...
    @property
    def reconstruction_preference(self) -> Sequence[Preference]: ...
    @property
    def fallback_to_other_reconstructions(self) -> bool: ...


@dataclass(frozen=True)
class SelectionRule:
    """Which series qualify for analysis, and which of several reconstructions of one
    acquisition is analysed.

    A series qualifies when its slices cover at least ``min_z_coverage_mm`` along the slice
    normal (first to last slice position plus one slice spacing: 30 slices 8 mm apart cover
    240 mm) and lie at most ``max_slice_spacing_mm`` apart (the median spacing; irregular
    spacing is refused by the volume stage). ``reconstruction_preference`` orders the
    reconstructions of one acquisition, first criterion first: ``thinnest`` / ``thickest``
    (Slice Thickness, else the slice spacing), ``soft_kernel`` / ``sharp_kernel`` (see
    :func:`kernel_class`; an unknown kernel ranks between the two). The one it prefers is
    analysed; the others are skipped, or, with ``fallback_to_other_reconstructions``, kept as
    candidates to try when the preferred one cannot be assembled.

    Raises:
        ValueError: a limit that is not a positive number, or a preference list that is empty,
            repeats a criterion or names an unknown one.
    """

    min_z_coverage_mm: float = 150.0
    max_slice_spacing_mm: float = 10.0
    reconstruction_preference: tuple[Preference, ...] = ("thinnest", "soft_kernel")
    fallback_to_other_reconstructions: bool = False

    def __post_init__(self) -> None:
        for name in ("min_z_coverage_mm", "max_slice_spacing_mm"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a positive number of mm, not {value!r}")
        preference = tuple(self.reconstruction_preference)
        object.__setattr__(self, "reconstruction_preference", preference)
        unknown = [p for p in preference if p not in PREFERENCES]
        if not preference or unknown or len(set(preference)) != len(preference):
            raise ValueError(
                f"reconstruction_preference: {list(preference)!r} must list some of "
                f"{', '.join(PREFERENCES)}, each at most once"
            )

    @classmethod
    def from_settings(cls, settings: _RuleSettings) -> SelectionRule:
        """The rule of the ``apps.lung_ct`` configuration section (fields of the same names).

        Raises:
            ValueError: as the constructor.
        """
        return cls(
            min_z_coverage_mm=settings.min_z_coverage_mm,
            max_slice_spacing_mm=settings.max_slice_spacing_mm,
            reconstruction_preference=tuple(settings.reconstruction_preference),
            fallback_to_other_reconstructions=settings.fallback_to_other_reconstructions,
        )


@dataclass(frozen=True)
class SeriesCandidate:
    """A series that qualifies for processing, with the images to use.

    ``files`` and ``headers`` hold only the images kept (in the order they came); ``dropped``
    counts the images left out of the series, by reason. ``z_coverage_mm`` and
    ``slice_spacing_mm`` are the stack's coverage and median slice spacing (see
    :class:`SelectionRule`; None for a candidate made elsewhere), ``z_extent_mm`` the lowest
    and highest patient z of its slice centres (to tell reconstructions of one acquisition).
    """

    SeriesInstanceUID: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    slices: int
    dropped: tuple[tuple[str, int], ...] = ()  # (reason, number of images)
    SeriesNumber: int | None = None
    z_coverage_mm: float | None = None
    slice_spacing_mm: float | None = None
    z_extent_mm: tuple[float, float] | None = None

    @property
    def label(self) -> str:
        """The series as logs and reports name it, without its UID: ``series 3 (120 slices)``
        (a hashed tag stands in for a missing Series Number)."""
        number = self.SeriesNumber
        name = number if number is not None else uid_tag(self.SeriesInstanceUID)
        return f"series {name} ({self.slices} slices)"

    @property
    def name(self) -> str:
        """The series by number, description and kernel (see :func:`series_name`)."""
        return series_name(self.headers[0], self.SeriesInstanceUID)

    @property
    def ConvolutionKernel(self) -> str:
        """The kernel the images were reconstructed with (the first value); "" if not stated."""
        return convolution_kernel(self.headers[0])

    @property
    def SliceThickness(self) -> float | None:
        """Slice Thickness (mm) of the images; None when not stated or not a positive number."""
        value = numbers(
            functional_value(self.headers[0], "SliceThickness", "PixelMeasuresSequence"), 1
        )
        return float(value[0]) if value is not None and value[0] > 0 else None

    @property
    def FrameOfReferenceUID(self) -> str:
        return str(self.headers[0].get("FrameOfReferenceUID", "") or "")

    def describe(self) -> str:
        """The series with what the reconstruction preference looks at:
        ``series 2 (1.25 mm, STANDARD, soft kernel)``."""
        thickness = _thickness(self)
        parts = [f"{mm_text(thickness)} mm"] if thickness is not None else []
        kernel = self.ConvolutionKernel
        parts += [kernel, f"{kernel_class(self.headers[0])} kernel"] if kernel else ["no kernel"]
        return f"{series_label(self.SeriesNumber, self.SeriesInstanceUID)} ({', '.join(parts)})"


@dataclass(frozen=True)
class SkippedSeries:
    """A series that is not analysed: ``name`` (:func:`series_name`, never the UID in clear)
    and ``reason``, with values (``z coverage 90 mm < 150 mm ...``)."""

    SeriesInstanceUID: str
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass(frozen=True)
class SeriesSelection:
    """The series of a study the app could use, in preference order, and why every other
    series was not.

    ``choice`` says in a sentence why the preferred series comes first (for logs and reports).
    With no ``candidates`` the study is refused: ``skipped`` says why for every series and
    ``evidence`` holds the images of the series that came closest to qualifying (one study),
    for a refusal report to reference.

    Raises:
        ValueError: neither candidates nor evidence, or both (a study with no images has no
            selection: ``None``).
    """

    candidates: tuple[SeriesCandidate, ...]  # best first; empty: nothing qualifies
    skipped: tuple[SkippedSeries, ...] = ()
    choice: str = ""
    evidence: tuple[Dataset, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if bool(self.candidates) == bool(self.evidence):
            raise ValueError(
                "candidates: a selection needs at least one series, or (a refusal) none and "
                "evidence images to reference"
            )

    @property
    def refused(self) -> bool:
        """True when no series qualifies (the study is not analysed)."""
        return not self.candidates

    @property
    def preferred(self) -> SeriesCandidate:
        """The series to try first.

        Raises:
            ValueError: the selection is a refusal (no candidates).
        """
        if not self.candidates:
            raise ValueError("no series qualifies: the selection has no preferred series")
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

    def reasons(self) -> list[str]:
        """Each skipped series with its reason, ``series 3 (...): ...``, in the order seen."""
        return [str(s) for s in self.skipped]


class NoSeriesQualifies(RadfusionError):
    """No series of a study qualifies for analysis. ``reasons`` names each series and why
    (empty when there were no images at all); ``written`` holds the refusal report, if one was
    written."""

    def __init__(self, selection: SeriesSelection | None, written: Sequence[Path] = ()) -> None:
        self.reasons: tuple[str, ...] = tuple(selection.reasons()) if selection else ()
        self.written: tuple[Path, ...] = tuple(written)
        lines = self.reasons or ("no DICOM image could be read",)
        super().__init__("no series qualifies for analysis: " + "; ".join(lines))


def read_headers(files: Iterable[Path]) -> list[tuple[Path, Dataset]]:
    """Read each file's header (no pixel data); unreadable files are logged and skipped."""
    out: list[tuple[Path, Dataset]] = []
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


def _image_problem(ds: Dataset) -> str | None:
    """Why this image cannot be a slice of an axial CT volume; None when it can."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality != "CT":
        return f"modality {modality or 'missing'}, not CT"
    if str(ds.get("SOPClassUID", "")) not in _CT_CLASSES:
        return NOT_CT_STORAGE
    if not str(ds.get("SOPInstanceUID", "") or ""):
        return "no SOP Instance UID"  # the results could not reference it
    if "LOCALIZER" in image_type(ds):
        return LOCALIZER
    if ds.get("Rows") is None or ds.get("Columns") is None:
        return "no image pixel data"
    iop = orientation(ds)
    if iop is None:
        return "no valid Image Orientation (Patient)"
    angle = axial_angle(iop)
    if angle > _AXIAL_TOLERANCE_DEG:
        return f"not axial (slice normal {angle:.0f} degrees from the patient's long axis)"
    single_frame = frame_count(ds) == 1 and "PerFrameFunctionalGroupsSequence" not in ds
    if single_frame and numbers(ds.get("ImagePositionPatient"), 3) is None:
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
    iop = orientation(ds)
    assert iop is not None  # checked by _image_problem
    try:
        matrix = (int(ds.Rows), int(ds.Columns))
    except (TypeError, ValueError):
        matrix = (0, 0)
    return _Geometry(iop, matrix, pixel_spacing(ds))


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
        return sum(frame_count(ds) for _, (_, ds) in members)

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


# -- one series ------------------------------------------------------------------------------


def _counted(reasons: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """Reasons with their number of images, most frequent first."""
    return tuple(Counter(reasons).most_common())


@dataclass(frozen=True)
class _Refusal:
    """Why a series does not qualify, how close it came (stage reached, slices) and the images
    a refusal report may reference from it."""

    reason: str
    closeness: tuple[int, int]
    images: tuple[Dataset, ...]


def _slice_positions(ds: Dataset) -> list[np.ndarray] | None:
    """Image Position (Patient) of each slice an image contributes (Enhanced CT: per frame);
    None when one is missing."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        positions = []
        for item in per_frame:
            plane = item.get("PlanePositionSequence")
            position = numbers(plane[0].get("ImagePositionPatient") if plane else None, 3)
            if position is None:
                return None
            positions.append(position)
        return positions
    if frame_count(ds) > 1:
        return None  # several frames, one position: the volume stage could not place them
    position = numbers(ds.get("ImagePositionPatient"), 3)
    return None if position is None else [position]


def _extent(kept: Sequence[Item]) -> tuple[float, float | None, tuple[float, float]] | str:
    """z coverage and median slice spacing (mm, along the slice normal; spacing None for one
    slice) and the patient z range of the slice centres; or why they cannot be known."""
    iop = orientation(kept[0][1])
    assert iop is not None  # checked by _image_problem
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    positions: list[np.ndarray] = []
    for _, ds in kept:
        found = _slice_positions(ds)
        if found is None:
            return "no valid Image Position (Patient) for every frame"
        positions.extend(found)
    # Distinct positions: a slice sent twice under two SOP Instance UIDs covers nothing more
    # (the volume stage refuses the duplicate).
    along = np.unique(np.round([float(p @ normal) for p in positions], 3))
    z = [float(p[2]) for p in positions]
    if len(along) < 2:
        thickness = numbers(
            functional_value(kept[0][1], "SliceThickness", "PixelMeasuresSequence"), 1
        )
        covered = float(thickness[0]) if thickness is not None and thickness[0] > 0 else 0.0
        return covered, None, (min(z), max(z))
    spacing = float(np.median(np.diff(along)))
    return float(along[-1] - along[0]) + spacing, spacing, (min(z), max(z))


def _candidate(uid: str, items: Sequence[Item], rule: SelectionRule) -> SeriesCandidate | _Refusal:
    """The usable part of one series, or why the series is skipped."""
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
        # a dose report, a sagittal reformat ...); of such series, one with more CT images
        # came closer (a refusal report references it rather than a dose report).
        ct = sum(str(ds.get("SOPClassUID", "")) in _CT_CLASSES for _, ds in items)
        return _Refusal(_counted(dropped)[0][0], (0, ct), tuple(ds for _, ds in items))
    stack = _main_stack(usable)
    if isinstance(stack, str):
        return _Refusal(stack, (1, len(usable)), tuple(ds for _, ds in usable))
    kept, strays = stack
    dropped.extend(strays)
    slices = sum(frame_count(ds) for _, ds in kept)
    left_out = f" after leaving out {len(dropped)} image(s)" if dropped else ""
    extent = _extent(kept)
    if isinstance(extent, str):
        return _Refusal(extent + left_out, (1, slices), tuple(ds for _, ds in kept))
    coverage, spacing, z_range = extent
    problems = []
    # Within the geometry tolerance: 60 slices 2.5 mm apart cover 150 mm, rounding or not.
    if coverage < rule.min_z_coverage_mm - _GEOMETRY_TOLERANCE:
        apart = f" {mm_text(spacing)} mm apart" if spacing is not None else ""
        problems.append(
            f"z coverage {mm_text(coverage)} mm < {mm_text(rule.min_z_coverage_mm)} mm "
            f"({slices} slice(s){apart})"
        )
    if spacing is not None and spacing > rule.max_slice_spacing_mm + _GEOMETRY_TOLERANCE:
        problems.append(
            f"slice spacing {mm_text(spacing)} mm > {mm_text(rule.max_slice_spacing_mm)} mm"
        )
    if problems:
        return _Refusal("; ".join(problems) + left_out, (2, slices), tuple(ds for _, ds in kept))
    candidate = SeriesCandidate(
        uid,
        tuple(p for p, _ in kept),
        tuple(ds for _, ds in kept),
        slices,
        _counted(dropped),
        series_number(kept[0][1]),
        z_coverage_mm=coverage,
        slice_spacing_mm=spacing,
        z_extent_mm=z_range,
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


# -- several series --------------------------------------------------------------------------

_KERNEL_SCORE = {"soft": 1, "unknown": 0, "sharp": -1}
_SUPERLATIVE = {
    "thinnest": "thinnest",
    "thickest": "thickest",
    "soft_kernel": "softest-kernel",
    "sharp_kernel": "sharpest-kernel",
    "z_coverage": "widest-coverage",
    "slices": "most-sliced",
    "uid": "first by Series Instance UID",
}


def _thickness(candidate: SeriesCandidate) -> float | None:
    """Slice Thickness, else the slice spacing (thin and thick are about the reconstruction)."""
    thickness = candidate.SliceThickness
    return thickness if thickness is not None else candidate.slice_spacing_mm


def _score(candidate: SeriesCandidate, criterion: str) -> float:
    """How well a candidate meets a criterion: higher is preferred."""
    if criterion in ("thinnest", "thickest"):
        thickness = _thickness(candidate)
        if thickness is None:
            return -math.inf  # unknown thickness: last either way
        return round(-thickness if criterion == "thinnest" else thickness, 2)
    if criterion in ("soft_kernel", "sharp_kernel"):
        score = _KERNEL_SCORE[kernel_class(candidate.headers[0])]
        return score if criterion == "soft_kernel" else -score
    if criterion == "z_coverage":
        return round(candidate.z_coverage_mm or 0.0, 1)
    return candidate.slices


def _rank(candidate: SeriesCandidate, rule: SelectionRule) -> tuple[object, ...]:
    """Sort key, higher first: the rule's criteria, then z coverage, slices, UID."""
    criteria = (*rule.reconstruction_preference, "z_coverage", "slices")
    return (*(_score(candidate, c) for c in criteria), candidate.SeriesInstanceUID)


def _decided_by(a: SeriesCandidate, b: SeriesCandidate, rule: SelectionRule) -> str:
    """The first criterion that puts ``a`` before ``b``."""
    for criterion in (*rule.reconstruction_preference, "z_coverage", "slices"):
        if _score(a, criterion) != _score(b, criterion):
            return criterion
    return "uid"


def _why(a: SeriesCandidate, b: SeriesCandidate, criterion: str) -> str:
    """Why ``a`` comes before ``b``, with the values: ``thinner slices, 1.25 mm vs 5 mm``."""

    def thickness(c: SeriesCandidate) -> str:
        value = _thickness(c)
        return f"{mm_text(value)} mm" if value is not None else "not stated"

    def kernel(c: SeriesCandidate) -> str:
        name = c.ConvolutionKernel or "no kernel"
        return f"{name} ({kernel_class(c.headers[0])})"

    if criterion in ("thinnest", "thickest"):
        which = "thinner" if criterion == "thinnest" else "thicker"
        return f"{which} slices, {thickness(a)} vs {thickness(b)}"
    if criterion in ("soft_kernel", "sharp_kernel"):
        which = "softer" if criterion == "soft_kernel" else "sharper"
        return f"{which} kernel, {kernel(a)} vs {kernel(b)}"
    if criterion == "z_coverage":
        ours, theirs = mm_text(a.z_coverage_mm or 0), mm_text(b.z_coverage_mm or 0)
        return f"more z coverage, {ours} mm vs {theirs} mm"
    if criterion == "slices":
        return f"more slices, {a.slices} vs {b.slices}"
    return "equally preferred, first by Series Instance UID"


def _other_reconstruction(a: SeriesCandidate, b: SeriesCandidate) -> bool:
    """Whether two series are reconstructions of one acquisition: the same Frame of Reference,
    slice centres overlapping along z for at least half the shorter series, and another kernel
    or slice thickness (copies alike in both stay separate candidates: fallbacks)."""
    if not a.FrameOfReferenceUID or a.FrameOfReferenceUID != b.FrameOfReferenceUID:
        return False
    if a.z_extent_mm is None or b.z_extent_mm is None:
        return False
    (a_low, a_high), (b_low, b_high) = a.z_extent_mm, b.z_extent_mm
    overlap = min(a_high, b_high) - max(a_low, b_low)
    if overlap < 0.5 * min(a_high - a_low, b_high - b_low):
        return False
    # A kernel not stated is no evidence of another reconstruction.
    kernels = {c.ConvolutionKernel.casefold() for c in (a, b) if c.ConvolutionKernel}
    return _score(a, "thinnest") != _score(b, "thinnest") or len(kernels) == 2


def _one_per_acquisition(
    ordered: Sequence[SeriesCandidate], rule: SelectionRule
) -> tuple[list[SeriesCandidate], list[SkippedSeries], dict[str, list[str]]]:
    """The candidates to keep (in order), the other reconstructions skipped, and for each kept
    series the criteria that put it before its other reconstructions."""
    kept: list[SeriesCandidate] = []
    skipped: list[SkippedSeries] = []
    beaten: dict[str, list[str]] = {}
    for candidate in ordered:
        chosen = next((k for k in kept if _other_reconstruction(k, candidate)), None)
        if chosen is None:
            kept.append(candidate)
            continue
        criterion = _decided_by(chosen, candidate, rule)
        beaten.setdefault(chosen.SeriesInstanceUID, []).append(criterion)
        if rule.fallback_to_other_reconstructions:
            kept.append(candidate)
            continue
        skipped.append(
            SkippedSeries(
                candidate.SeriesInstanceUID,
                candidate.name,
                "another reconstruction of the same acquisition was chosen ("
                f"{series_label(chosen.SeriesNumber, chosen.SeriesInstanceUID)}: "
                f"{_why(chosen, candidate, criterion)})",
            )
        )
    return kept, skipped, beaten


def _choice(
    kept: Sequence[SeriesCandidate], beaten: dict[str, list[str]], rule: SelectionRule
) -> str:
    """Why the first candidate is preferred, in a sentence."""
    first = kept[0]
    parts = []
    order = [*rule.reconstruction_preference, "z_coverage", "slices", "uid"]
    criteria = sorted(set(beaten.get(first.SeriesInstanceUID, [])), key=order.index)
    if criteria:
        adjectives = ", then ".join(_SUPERLATIVE[c] for c in criteria)
        count = len(beaten[first.SeriesInstanceUID]) + 1
        parts.append(f"{adjectives} of {count} reconstructions of one acquisition")
    if len(kept) > 1:
        parts.append(
            f"first of {len(kept)} qualifying series in preference order (the others are "
            "tried if it cannot be assembled)"
        )
    if not parts:
        parts.append("the only series that qualifies")
    spacing = first.slice_spacing_mm
    apart = f", slices {mm_text(spacing)} mm apart" if spacing is not None else ""
    coverage = f"z coverage {mm_text(first.z_coverage_mm or 0)} mm{apart}"
    return f"{first.describe()}: {'; '.join(parts)} ({coverage})"


def _evidence(refusals: Sequence[_Refusal]) -> tuple[Dataset, ...]:
    """The images of the series that came closest to qualifying, one study's, that a report
    can reference (Study, Series and SOP Instance UIDs and a SOP Class); () when none can be."""
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

    def closeness(refusal: _Refusal) -> tuple[tuple[int, int], str]:
        first = refusal.images[0] if refusal.images else Dataset()
        return refusal.closeness, str(first.get("SeriesInstanceUID", ""))  # ties: by UID

    for refusal in sorted(refusals, key=closeness, reverse=True):
        images = [ds for ds in refusal.images if all(ds.get(k) for k in keys)]
        if images:
            # The same images give the same report, whatever order the files came in.
            images.sort(key=lambda ds: (str(ds.StudyInstanceUID), _instance_order(ds)))
            study = images[0].StudyInstanceUID
            return tuple(ds for ds in images if ds.StudyInstanceUID == study)
    return ()


def _instance_order(ds: Dataset) -> tuple[int, str]:
    try:
        number = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = 0
    return number, str(ds.SOPInstanceUID)


def select_series(
    files: Iterable[tuple[Path, Dataset]], *, rule: SelectionRule | None = None
) -> SeriesSelection | None:
    """The CT series the app could process, best first, by ``rule`` (default
    :class:`SelectionRule()`); None when there is no image at all (or none a report could
    reference).

    Other reconstructions of a chosen acquisition are skipped (see :class:`SelectionRule`).
    Candidates are ordered by the rule's reconstruction preference, then z coverage, then number
    of slices, then Series Instance UID, so the order does not depend on the order the files
    came in. Every series not kept is logged and returned in ``skipped`` with its reason; when
    none qualifies, the selection has no candidates (a refusal) and references the images of
    the series that came closest.
    """
    rule = rule or SelectionRule()
    by_series: dict[str, list[Item]] = {}
    for path, ds in files:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((path, ds))
    candidates: list[SeriesCandidate] = []
    skipped: list[SkippedSeries] = []
    refusals: list[_Refusal] = []
    numbers = {uid: series_number(items[0][1]) for uid, items in by_series.items()}
    for uid, items in by_series.items():
        outcome = (
            _candidate(uid, items, rule)
            if uid
            else _Refusal("no Series Instance UID", (-1, len(items)), ())
        )
        if isinstance(outcome, SeriesCandidate):
            candidates.append(outcome)
        else:
            skipped.append(SkippedSeries(uid, series_name(items[0][1], uid), outcome.reason))
            refusals.append(outcome)
    candidates.sort(key=lambda c: _rank(c, rule), reverse=True)
    kept, reconstructions, beaten = _one_per_acquisition(candidates, rule)
    skipped.extend(reconstructions)
    # By Series Number (as a viewer lists them), not by the order the files came in.
    skipped.sort(
        key=lambda s: (
            numbers[s.SeriesInstanceUID] is None,
            numbers[s.SeriesInstanceUID] or 0,
            s.SeriesInstanceUID,
        )
    )
    for series in skipped:
        log.info(
            "%s [%s] skipped: %s", series.name, uid_tag(series.SeriesInstanceUID), series.reason
        )
    if kept:
        choice = _choice(kept, beaten, rule)
        log.info("chosen: %s", choice)
        return SeriesSelection(tuple(kept), tuple(skipped), choice)
    evidence = _evidence(refusals)
    if not evidence:
        if by_series:
            log.warning("no series qualifies, and no image could be referenced")
        return None
    log.warning("no series qualifies: %s", "; ".join(str(s) for s in skipped))
    return SeriesSelection((), tuple(skipped), evidence=evidence)


class SeriesSelectorOperator(Operator):
    """Input ``files`` (list of paths of one study) → output ``selection``
    (``SeriesSelection``; None when the study has no image, or when no series qualifies and
    ``report_refusals`` is False, so that nothing is written).

    ``rule`` is the :class:`SelectionRule` (default: its defaults).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        rule: SelectionRule | None = None,
        report_refusals: bool = True,
        **kw: object,
    ) -> None:
        self.rule = rule or SelectionRule()
        self.report_refusals = report_refusals
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("files")
        spec.output("selection")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        files = op_input.receive("files")
        selection = select_series(read_headers(files), rule=self.rule)
        if selection is not None and selection.refused and not self.report_refusals:
            selection = None
        op_output.emit(selection, "selection")
