"""Results writer: the SEG and the TID 1500 SR of one processed series, as files.

Always writes an SR when a CT series was selected — with findings, or saying why the input was
out of scope or could not be processed — and a SEG only when there are findings. The results
describe the series the volume was made from (not necessarily the selector's first choice);
when no candidate could be assembled, the SR references the preferred one. UIDs are derived
from that series, its images and the algorithm, so the same input gives the same objects.

When no series of the study qualifies (a refusal: a selection without candidates), the SR says
that the study was received and not analysed, with every series' reason, and references the
images of the series that came closest; no SEG, no measurements. Its UIDs differ from those of
any analysis of the same images (say, after the site relaxes the selection rule). Whether
refusals are reported at all is the selector's choice (``report_refusals``: else no selection).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from radfusion.logs import uid_tag
from radfusion.operators.change import Change, Comparison
from radfusion.operators.fusion import FusionResult
from radfusion.operators.fusion_sr import write_fusion_sr
from radfusion.operators.fusion_summary import write_fusion_summary
from radfusion.operators.measurement import Measured
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.radiomics import Radiomics
from radfusion.operators.result_identity import save_atomically, write_atomically
from radfusion.operators.results import AlgorithmInfo
from radfusion.operators.seg_writer import build_seg
from radfusion.operators.series_selector import SeriesCandidate, SeriesSelection
from radfusion.operators.sr_writer import build_sr, write_sr
from radfusion.operators.volume import Volume, VolumeError
from radfusion.patient_context import ContextOutcome

__all__ = [
    "FUSION_REPORTED",
    "IMAGING_ONLY",
    "ResultsWriterOperator",
    "source_series",
    "write_radiomics",
    "write_results",
]

IMAGING_ONLY = "This algorithm uses imaging only."
FUSION_REPORTED = (
    "A fusion risk assessment (progression risk and EGFR probability from imaging, clinical "
    "and genomic data) is reported in its own SR, series 903, and as a summary image, series "
    "904."
)

log = logging.getLogger("radfusion.operators.results_writer")


def source_series(
    selection: SeriesSelection, volume: Volume | VolumeError | None
) -> SeriesCandidate:
    """The series the results are about: the candidate the volume was made from, else (no
    volume) the preferred candidate, whose images a "not processed" SR references.

    Raises:
        KeyError: the volume comes from a series that is not among the candidates.
    """
    if isinstance(volume, Volume) and volume.source_images:
        return selection.candidate(str(volume.source_images[0].get("SeriesInstanceUID", "")))
    return selection.preferred


def write_results(
    selection: SeriesSelection | None,
    volume: Volume | VolumeError | None,
    measured: Measured | None,
    algorithm: AlgorithmInfo,
    output_dir: Path,
    *,
    uid_root: str,
    labelmap: bool = False,
    timings: dict[str, float] | None = None,
    statements: Sequence[str] = (),
    fusion: FusionResult | None = None,
    comparison: Comparison | None = None,
) -> list[Path]:
    """Write SEG and SR for the outcome of one study; returns the files written.

    ``comparison`` (with findings only) makes the SR cite the prior images compared with
    (Pertinent Other Evidence); its sentences come with ``statements``.

    ``statements`` are added to the SR as text (see :func:`build_sr`). No selection: nothing is
    written. A refusal (no candidates): only an SR saying why (see the module's docstring).
    ``fusion`` (with findings only) adds the fusion SR (:mod:`radfusion.operators.fusion_sr`)
    and its summary image (:mod:`radfusion.operators.fusion_summary`), whose UIDs change with
    the fusion's content (a new context gives new instances).

    Raises:
        ValueError, OSError: as :func:`write_sr` (and, for a SEG, :func:`build_seg`).
    """
    if selection is None:
        log.warning("no usable CT series in the study: no results written")
        return []
    output_dir.mkdir(parents=True, exist_ok=True)
    if selection.refused:
        return [_write_refusal(selection, algorithm, output_dir, uid_root, timings, statements)]
    series = source_series(selection, volume)
    source = series.SeriesInstanceUID
    uid = _uids(source, series.headers, algorithm, uid_root)

    frame_numbers = None
    if isinstance(volume, Volume):
        images = list(volume.source_images)  # k order; a multi-frame image repeats per frame
        frame_numbers = list(volume.frame_numbers)
    else:
        images = list(series.headers)
    reason = None
    if isinstance(volume, VolumeError):
        reason = f"not processed: {volume}"
    elif measured is None or measured.result is None:
        reason = measured.out_of_scope_reason if measured else "not processed"
    written = []
    seg_path = None
    seg_ds = None
    if reason is None and measured is not None and measured.result is not None:
        seg_path = output_dir / "seg.dcm"
        started = time.perf_counter()
        seg_ds = build_seg(
            images,
            measured.result,
            algorithm,
            series_instance_uid=uid("seg-series"),
            sop_instance_uid=uid("seg"),
            labelmap=labelmap,
            frame_numbers=frame_numbers,
        )
        save_atomically(seg_ds, seg_path)
        written.append(seg_path)
        if timings is not None:
            timings["seg_encode"] = time.perf_counter() - started
    sr_path = output_dir / "sr.dcm"
    started = time.perf_counter()
    sr_ds = build_sr(
        images,
        seg_ds,
        measured.result if reason is None and measured else None,
        algorithm,
        series_instance_uid=uid("sr-series"),
        # The comparison depends on what the PACS held: another prior, another instance.
        sop_instance_uid=uid("sr" if comparison is None else f"sr-{_digest(comparison)}"),
        out_of_scope_reason=reason,
        statements=[
            # Which series was analysed and why, then the detection's own decisions
            # (operating point, resolution limit), then the caller's.
            *_analysed(selection, series),
            *(measured.statements if measured is not None else ()),
            *statements,
        ],
        comparison=comparison,
    )
    save_atomically(sr_ds, sr_path)
    written.append(sr_path)
    if timings is not None:
        timings["sr_encode"] = time.perf_counter() - started
    if fusion is not None and reason is None:
        started = time.perf_counter()
        content = _fusion_digest(fusion)
        written.append(
            write_fusion_sr(
                images,
                fusion,
                measurement_sr=sr_ds,
                series_instance_uid=uid("fusion-sr-series"),
                sop_instance_uid=uid(f"fusion-sr-{content}"),
                path=output_dir / "fusion_sr.dcm",
            )
        )
        # The same result as an image, for viewers that cannot show the fusion SR.
        written.append(
            write_fusion_summary(
                images,
                fusion,
                series_instance_uid=uid("fusion-summary-series"),
                sop_instance_uid=uid(f"fusion-summary-{content}"),
                path=output_dir / "fusion_summary.dcm",
            )
        )
        if timings is not None:
            timings["fusion_sr_encode"] = time.perf_counter() - started
    log.info(
        "series %s: wrote %s%s",
        uid_tag(source),
        ", ".join(p.name for p in written),
        f" (out of scope: {reason})" if reason else "",
    )
    return written


def _digest(comparison: Comparison) -> str:
    text = "\n".join([*comparison.statements(), *(i for _, i in comparison.evidence)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fusion_digest(fusion: FusionResult) -> str:
    """What the fusion SR says, as a digest: the same model, place of running, inputs and
    outputs (at the precision the SR holds) give the same instance UID; anything else a new
    one."""
    numbers = (
        fusion.progression_probability,
        fusion.progression_sd,
        fusion.risk_score,
        fusion.risk_sd,
        fusion.baseline_log_odds,
        *(c.log_odds for c in (*fusion.modalities, *fusion.top_features)),
    )
    record = repr(
        (
            fusion.model.sha256,
            fusion.served_by,
            [round(v, 6) for v in numbers],
            fusion.risk_group,
            sorted(fusion.present.items()),
            sorted(fusion.missing.items()),
            fusion.sources,
            fusion.egfr,
            [c.name for c in fusion.top_features],
        )
    )
    return hashlib.sha256(record.encode()).hexdigest()[:32]


def _analysed(selection: SeriesSelection, series: SeriesCandidate) -> list[str]:
    """The SR's sentence on which series was analysed: the selector's reason when it is the
    preferred one, else that the series preferred to it could not be assembled."""
    if series.SeriesInstanceUID == selection.preferred.SeriesInstanceUID:
        return [f"Series analysed: {selection.choice}"] if selection.choice else []
    before = selection.candidates.index(series)
    return [
        f"Series analysed: {series.describe()}: {before} series preferred to it could not be "
        "assembled into a volume"
    ]


def _uids(
    series_uid: str, images: Sequence[Dataset], algorithm: AlgorithmInfo, uid_root: str
) -> Callable[[str], str]:
    """UIDs of the results about ``images`` of one series, by kind (``"sr"``, ...).

    The same input and model give the same UIDs; other instances (a re-run after late arrivals)
    or other weights give new ones, so a PACS never sees one UID for two contents. Only the
    images used count: a stray scout left out of the series changes nothing.
    """
    instances = hashlib.sha256(
        "\\".join(sorted(str(ds.get("SOPInstanceUID", "")) for ds in images)).encode()
    ).hexdigest()
    key = [series_uid, algorithm.name, algorithm.version, instances]
    key += map(str, algorithm.parameters)

    def uid(kind: str) -> str:
        return str(generate_uid(prefix=uid_root, entropy_srcs=[*key, kind]))

    return uid


def _write_refusal(
    selection: SeriesSelection,
    algorithm: AlgorithmInfo,
    output_dir: Path,
    uid_root: str,
    timings: dict[str, float] | None,
    statements: Sequence[str],
) -> Path:
    """The SR of a study that is not analysed: the reason, then each series' reason as text;
    it references the selection's evidence (the images of the series that came closest)."""
    images = list(selection.evidence)
    series_uid = str(images[0].SeriesInstanceUID)
    uid = _uids(series_uid, images, algorithm, uid_root)
    count = len(selection.skipped)
    reason = "the study was received and not analysed: " + (
        f"none of its {count} series qualifies" if count else "no series qualifies"
    )
    sr_path = output_dir / "sr.dcm"
    started = time.perf_counter()
    write_sr(
        images,
        None,
        None,
        algorithm,
        # Not the UIDs an analysis of the same images would get: a refusal is other content.
        series_instance_uid=uid("refusal-sr-series"),
        sop_instance_uid=uid("refusal-sr"),
        out_of_scope_reason=reason,
        statements=[*selection.reasons(), *statements],
        path=sr_path,
    )
    if timings is not None:
        timings["sr_encode"] = time.perf_counter() - started
    log.warning(
        "study not analysed: wrote %s referencing series %s (%d image(s)); %s",
        sr_path.name,
        uid_tag(series_uid),
        len(images),
        "; ".join(selection.reasons()),
    )
    return sr_path


def write_radiomics(radiomics: Radiomics, series_instance_uid: str, output_dir: Path) -> Path:
    """``radiomics.json`` in ``output_dir``: the analysed series, the library and settings, and
    each tumour's features under the tracking UID its SR measurement group carries. A record
    for research and for checking, not a DICOM object: it is not exported to the PACS.

    Raises:
        OSError: the file cannot be written.
    """
    record = {"SeriesInstanceUID": series_instance_uid} | radiomics.as_dict()
    # NaN (a feature undefined on a region) is not JSON: null.
    text = json.dumps(_finite(record), indent=1, allow_nan=False) + "\n"
    return write_atomically(output_dir / "radiomics.json", lambda partial: partial.write_text(text))


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class ResultsWriterOperator(Operator):
    """Inputs ``selection``, ``volume``, ``measured``, ``context``, ``radiomics`` → files in
    ``output_dir``; :attr:`written` and :attr:`timings` hold the DICOM files written (the
    results to export) and the encoding seconds after a run, :attr:`records` the other files
    (``radiomics.json``).

    ``context`` is the patient context's outcome (:class:`PatientContextOperator`), or None
    when none was looked up; its sentence goes into the SR, beside the note that the algorithm
    uses imaging only. A refusal's SR gives the series' reasons only. ``radiomics`` (or None)
    is written beside the SR when it was written for the series they describe.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        algorithm: AlgorithmInfo,
        output_dir: Path,
        uid_root: str,
        labelmap: bool = False,
        **kw: object,
    ) -> None:
        self.algorithm = algorithm
        self.output_dir = Path(output_dir)
        self.uid_root = uid_root
        self.labelmap = labelmap
        self.written: tuple[Path, ...] = ()
        self.records: tuple[Path, ...] = ()
        self.timings: dict[str, float] = {}  # this operator's stage seconds, read after a run
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("selection")
        spec.input("volume")
        spec.input("measured")
        spec.input("context")
        spec.input("radiomics")
        spec.input("fusion")
        spec.input("change")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        receive = op_input.receive
        selection, volume, measured = receive("selection"), receive("volume"), receive("measured")
        outcome: ContextOutcome | None = receive("context")
        radiomics: Radiomics | None = receive("radiomics")
        fusion: FusionResult | None = receive("fusion")
        change: Change | None = receive("change")
        analysed = selection is not None and not selection.refused
        statements = [outcome.describe(), IMAGING_ONLY] if outcome is not None and analysed else []
        if fusion is not None and analysed:
            statements.append(FUSION_REPORTED)
        if change is not None and analysed:
            statements.extend(change.statements)
        self.written = tuple(
            write_results(
                selection,
                volume,
                measured,
                self.algorithm,
                self.output_dir,
                uid_root=self.uid_root,
                labelmap=self.labelmap,
                timings=self.timings,
                statements=statements,
                fusion=fusion,
                comparison=change.comparison if change is not None else None,
            )
        )
        self.records = ()
        if radiomics is not None and analysed and isinstance(volume, Volume) and self.written:
            series = source_series(selection, volume).SeriesInstanceUID
            self.records = (write_radiomics(radiomics, series, self.output_dir),)
