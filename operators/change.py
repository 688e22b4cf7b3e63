"""Change over time: the nodules of this CT against those of the patient's prior CT.

The prior's nodules come from the same analysis run on the prior's images (so both sides are
measured alike). Patients lie differently from one scan to the next, so positions are not
compared raw: the prior's lungs are registered rigidly to the current lungs (SimpleITK, mean
squares of the lungs' signed distance maps on a 6 mm grid, starting from their centres of
mass), and each prior
nodule's centroid is carried into the current frame before matching. A match is the nearest
pair within ``max(10 mm, 0.75 × the larger diameter)``, nearest first; what is left is new
(now only) or not found again (prior only).

Growth is reported as volume change and volume doubling time, ``interval × ln 2 / ln(V_now /
V_prior)`` (Schwartz 1961), the measure lung nodule guidelines use; a nodule that did not grow
has none.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from scipy import ndimage

from radfusion.errors import RadfusionError
from radfusion.logs import uid_tag
from radfusion.operators.detection import Anatomy
from radfusion.operators.measurement import Measured
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.results import Finding
from radfusion.operators.volume import Volume

__all__ = [
    "Change",
    "ChangeOperator",
    "Comparison",
    "NoduleChange",
    "PriorAnalysis",
    "PriorLookup",
    "RegistrationError",
    "compare",
    "register_lungs",
]

log = logging.getLogger("radfusion.operators.change")

_REGISTRATION_MM = 6.0  # working grid of the registration
_CLAMP_MM = 20.0  # signed distances beyond this do not matter
_MATCH_FLOOR_MM = 10.0


@dataclass(frozen=True, eq=False)
class PriorAnalysis:
    """The prior CT as the app analysed it: the series used, its date, its lungs and its
    nodules (tumour findings, in its own patient frame)."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    StudyDate: dt.date
    volume: Volume
    lungs: np.ndarray  # bool [k, r, c] of ``volume``
    nodules: tuple[Finding, ...]


PriorLookup = Callable[[Volume], "PriorAnalysis | str"]
"""The current volume → the patient's prior CT analysed, or the reason there is none to
compare with (e.g. "no earlier chest CT in the PACS")."""


class RegistrationError(RadfusionError, RuntimeError):
    """The lungs could not be registered (no lungs, or the optimiser failed)."""


@dataclass(frozen=True)
class NoduleChange:
    """One nodule over time. ``status`` is "matched", "new" (now only) or "not found" (prior
    only); sizes of the side it is not on are None."""

    status: str
    tracking_id: str  # now ("Tumour 1"), or the prior's for a nodule not found again
    side: str
    prior_tracking_id: str | None
    diameter_mm: float | None
    prior_diameter_mm: float | None
    volume_mm3: float | None
    prior_volume_mm3: float | None
    distance_mm: float | None  # registered prior centroid to the current one

    @property
    def volume_change_percent(self) -> float | None:
        if not self.volume_mm3 or not self.prior_volume_mm3:
            return None
        return 100.0 * (self.volume_mm3 / self.prior_volume_mm3 - 1.0)

    def doubling_time_days(self, interval_days: float) -> float | None:
        """Volume doubling time; None when it did not grow or the interval is not positive."""
        if not self.volume_mm3 or not self.prior_volume_mm3 or interval_days <= 0:
            return None
        ratio = self.volume_mm3 / self.prior_volume_mm3
        return interval_days * math.log(2.0) / math.log(ratio) if ratio > 1.0 else None


@dataclass(frozen=True)
class Comparison:
    """This CT against its prior: what was compared and each nodule's change."""

    StudyInstanceUID: str  # the prior's
    SeriesInstanceUID: str
    StudyDate: dt.date
    interval_days: int
    shift_mm: float  # how far registration moved the prior's lung centre
    changes: tuple[NoduleChange, ...]
    evidence: tuple[tuple[str, str], ...] = ()  # the prior images compared: (class, instance)

    def statements(self) -> list[str]:
        """Sentences for the SR, one per nodule after a summary line."""
        counts = {s: sum(c.status == s for c in self.changes) for s in ("matched", "new")}
        gone = sum(c.status == "not found" for c in self.changes)
        out = [
            f"Compared with the prior CT of {self.StudyDate.isoformat()} "
            f"({self.interval_days} days earlier; prior study {uid_tag(self.StudyInstanceUID)}, "
            f"analysed with this algorithm; lungs registered rigidly, prior shifted "
            f"{self.shift_mm:.1f} mm): {counts['matched']} nodule(s) matched, {counts['new']} "
            f"new, {gone} prior nodule(s) not found again. Volume doubling time = interval × "
            f"ln 2 / ln(volume now / volume then)."
        ]
        for c in self.changes:
            where = f"{c.tracking_id} ({c.side} lung)"
            if c.status == "new":
                size = _size(c.diameter_mm, c.volume_mm3)
                out.append(f"{where}: {size}; new since the prior CT.")
            elif c.status == "not found":
                out.append(
                    f"Prior {where}: {_size(c.prior_diameter_mm, c.prior_volume_mm3)}; not found "
                    "again (resolved, or below the reporting threshold now)."
                )
            else:
                change = c.volume_change_percent or 0.0
                vdt = c.doubling_time_days(self.interval_days)
                growth = (
                    f"volume doubling time {vdt:.0f} days" if vdt is not None else "not growing"
                )
                out.append(
                    f"{where}: {_size(c.diameter_mm, c.volume_mm3)}, prior "
                    f"{c.prior_tracking_id} {_size(c.prior_diameter_mm, c.prior_volume_mm3)}; "
                    f"volume {change:+.0f} %, {growth}."
                )
        return out


def _size(diameter: float | None, volume: float | None) -> str:
    return f"{diameter or 0.0:.1f} mm, {volume or 0.0:,.0f} mm³"


def _image(mask: np.ndarray, volume: Volume) -> object:
    """The signed distance (mm, clamped) to the edge of ``mask`` as a SimpleITK image in
    patient LPS mm, on a grid of about 6 mm: unlike the mask itself, it has a slope to follow
    wherever the two lungs do not overlap yet."""
    import SimpleITK as sitk

    steps = [max(1, round(_REGISTRATION_MM / s)) for s in volume.spacing_mm]  # k, r, c
    small = mask[:: steps[0], :: steps[1], :: steps[2]]
    spacing_krc = np.array(volume.spacing_mm) * steps
    inside = ndimage.distance_transform_edt(small, sampling=spacing_krc)
    outside = ndimage.distance_transform_edt(~small, sampling=spacing_krc)
    distance = np.clip(outside - inside, -_CLAMP_MM, _CLAMP_MM).astype(np.float32)
    image = sitk.GetImageFromArray(distance)
    affine = volume.affine
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    image.SetSpacing(tuple(float(v) for v in spacing_krc[::-1]))  # c, r, k
    image.SetDirection(tuple(float(v) for v in columns.ravel()))
    return image


def _centroid(mask: np.ndarray, volume: Volume) -> np.ndarray:
    ks, rs, cs = (float(v.mean()) for v in np.nonzero(mask))
    return (volume.affine @ np.array([cs, rs, ks, 1.0]))[:3]


def register_lungs(
    current: Volume, current_lungs: np.ndarray, prior: Volume, prior_lungs: np.ndarray
) -> tuple[Callable[[Sequence[float]], tuple[float, float, float]], float]:
    """A rigid transform carrying prior patient coordinates onto the current ones, found by
    registering the lung masks, and how far it moves the prior lungs' centre (mm).

    Raises:
        RegistrationError: a side has no lungs, or the optimiser failed.
    """
    import SimpleITK as sitk

    if not current_lungs.any() or not prior_lungs.any():
        raise RegistrationError("no lungs to register")
    fixed = _image(current_lungs, current)
    moving = _image(prior_lungs, prior)
    start = _centroid(current_lungs, current)
    try:
        # Rotation about the current lungs' centre, starting from the centres' offset.
        initial = sitk.Euler3DTransform()
        initial.SetCenter(tuple(float(v) for v in start))
        initial.SetTranslation(tuple(float(v) for v in _centroid(prior_lungs, prior) - start))
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMeanSquares()
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=0.01, numberOfIterations=100, relaxationFactor=0.5
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([2, 1])
        method.SetSmoothingSigmasPerLevel([1.0, 0.0])
        method.SetInitialTransform(initial, inPlace=False)
        found = method.Execute(fixed, moving)
        inverse = found.GetInverse()  # found: current → prior; we carry prior → current
    except RuntimeError as err:
        raise RegistrationError(f"registration failed: {err}") from None

    def to_current(point: Sequence[float]) -> tuple[float, float, float]:
        x, y, z = inverse.TransformPoint(tuple(float(v) for v in point))
        return (x, y, z)

    centre = _centroid(prior_lungs, prior)
    moved = to_current([float(v) for v in centre])
    shift = float(np.linalg.norm(np.asarray(moved, dtype=np.float64) - centre))
    return to_current, shift


def compare(
    nodules: Sequence[Finding],
    prior: PriorAnalysis,
    study_date: dt.date,
    to_current: Callable[[Sequence[float]], tuple[float, float, float]],
    shift_mm: float,
) -> Comparison:
    """Match ``nodules`` (this CT's tumour findings) with the prior's and say how each
    changed."""
    carried = [np.array(to_current(p.centroid_lps)) for p in prior.nodules]
    pairs = []
    for i, now in enumerate(nodules):
        for j, then in enumerate(prior.nodules):
            distance = float(np.linalg.norm(np.array(now.centroid_lps) - carried[j]))
            reach = max(
                _MATCH_FLOOR_MM,
                0.75 * max(now.longest_axial_diameter_mm, then.longest_axial_diameter_mm),
            )
            if distance <= reach:
                pairs.append((distance, i, j))
    matched: dict[int, tuple[int, float]] = {}
    used: set[int] = set()
    for distance, i, j in sorted(pairs):
        if i not in matched and j not in used:
            matched[i] = (j, distance)
            used.add(j)
    changes = []
    for i, now in enumerate(nodules):
        if i in matched:
            j, distance = matched[i]
            then = prior.nodules[j]
            changes.append(
                NoduleChange(
                    "matched",
                    now.tracking_id,
                    now.side,
                    then.tracking_id,
                    now.longest_axial_diameter_mm,
                    then.longest_axial_diameter_mm,
                    now.volume_mm3,
                    then.volume_mm3,
                    distance,
                )
            )
        else:
            changes.append(
                NoduleChange(
                    "new",
                    now.tracking_id,
                    now.side,
                    None,
                    now.longest_axial_diameter_mm,
                    None,
                    now.volume_mm3,
                    None,
                    None,
                )
            )
    for j, then in enumerate(prior.nodules):
        if j not in used:
            changes.append(
                NoduleChange(
                    "not found",
                    then.tracking_id,
                    then.side,
                    then.tracking_id,
                    None,
                    then.longest_axial_diameter_mm,
                    None,
                    then.volume_mm3,
                    None,
                )
            )
    return Comparison(
        prior.StudyInstanceUID,
        prior.SeriesInstanceUID,
        prior.StudyDate,
        (study_date - prior.StudyDate).days,
        shift_mm,
        tuple(changes),
        tuple(
            dict.fromkeys(
                (str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                for ds in prior.volume.source_images
                if "SOPInstanceUID" in ds and "SOPClassUID" in ds
            )
        ),
    )


def _study_date(volume: Volume) -> dt.date | None:
    header = volume.source_images[0] if volume.source_images else None
    text = str(header.get("StudyDate", "") or "") if header is not None else ""
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


@dataclass(frozen=True)
class Change:
    """The change step's output: a comparison, or sentences saying why there is none."""

    comparison: Comparison | None
    statements: tuple[str, ...]


class ChangeOperator(Operator):
    """Inputs ``volume``, ``anatomy`` and ``measured`` → output ``change`` (:class:`Change`;
    None when priors are off or nothing was measured).

    ``lookup`` finds and analyses the prior (the app gives it; it talks to the PACS), None
    when priors are off.
    """

    def __init__(
        self, fragment: Fragment, *args: object, lookup: PriorLookup | None, **kw: object
    ) -> None:
        self.lookup = lookup
        self.timings: dict[str, float] = {}
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("anatomy")
        spec.input("measured")
        spec.output("change")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        volume = op_input.receive("volume")
        anatomy = op_input.receive("anatomy")
        measured = op_input.receive("measured")
        change = None
        if (
            self.lookup is not None
            and isinstance(volume, Volume)
            and isinstance(anatomy, Anatomy)
            and isinstance(measured, Measured)
            and measured.result is not None
        ):
            started = time.perf_counter()
            change = self._change(volume, anatomy, measured)
            self.timings["priors"] = time.perf_counter() - started
        op_output.emit(change, "change")

    def _change(self, volume: Volume, anatomy: Anatomy, measured: Measured) -> Change:
        assert self.lookup is not None and measured.result is not None
        today = _study_date(volume)
        if today is None:
            return Change(None, ("No comparison with prior CT: this study has no Study Date.",))
        try:
            prior = self.lookup(volume)
            if isinstance(prior, str):
                return Change(None, (f"No comparison with prior CT: {prior}.",))
            to_current, shift = register_lungs(
                volume, anatomy.fields.right | anatomy.fields.left, prior.volume, prior.lungs
            )
        except RegistrationError as err:
            log.warning("prior not compared: %s", err)
            return Change(None, (f"No comparison with prior CT: {err}.",))
        except Exception as err:
            # The prior is extra: whatever goes wrong with it, this study's results stand.
            log.warning("prior not compared: %s", type(err).__name__)
            return Change(
                None, (f"No comparison with prior CT: the prior failed ({type(err).__name__}).",)
            )
        nodules = [f for f in measured.result.findings if f.kind == "tumour"]
        comparison = compare(nodules, prior, today, to_current, shift)
        log.info(
            "compared with prior %s (%d days): %s",
            uid_tag(prior.StudyInstanceUID),
            comparison.interval_days,
            ", ".join(f"{c.tracking_id} {c.status}" for c in comparison.changes) or "no nodules",
        )
        return Change(comparison, tuple(comparison.statements()))
