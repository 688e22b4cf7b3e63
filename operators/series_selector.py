"""Series selection: pick the axial CT series of a study that the app can use.

Scanners send more than the series an app wants: localizers (scouts, topograms), secondary
captures, dose reports, reformats in other planes, thick and thin reconstructions. The
selector keeps CT image series with enough axial slices, skips the rest with a reason each,
and prefers the series with the most slices (the thinnest reconstruction).
"""

from __future__ import annotations

import logging
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
    "SelectedSeries",
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


@dataclass(frozen=True)
class SelectedSeries:
    """The series chosen for processing, and why every other series was not."""

    SeriesInstanceUID: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    slices: int
    skipped: tuple[tuple[str, str], ...]  # (SeriesInstanceUID, reason)


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


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _orientation(ds: Dataset) -> list[float] | None:
    iop = ds.get("ImageOrientationPatient")
    # Enhanced CT: shared functional groups, else the first frame's (the volume step checks
    # that every frame agrees).
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if iop is None and ds.get(groups):
            item = ds[groups][0]
            if "PlaneOrientationSequence" in item:
                iop = item.PlaneOrientationSequence[0].get("ImageOrientationPatient")
    return None if iop is None else [float(v) for v in iop]


def _why_not(headers: Sequence[Dataset], min_slices: int) -> str | None:
    first = headers[0]
    if str(first.get("Modality", "")).upper() != "CT":
        return f"modality {first.get('Modality', 'missing')}, not CT"
    classes = {str(h.SOPClassUID) for h in headers}
    if not classes <= _CT_CLASSES:
        return "not CT image storage (e.g. secondary capture, dose report)"
    image_types = {v.upper() for h in headers for v in (h.get("ImageType") or [])}
    if "LOCALIZER" in image_types:
        return "localizer (scout/topogram)"
    if "PixelData" not in first and "Rows" not in first:
        return "no image pixel data"
    iop = _orientation(first)
    if iop is None:
        return "no Image Orientation (Patient)"
    normal = np.cross(iop[:3], iop[3:])
    angle = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / np.linalg.norm(normal)))))
    if angle > _AXIAL_TOLERANCE_DEG:
        return f"not axial (slice normal {angle:.0f} degrees from the patient's long axis)"
    slices = sum(_frames(h) for h in headers)
    if slices < min_slices:
        return f"{slices} slice(s), fewer than the {min_slices} required"
    return None


def select_series(
    files: Iterable[tuple[Path, Dataset]], *, min_slices: int = 50
) -> SelectedSeries | None:
    """Choose the CT series to process; None when no series qualifies.

    Either way, the reason each series was skipped is logged (and returned when one is chosen).
    """
    by_series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in files:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    candidates = []
    skipped = []
    for uid, items in by_series.items():
        headers = [ds for _, ds in items]
        reason = _why_not(headers, min_slices) if uid else "no Series Instance UID"
        if reason is None:
            candidates.append((sum(_frames(h) for h in headers), uid, items))
        else:
            skipped.append((uid, reason))
            log.info("series %s skipped: %s", uid_tag(uid), reason)
    if not candidates:
        return None
    slices, uid, items = max(candidates, key=lambda c: (c[0], c[1]))
    for n, other, _ in candidates:
        if other != uid:
            skipped.append((other, f"another series has more slices ({n} < {slices})"))
    return SelectedSeries(
        uid,
        tuple(p for p, _ in items),
        tuple(ds for _, ds in items),
        slices,
        tuple(skipped),
    )


class SeriesSelectorOperator(Operator):
    """Input ``files`` (list of paths of one study) → output ``selection``
    (``SelectedSeries``, or ``None`` when the study has no usable CT series)."""

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
