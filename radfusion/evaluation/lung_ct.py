"""Evaluate the lung-ct app against reference annotations (``radfusion eval lung-ct``).

For every reference (LIDC reader XML or DICOM SEG) the CT series it annotates is found under
the input folder, the app is run once on that series alone, and its SEG is scored:

- a detection (one non-lung segment) is a *hit* when its centroid lies in a reference nodule's
  union mask or within that nodule's equivalent radius (of a sphere of the union's volume) of
  the union's centroid; each reference nodule takes at most one detection, the nearest;
- reference nodules that *count* are those marked by ≥ ``min_readers`` LIDC readers (any for a
  SEG reference) with a diameter ≥ ``min_diameter_mm``. A detection on a reference nodule that
  does not count is neither a hit nor a false positive (it is reported as ``ignored``, as in
  LUNA16); every other detection is a false positive;
- per hit: Dice of the detection against the consensus (≥ 50 % of readers) mask and the
  volume error (detection − consensus) / consensus;
- lung volumes (right, left, L; right/left ratio) of the app's SEG, and of the reference SEG's
  lungs with their Dice when it has lungs.

Results name series by a short hash of their UID (:func:`radfusion.logs.uid_tag`) and cases by
the reference file's name; never by patient data.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from radfusion.config import RadfusionConfig
from radfusion.errors import RadfusionError
from radfusion.evaluation.grid import (
    SEG_STORAGE,
    CtGrid,
    Mask,
    ReferenceMismatchError,
    ReferenceNodule,
    find_ct_series,
    kernel_class,
)
from radfusion.evaluation.lidc import is_lidc_xml, parse_lidc_xml, reference_nodules
from radfusion.evaluation.reference_seg import (
    is_seg,
    read_reference_seg,
    read_segments,
    seg_source_uids,
)
from radfusion.evaluation.synthetic import dice
from radfusion.logs import uid_tag

__all__ = [
    "CaseResult",
    "Evaluation",
    "LungVolumes",
    "Matching",
    "NoduleResult",
    "ReferenceFile",
    "UnmatchedReferenceError",
    "evaluate_lung_ct",
    "find_references",
    "format_report",
    "match_detections",
    "score_case",
]

Runner = Callable[[Path, Path, RadfusionConfig], list[Path]]


class UnmatchedReferenceError(RadfusionError, ValueError):
    """A reference names no CT series (or study) found under the input folder, or there are
    no references at all."""


@dataclass(frozen=True)
class ReferenceFile:
    """One reference file and the series/study it annotates."""

    path: Path
    kind: Literal["lidc-xml", "dicom-seg"]
    StudyInstanceUID: str | None
    SeriesInstanceUIDs: tuple[str, ...]


def find_references(reference: Path) -> list[ReferenceFile]:
    """The LIDC XML and DICOM SEG files at ``reference`` (a file, or a folder searched
    recursively; other files are skipped), sorted by path.

    Raises:
        UnmatchedReferenceError: ``reference`` is a file of neither kind, or holds none.
        LidcFormatError: a LidcReadMessage that cannot be parsed.
    """
    reference = Path(reference)
    paths = (
        sorted(p for p in reference.rglob("*") if p.is_file())
        if reference.is_dir()
        else [reference]
    )
    found = []
    for path in paths:
        if path.suffix.lower() == ".xml" and is_lidc_xml(path):
            read = parse_lidc_xml(path)
            series = (read.SeriesInstanceUID,) if read.SeriesInstanceUID else ()
            found.append(ReferenceFile(path, "lidc-xml", read.StudyInstanceUID, series))
        elif path.suffix.lower() != ".xml" and is_seg(path):
            study, series_uids = seg_source_uids(path)
            found.append(ReferenceFile(path, "dicom-seg", study or None, tuple(series_uids)))
    if not found:
        raise UnmatchedReferenceError(f"{reference}: no LIDC XML or DICOM SEG reference found")
    return found


def series_for(ref: ReferenceFile, series: dict[str, CtGrid]) -> CtGrid | None:
    """The CT series ``ref`` annotates: by SeriesInstanceUID, else the only CT series of its
    StudyInstanceUID; None when neither is there."""
    for uid in ref.SeriesInstanceUIDs:
        if uid in series:
            return series[uid]
    of_study = [g for g in series.values() if g.StudyInstanceUID == ref.StudyInstanceUID]
    return of_study[0] if len(of_study) == 1 else None


# -- matching and metrics (pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """Which detection matched which reference nodule (indices into the inputs)."""

    hits: tuple[tuple[int, int], ...]  # (detection, reference)
    false_positives: tuple[int, ...]
    ignored: tuple[int, ...]  # on a reference nodule that does not count
    missed: tuple[int, ...]  # counted reference nodules without a detection


def _hit_distance(point: np.ndarray, ref: ReferenceNodule, spacing: np.ndarray) -> float | None:
    """mm from ``point`` (k, r, c) to the nodule's centre when it is a hit, else None."""
    if not ref.union.voxels:
        return None
    centre = ref.union.centroid()
    distance = float(np.linalg.norm((point - centre) * spacing))
    radius = (3.0 * ref.union.voxels * float(np.prod(spacing)) / (4.0 * math.pi)) ** (1 / 3)
    return distance if ref.union.contains(point) or distance <= radius else None


def match_detections(
    detections: Sequence[Mask],
    references: Sequence[ReferenceNodule],
    counted: Sequence[bool],
    spacing_mm: tuple[float, float, float],
) -> Matching:
    """Match detections to reference nodules (see the module's rules); ``counted[i]`` says
    whether ``references[i]`` is in the reference set. Nearest pairs are matched first."""
    spacing = np.asarray(spacing_mm, dtype=float)
    centroids = [d.centroid() if d.voxels else None for d in detections]
    pairs = []
    for i, point in enumerate(centroids):
        if point is None:
            continue
        for j, ref in enumerate(references):
            distance = _hit_distance(point, ref, spacing)
            if distance is not None:
                pairs.append((not counted[j], distance, i, j))
    pairs.sort()
    used_d: set[int] = set()
    used_r: set[int] = set()
    hits = []
    ignored = set()
    for uncounted, _distance, i, j in pairs:
        if i in used_d:
            continue
        if uncounted:
            ignored.add(i)
            used_d.add(i)
        elif j not in used_r:
            hits.append((i, j))
            used_d.add(i)
            used_r.add(j)
    fps = tuple(i for i, c in enumerate(centroids) if c is not None and i not in used_d)
    missed = tuple(j for j, c in enumerate(counted) if c and j not in used_r)
    return Matching(tuple(sorted(hits)), fps, tuple(sorted(ignored)), missed)


@dataclass(frozen=True)
class NoduleResult:
    """One counted reference nodule and the detection that matched it (if any)."""

    reference: str
    readers: int | None
    diameter_mm: float
    diameter_source: str
    reference_ml: float
    detection: str | None = None
    found_ml: float | None = None
    dice: float | None = None
    volume_error_pct: float | None = None


@dataclass(frozen=True)
class LungVolumes:
    """Lung volumes in litres (None where the SEG has no such lung)."""

    right_l: float | None
    left_l: float | None

    @property
    def ratio(self) -> float | None:
        """Right / left volume (about 1.1-1.2 in healthy adults: the right lung is larger)."""
        if not self.right_l or not self.left_l:
            return None
        return self.right_l / self.left_l


@dataclass
class CaseResult:
    """One reference scored against the app's SEG for its series."""

    case: str  # the reference file's name
    reference_kind: str
    series: str  # uid_tag of the SeriesInstanceUID
    kernel: str  # soft / sharp / unknown
    convolution_kernel: str
    slice_thickness_mm: float | None
    slices: int
    reference_nodules: int = 0  # counted
    found: int = 0
    false_positives: int = 0
    ignored: int = 0
    detections: int = 0
    nodules: list[NoduleResult] = field(default_factory=list)
    lungs: LungVolumes = field(default_factory=lambda: LungVolumes(None, None))
    reference_lungs: LungVolumes | None = None
    lung_dice: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _lungs(masks: dict[str, Mask], voxel_ml: float) -> LungVolumes:
    def litres(side: str) -> float | None:
        return masks[side].voxels * voxel_ml / 1000.0 if side in masks else None

    return LungVolumes(litres("right"), litres("left"))


def score_case(
    case: CaseResult,
    grid: CtGrid,
    references: Sequence[ReferenceNodule],
    detections: Sequence[tuple[str, Mask]],
    lungs: dict[str, Mask],
    *,
    min_readers: int,
    min_diameter_mm: float,
    reference_lungs: dict[str, Mask] | None = None,
) -> CaseResult:
    """Fill ``case`` from the references and the app's segments (both on ``grid``)."""
    counted = [
        r.counts(min_readers=min_readers, min_diameter_mm=min_diameter_mm) for r in references
    ]
    matching = match_detections([m for _, m in detections], references, counted, grid.spacing_mm)
    by_ref = {j: i for i, j in matching.hits}
    case.nodules = []
    for j, ref in enumerate(references):
        if not counted[j]:
            continue
        result = NoduleResult(
            ref.label, ref.readers, ref.diameter_mm, ref.diameter_source, ref.volume_ml
        )
        if j in by_ref:
            label, mask = detections[by_ref[j]]
            truth = ref.consensus if ref.consensus.voxels else ref.union
            found_ml = mask.voxels * grid.voxel_ml
            result = replace(
                result,
                detection=label,
                found_ml=found_ml,
                dice=dice(truth.full(), mask.full()),
                volume_error_pct=100.0 * (found_ml - ref.volume_ml) / ref.volume_ml,
            )
        case.nodules.append(result)
    case.reference_nodules = sum(counted)
    case.found = len(matching.hits)
    case.false_positives = len(matching.false_positives)
    case.ignored = len(matching.ignored)
    case.detections = len(detections)
    case.lungs = _lungs(lungs, grid.voxel_ml)
    if reference_lungs:
        case.reference_lungs = _lungs(reference_lungs, grid.voxel_ml)
        case.lung_dice = {
            side: dice(reference_lungs[side].full(), lungs[side].full()) if side in lungs else 0.0
            for side in sorted(reference_lungs)
        }
    return case


# -- running ------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """All cases, with the settings they were scored under."""

    min_diameter_mm: float
    min_readers: int
    cases: list[CaseResult]

    def summary(self, cases: Sequence[CaseResult] | None = None) -> dict[str, Any]:
        """Totals over ``cases`` (default: all that ran without error)."""
        done = [c for c in (self.cases if cases is None else cases) if c.error is None]
        # Dice and volume error are set together (a reference nodule that was hit).
        dices = [n.dice for c in done for n in c.nodules if n.dice is not None]
        volume_errors = [
            abs(n.volume_error_pct)
            for c in done
            for n in c.nodules
            if n.dice is not None and n.volume_error_pct is not None
        ]
        reference = sum(c.reference_nodules for c in done)
        found = sum(c.found for c in done)
        fps = sum(c.false_positives for c in done)
        return {
            "cases": len(done),
            "reference_nodules": reference,
            "found": found,
            "sensitivity": found / reference if reference else None,
            "false_positives": fps,
            "false_positives_per_scan": fps / len(done) if done else None,
            "ignored": sum(c.ignored for c in done),
            "mean_dice": statistics.fmean(dices) if dices else None,
            "mean_abs_volume_error_pct": (
                statistics.fmean(volume_errors) if volume_errors else None
            ),
        }

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (stable keys; see :func:`format_report` for text)."""
        kernels = sorted({c.kernel for c in self.cases})
        return {
            "settings": {"min_diameter_mm": self.min_diameter_mm, "min_readers": self.min_readers},
            "overall": self.summary(),
            "by_kernel": {
                k: self.summary([c for c in self.cases if c.kernel == k]) for k in kernels
            },
            "cases": [_case_json(c) for c in self.cases],
            "errors": sum(1 for c in self.cases if c.error is not None),
        }


def _lungs_json(lungs: LungVolumes | None) -> dict[str, float | None] | None:
    if lungs is None:
        return None
    return {"right_l": lungs.right_l, "left_l": lungs.left_l, "right_left_ratio": lungs.ratio}


def _case_json(c: CaseResult) -> dict[str, Any]:
    return {
        "case": c.case,
        "reference_kind": c.reference_kind,
        "series": c.series,
        "kernel": c.kernel,
        "convolution_kernel": c.convolution_kernel,
        "slice_thickness_mm": c.slice_thickness_mm,
        "slices": c.slices,
        "reference_nodules": c.reference_nodules,
        "found": c.found,
        "false_positives": c.false_positives,
        "ignored": c.ignored,
        "detections": c.detections,
        "nodules": [
            {
                "reference": n.reference,
                "readers": n.readers,
                "diameter_mm": n.diameter_mm,
                "diameter_source": n.diameter_source,
                "reference_ml": n.reference_ml,
                "detection": n.detection,
                "found_ml": n.found_ml,
                "dice": n.dice,
                "volume_error_pct": n.volume_error_pct,
            }
            for n in c.nodules
        ],
        "lungs": _lungs_json(c.lungs),
        "reference_lungs": _lungs_json(c.reference_lungs),
        "lung_dice": c.lung_dice,
        "error": c.error,
    }


def _app_segments(
    written: Sequence[Path], grid: CtGrid
) -> tuple[list[tuple[str, Mask]], dict[str, Mask]]:
    """The app's detections and lungs; none when it wrote no SEG (nothing found)."""
    import pydicom

    detections: list[tuple[str, Mask]] = []
    lungs: dict[str, Mask] = {}
    for path in written:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        if str(ds.get("SOPClassUID", "")) != SEG_STORAGE:
            continue
        for segment in read_segments(path, grid):
            if segment.kind == "lung" and segment.side is not None:
                lungs[segment.side] = segment.mask
            elif segment.kind == "lesion" and segment.mask.voxels:
                detections.append((segment.label, segment.mask))
    return detections, lungs


def _run_on_series(grid: CtGrid, work: Path, config: RadfusionConfig, run: Runner) -> list[Path]:
    """Run the app on this series alone (linked into its own folder), so that the app cannot
    choose another series of the study."""
    tag = uid_tag(grid.SeriesInstanceUID)
    source = work / tag / "input"
    source.mkdir(parents=True)
    for i, f in enumerate(grid.files):
        (source / f"{i:05d}.dcm").symlink_to(Path(f).resolve())
    return run(source, work / tag / "output", config)


def evaluate_lung_ct(
    input_dir: Path,
    reference: Path,
    config: RadfusionConfig,
    *,
    min_diameter_mm: float = 10.0,
    min_readers: int = 2,
    run: Runner | None = None,
    progress: Callable[[CaseResult], None] | None = None,
) -> Evaluation:
    """Run the app on each referenced series under ``input_dir`` and score it.

    ``run`` defaults to :func:`radfusion.apps.lung_ct.app.run_folder` (tests pass another).
    An app failure or a reference that does not fit its series is recorded in that case's
    ``error``; the other cases go on.

    Raises:
        UnmatchedReferenceError: no references, or a reference whose series/study is not under
            ``input_dir`` (all such are named).
        LidcFormatError: an unreadable LidcReadMessage.
    """
    refs = find_references(reference)
    series = find_ct_series(input_dir)
    placed = [(ref, series_for(ref, series)) for ref in refs]
    unmatched = [ref for ref, grid in placed if grid is None]
    if unmatched:
        names = ", ".join(
            f"{r.path.name} (series {', '.join(uid_tag(u) for u in r.SeriesInstanceUIDs) or '-'})"
            for r in unmatched
        )
        raise UnmatchedReferenceError(
            f"{len(unmatched)} reference(s) match no CT series or study under {input_dir}: {names}"
        )
    if run is None:
        from radfusion.apps.lung_ct.app import run_folder

        run = run_folder
    cases = []
    written_by_series: dict[str, list[Path] | Exception] = {}
    with tempfile.TemporaryDirectory(prefix="radfusion-eval-") as tmp:
        for ref, grid in placed:
            assert grid is not None
            case = CaseResult(
                case=ref.path.name,
                reference_kind=ref.kind,
                series=uid_tag(grid.SeriesInstanceUID),
                kernel=kernel_class(grid.ConvolutionKernel),
                convolution_kernel=grid.ConvolutionKernel,
                slice_thickness_mm=grid.SliceThickness,
                slices=len(grid.sop_uids),
            )
            uid = grid.SeriesInstanceUID
            if uid not in written_by_series:
                try:
                    written_by_series[uid] = _run_on_series(grid, Path(tmp), config, run)
                except Exception as err:  # the app's failure is this case's result
                    written_by_series[uid] = err
            written = written_by_series[uid]
            try:
                if isinstance(written, Exception):
                    raise written
                detections, lungs = _app_segments(written, grid)
                reference_lungs = None
                if ref.kind == "lidc-xml":
                    nodules = reference_nodules(parse_lidc_xml(ref.path), grid)
                else:
                    seg_ref = read_reference_seg(ref.path, grid)
                    nodules, reference_lungs = list(seg_ref.nodules), seg_ref.lungs
                score_case(
                    case,
                    grid,
                    nodules,
                    detections,
                    lungs,
                    min_readers=min_readers,
                    min_diameter_mm=min_diameter_mm,
                    reference_lungs=reference_lungs,
                )
            except ReferenceMismatchError as err:
                case.error = f"reference does not fit its series: {err}"
            except Exception as err:
                # Named by type and message; app errors name files and UIDs, not patients.
                case.error = f"{type(err).__name__}: {err}"
            cases.append(case)
            if progress is not None:
                progress(case)
    return Evaluation(min_diameter_mm, min_readers, cases)


# -- text report --------------------------------------------------------------------------------


def _f(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def format_case(c: CaseResult) -> list[str]:
    """The lines of one case in the text report."""
    head = (
        f"{c.case} [{c.reference_kind}] series {c.series}: {c.slices} slices, "
        f"{_f(c.slice_thickness_mm, '.2g', ' mm')}, kernel {c.convolution_kernel or '-'} "
        f"({c.kernel})"
    )
    if c.error is not None:
        return [head, f"  ERROR: {c.error}"]
    lines = [
        head,
        f"  nodules found {c.found}/{c.reference_nodules}, false positives {c.false_positives}"
        f" (of {c.detections} detections; {c.ignored} on reference findings that do not count)",
    ]
    for n in c.nodules:
        readers = "SEG" if n.readers is None else f"{n.readers} readers"
        what = (
            f"hit by {n.detection}: Dice {n.dice:.3f}, {n.found_ml:.2f} mL, "
            f"volume error {n.volume_error_pct:+.1f} %"
            if n.detection is not None
            else "MISSED"
        )
        lines.append(
            f"    {n.reference} ({readers}, {n.diameter_mm:.1f} mm {n.diameter_source}, "
            f"{n.reference_ml:.2f} mL): {what}"
        )
    lung = c.lungs
    lines.append(
        f"  lungs: right {_f(lung.right_l, '.2f', ' L')}, left {_f(lung.left_l, '.2f', ' L')}, "
        f"right/left {_f(lung.ratio, '.2f')}"
    )
    if c.reference_lungs is not None:
        ref = c.reference_lungs
        dices = ", ".join(f"{s} {d:.3f}" for s, d in c.lung_dice.items())
        lines.append(
            f"  reference lungs: right {_f(ref.right_l, '.2f', ' L')}, "
            f"left {_f(ref.left_l, '.2f', ' L')}; Dice {dices or '-'}"
        )
    return lines


def _summary_line(name: str, s: dict[str, Any]) -> str:
    return (
        f"  {name:<10} cases {s['cases']}, found {s['found']}/{s['reference_nodules']} "
        f"(sensitivity {_f(s['sensitivity'], '.2f')}), FP/scan "
        f"{_f(s['false_positives_per_scan'], '.1f')}, mean Dice {_f(s['mean_dice'], '.3f')}, "
        f"mean |volume error| {_f(s['mean_abs_volume_error_pct'], '.1f', ' %')}"
    )


def format_report(evaluation: Evaluation) -> str:
    """The report as text: per case, then overall and per kernel class."""
    data = evaluation.to_json()
    lines = [
        f"reference set: nodules ≥ {evaluation.min_diameter_mm:g} mm marked by ≥ "
        f"{evaluation.min_readers} readers (LIDC XML; a SEG's segments need only the diameter)"
    ]
    for c in evaluation.cases:
        lines.extend(format_case(c))
    lines.append("overall:")
    lines.append(_summary_line("all", data["overall"]))
    for kernel, s in data["by_kernel"].items():
        lines.append(_summary_line(kernel, s))
    if data["errors"]:
        lines.append(f"  {data['errors']} case(s) failed (see ERROR above)")
    return "\n".join(lines)
