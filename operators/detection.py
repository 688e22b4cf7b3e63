"""Detection: a CT volume (and the learned model's class map) → lungs and the nodules to report.

The lungs come from :mod:`radfusion.operators.lungs` (classical, checked for plausibility),
the nodule candidates from :mod:`radfusion.operators.nodules` (shape and density, with the
learned model's tumour class as one piece of evidence). This step applies the operating
point: candidates scoring at least ``min_score`` (those whose voxels touch merged into one
finding; a large one that the model mostly calls tumour takes its extent from the model, see
:func:`refine_by_model`), no smaller than the slices can resolve, at most ``max_findings``,
best first. What it decided and why goes into :attr:`Anatomy.statements` for the SR.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from scipy import ndimage

from radfusion.operators.lungs import LungFields, find_lung_fields
from radfusion.operators.nodules import (
    NoduleCandidate,
    NoduleScorer,
    TumourLookup,
    box_of,
    find_nodules,
)
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.segmentation_model import ClassMap
from radfusion.operators.volume import Volume

__all__ = [
    "Anatomy",
    "DetectionOperator",
    "DetectionSettings",
    "detect",
    "merge_touching",
    "refine_by_model",
]

log = logging.getLogger("radfusion.operators.detection")

TUMOUR_CLASS = 2  # the reference model's tumour channel (model.yaml labels)


@dataclass(frozen=True)
class DetectionSettings:
    """The operating point (``apps.lung_ct``).

    ``min_score``: candidates scoring lower are not reported. ``max_findings``: at most this
    many nodules, best first. ``min_diameter_mm``: smaller nodules are not reported; the
    slices raise it to twice the slice thickness (what they can resolve).

    Raises:
        ValueError: a value out of range.
    """

    min_score: float = 0.5
    max_findings: int = 10
    min_diameter_mm: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score: {self.min_score} is not in [0, 1]")
        if not 0 <= self.max_findings <= 250:  # segment numbers: 2 lungs + nodules <= 255
            raise ValueError(f"max_findings: {self.max_findings} is not in 0..250")
        if self.min_diameter_mm < 0:
            raise ValueError(f"min_diameter_mm: {self.min_diameter_mm} is negative")


@dataclass(frozen=True, eq=False)
class Anatomy:
    """What the detection found on one volume: the lung fields, the nodules to report (best
    first; none when the lungs are implausible) and sentences for the SR."""

    fields: LungFields
    nodules: tuple[NoduleCandidate, ...]
    statements: tuple[str, ...]
    candidates: int  # candidates examined, reported or not


def _tumour_lookup(classes: ClassMap | np.ndarray | None) -> TumourLookup | None:
    """The share of a candidate the model calls tumour: only the candidates' voxels are ever
    resolved from a :class:`ClassMap` (the whole map at source resolution costs 0.8 s)."""
    if classes is None:
        return None
    if isinstance(classes, ClassMap):
        return lambda box, mask: float((classes.at(box, mask) == TUMOUR_CLASS).mean())
    return lambda box, mask: float((classes[box][mask] == TUMOUR_CLASS).mean())


def slice_thickness_mm(volume: Volume) -> float:
    """The thicker of the reconstructed slice thickness (when stated) and the spacing."""
    stated = volume.source_images[0].get("SliceThickness") if volume.source_images else None
    try:
        thickness = float(stated) if stated not in (None, "") else 0.0
    except (TypeError, ValueError):
        thickness = 0.0
    return max(thickness, float(volume.spacing_mm[0]))


def detect(
    volume: Volume,
    classes: ClassMap | np.ndarray | None,
    settings: DetectionSettings,
    scorer: NoduleScorer,
) -> Anatomy:
    """Lungs and reportable nodules of ``volume``; ``classes`` is the learned model's class
    map (a :class:`ClassMap` or an array on the volume's grid; None when no model ran),
    ``scorer`` the false-positive stage.

    Raises:
        ValueError: ``classes`` does not have the volume's shape.
    """
    if classes is not None and tuple(classes.shape) != volume.hu.shape:
        raise ValueError(f"class map shape {classes.shape} != volume shape {volume.hu.shape}")
    fields = find_lung_fields(volume.hu, volume.spacing_mm, volume.affine)
    if not fields.found or fields.problems:
        return Anatomy(fields, (), (), 0)
    candidates = find_nodules(
        volume.hu, volume.spacing_mm, fields, scorer=scorer, model_tumour=_tumour_lookup(classes)
    )
    thickness = slice_thickness_mm(volume)
    smallest = max(settings.min_diameter_mm, 2.0 * thickness)
    scored = merge_touching(
        [c for c in candidates if c.score >= settings.min_score], volume.spacing_mm
    )
    if classes is not None:
        tumour_in = _tumour_in(classes)
        refined = [refine_by_model(c, tumour_in, volume.hu, volume.spacing_mm) for c in scored]
        # A finding the model grew may now reach another: one lesion, as above.
        scored = merge_touching(refined, volume.spacing_mm)
    reported = [c for c in scored if c.diameter_mm >= smallest]
    statements = []
    below = [c for c in scored if c.diameter_mm < smallest]
    if 2.0 * thickness > settings.min_diameter_mm:
        statements.append(
            f"Nodules under {smallest:.0f} mm (twice the {thickness:g} mm slice thickness) "
            f"cannot be measured reliably on this series and are not reported"
            + (f" ({len(below)} such candidate(s) seen)." if below else ".")
        )
    if len(reported) > settings.max_findings:
        statements.append(
            f"{len(reported)} nodule candidates reached the detection score "
            f"{settings.min_score:g}; the {settings.max_findings} highest are reported."
        )
        reported = reported[: settings.max_findings]
    if not reported:
        statements.append(
            f"No nodule found: no candidate reached the detection score {settings.min_score:g}."
        )
    log.info(
        "%d nodule candidate(s), %d reported (score >= %g, diameter >= %.1f mm)",
        len(candidates),
        len(reported),
        settings.min_score,
        smallest,
    )
    return Anatomy(fields, tuple(reported), tuple(statements), len(candidates))


Box = tuple[slice, slice, slice]


def _relative(box: Box, origin: Box) -> Box:
    """``box`` in the coordinates of a box starting at ``origin``'s starts."""
    k, r, c = (slice(s.start - o.start, s.stop - o.start) for s, o in zip(box, origin, strict=True))
    return k, r, c


def _touches(a: NoduleCandidate, b: NoduleCandidate) -> bool:
    """Whether a voxel of ``a`` shares a face with (or is) a voxel of ``b``."""
    k, r, c = (slice(max(0, s.start - 1), s.stop + 1) for s in a.box)
    grown = (k, r, c)
    k, r, c = (
        slice(max(g.start, o.start), min(g.stop, o.stop)) for g, o in zip(grown, b.box, strict=True)
    )
    meet = (k, r, c)
    if any(m.start >= m.stop for m in meet):
        return False
    around = np.zeros([g.stop - g.start for g in grown], dtype=bool)
    around[_relative(a.box, grown)] = a.mask
    around = ndimage.binary_dilation(around)
    return bool((around[_relative(meet, grown)] & b.mask[_relative(meet, b.box)]).any())


def _union(group: list[NoduleCandidate], spacing_mm: tuple[float, float, float]) -> NoduleCandidate:
    """One candidate of ``group`` (best first): the voxels of all, the best one's score,
    density and features, the diameter of the whole."""
    k, r, c = (
        slice(min(m.box[a].start for m in group), max(m.box[a].stop for m in group))
        for a in range(3)
    )
    box = (k, r, c)
    mask = np.zeros([s.stop - s.start for s in box], dtype=bool)
    for member in group:
        mask[_relative(member.box, box)] |= member.mask
    volume_mm3 = float(np.count_nonzero(mask)) * float(np.prod(spacing_mm))
    return replace(
        group[0],
        box=box,
        mask=mask,
        diameter_mm=float((6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0)),
    )


def merge_touching(
    candidates: list[NoduleCandidate], spacing_mm: tuple[float, float, float]
) -> list[NoduleCandidate]:
    """Candidates (best first) whose voxels touch, merged into the best of them: one lesion.

    A mass the two searches grew from different seeds comes back in adjoining pieces (a
    nodule-sized bulge beside the mass-sized body); reported apart they would be a lesion in
    several segments and false positives beside it. Applied to the candidates that reach the
    operating point only: a vessel scored below it must not join a nodule."""
    merged: list[NoduleCandidate] = []
    for candidate in candidates:
        touching = [i for i, kept in enumerate(merged) if _touches(candidate, kept)]
        if not touching:
            merged.append(candidate)
            continue
        merged[touching[0]] = _union([merged[i] for i in touching] + [candidate], spacing_mm)
        for i in reversed(touching[1:]):
            del merged[i]
    return merged


# The learned model's say on a large finding's extent (issue 16: masses against the hilum and
# mediastinum, where the detector's grown region follows the lung's outline, not the mass's).
# Chosen on development phantoms (256², one mass each, seeds 7300-7319; not an evaluation set)
# with a model trained on realistic phantoms: applied only where the model calls at least
# half of the finding tumour, as there it follows the mass; where it calls less it has missed
# the mass (sharp kernels), and trimming by it lost most of the mass.
_REFINE_MIN_DIAMETER_MM = 20.0
_REFINE_MIN_SHARE = 0.5
_REFINE_NEAR_MM = 3.0  # the finding's voxels kept: within this of the model's tumour
_REFINE_DENSE_HU = -500.0  # the model's tumour voxels added: denser than this


def refine_by_model(
    candidate: NoduleCandidate,
    tumour_in: Callable[[Box], np.ndarray],
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
) -> NoduleCandidate:
    """``candidate`` with its extent taken from the learned model where the model follows it.

    A finding of at least 20 mm of which the model calls at least half tumour keeps its voxels
    within 3 mm of the model's tumour components it touches and gains those components' voxels
    denser than -500 HU; any other finding is returned as it is. ``tumour_in(box)`` is the
    model's tumour class (bool) on a box of the volume. Score, density and features stay those
    of the detector's finding: the model changes what is measured, not what is reported.
    """
    if candidate.diameter_mm < _REFINE_MIN_DIAMETER_MM:
        return candidate
    reach = max(10.0, candidate.diameter_mm / 2.0)  # how far the model's tumour may go beyond
    wide = tuple(
        slice(max(0, b.start - math.ceil(reach / s)), min(n, b.stop + math.ceil(reach / s)))
        for b, s, n in zip(candidate.box, spacing_mm, hu.shape, strict=True)
    )
    box: Box = (wide[0], wide[1], wide[2])
    finding = np.zeros([b.stop - b.start for b in box], dtype=bool)
    finding[_relative(candidate.box, box)] = candidate.mask
    model = tumour_in(box)
    if float(model[finding].mean()) < _REFINE_MIN_SHARE:
        return candidate
    labels, _ = ndimage.label(model)
    touched = np.unique(labels[finding & model])
    component = np.isin(labels, touched[touched > 0])
    near = ndimage.distance_transform_edt(~component, sampling=spacing_mm) <= _REFINE_NEAR_MM
    refined = (finding & near) | (component & (hu[box] > _REFINE_DENSE_HU))
    inner = box_of(refined)
    volume_mm3 = float(np.count_nonzero(refined)) * float(np.prod(spacing_mm))
    return replace(
        candidate,
        box=(
            slice(box[0].start + inner[0].start, box[0].start + inner[0].stop),
            slice(box[1].start + inner[1].start, box[1].start + inner[1].stop),
            slice(box[2].start + inner[2].start, box[2].start + inner[2].stop),
        ),
        mask=refined[inner].copy(),
        diameter_mm=float((6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0)),
    )


def _tumour_in(classes: ClassMap | np.ndarray) -> Callable[[Box], np.ndarray]:
    """The model's tumour class on a box of the volume."""
    if isinstance(classes, ClassMap):

        def lookup(box: Box) -> np.ndarray:
            shape = tuple(b.stop - b.start for b in box)
            everywhere = np.ones(shape, dtype=bool)
            return (classes.at(box, everywhere) == TUMOUR_CLASS).reshape(shape)

        return lookup
    return lambda box: classes[box] == TUMOUR_CLASS


class DetectionOperator(Operator):
    """Inputs ``volume`` (:class:`Volume`, else passed over) and ``classes`` (the model's
    :class:`ClassMap` or None) → output ``anatomy`` (:class:`Anatomy`, or None without a
    volume)."""

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        settings: DetectionSettings,
        scorer: NoduleScorer,
        **kw: object,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.timings: dict[str, float] = {}  # this operator's stage seconds, read after a run
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("classes")
        spec.output("anatomy")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        volume = op_input.receive("volume")
        classes = op_input.receive("classes")
        anatomy = None
        if isinstance(volume, Volume):
            started = time.perf_counter()
            anatomy = detect(volume, classes, self.settings, self.scorer)
            self.timings["detect"] = time.perf_counter() - started
        op_output.emit(anatomy, "anatomy")
