"""The lung CT app: chest CT → lungs and lung tumours → DICOM SEG + TID 1500 SR.

A MONAI Deploy application (Holoscan graph)::

    study ─▶ select_series ─▶ volume ─▶ segment ─▶ detect ─▶ measure ─▶ write_results
                  │              ├──────────────────────▲          ▲          ▲
                  │              └─────────────────────────────────┴──────────┤
                  └───────────────────────────────────────────────────────────┘

``segment`` runs the learned model; ``detect`` finds the lungs (classical, checked for
plausibility) and the nodules (shape and density, the model's tumour class as one piece of
evidence) and applies the operating point (``apps.lung_ct.detection_threshold``,
``max_findings``, ``min_nodule_diameter_mm``).

Run once over a folder like any MONAI Deploy app (``HOLOSCAN_INPUT_PATH`` →
``HOLOSCAN_OUTPUT_PATH``, or ``radfusion run lung-ct --input DIR --output DIR``), or from the
service, which hands it each study the router assigns to ``lung-ct``.

With a ``fhir:`` section, the patient's clinical and genomic data are looked up while the images
are processed, and the SR says whether they were found and, if not, why. The segmentation itself
uses imaging only (the SR says that too); the context is there for fusion models. Under
``fhir.on_unavailable: hold`` an unreachable FHIR server fails the study before anything is
written, so that it is retried later.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pydicom
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset

from radfusion import __version__
from radfusion.apps.registry import StudyInput
from radfusion.config import LungCTConfig, RadfusionConfig
from radfusion.integrations.fhir.provider import (
    ContextOutcome,
    ContextUnavailable,
    PatientContextProvider,
)
from radfusion.operators.detection import DetectionOperator, DetectionSettings
from radfusion.operators.measurement import MeasurementOperator
from radfusion.operators.nodules import NoduleScorer, default_scorer_path
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.results import AlgorithmInfo
from radfusion.operators.results_writer import ResultsWriterOperator
from radfusion.operators.segmentation import (
    SegmentationModelConfig,
    SegmentationOperator,
    default_model_config_path,
)
from radfusion.operators.segmentation_model import Predictor, load_torchscript
from radfusion.operators.series_selector import (
    NoSeriesQualifies,
    SelectionRule,
    SeriesSelectorOperator,
    read_headers,
    select_series,
)
from radfusion.operators.volume import VolumeOperator

__all__ = ["LungCT", "LungCTApp", "PatientContextLookup", "make_predictor", "run_folder"]

log = logging.getLogger("radfusion.apps.lung_ct")

IMAGING_ONLY = "This algorithm uses imaging only."


class StudyFilesOperator(Operator):
    """Source: emits the study's files once (output ``files``)."""

    def __init__(self, fragment: Fragment, *args: object, files: Sequence[Path], **kw: object):
        self.files = list(files)
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("files")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        op_output.emit(self.files, "files")


def model_config(settings: LungCTConfig) -> SegmentationModelConfig:
    return SegmentationModelConfig.from_yaml(settings.model or default_model_config_path())


def detection_settings(settings: LungCTConfig) -> DetectionSettings:
    """The nodule detector's operating point from the app's configuration."""
    return DetectionSettings(
        min_score=settings.detection_threshold,
        max_findings=settings.max_findings,
        min_diameter_mm=settings.min_nodule_diameter_mm,
    )


def algorithm_info(
    model: SegmentationModelConfig, predictor: object = None, scorer: Path | None = None
) -> AlgorithmInfo:
    """The algorithm as the results name it; a model marked ``demonstration`` says so. The
    nodule scorer's digest is named when given (it decides what is reported). On a
    Triton server, the served model and the server's version are named too; the weights'
    digest only when the server's config states it (``radfusion triton repo`` writes it and
    :func:`make_predictor` checks it)."""
    identity = getattr(predictor, "identity", None)
    parameters = []
    if identity is None or identity.weights_sha256:  # weights known: in process, or checked
        parameters.append(("model_sha256", model.sha256[:16]))
    if identity is not None:
        parameters.append(("inference", identity.describe()))
    if scorer is not None:  # the nodules' false-positive stage decides what is reported
        digest = hashlib.sha256(Path(scorer).read_bytes()).hexdigest()
        parameters.append(("nodule_scorer_sha256", digest[:16]))
    return AlgorithmInfo(
        name=model.name,
        version=model.version,
        demonstration=model.demonstration,
        parameters=tuple(parameters),
    )


def make_predictor(config: RadfusionConfig, model: SegmentationModelConfig) -> Predictor:
    """The predictor the configuration asks for: on the Triton server of ``triton:``, or
    in this process (the default).

    Raises:
        TritonError: the server or model is not available (see its subclasses).
        ModelConfigError: the TorchScript file cannot be loaded.
    """
    settings = config.apps.lung_ct
    if config.triton is not None:
        from radfusion.integrations.inference.triton import TritonError, TritonPredictor

        predictor = TritonPredictor(
            config.triton, settings.triton_model, settings.triton_model_version
        )
        served = predictor.identity.weights_sha256
        if served and served != model.sha256:
            predictor.close()
            # The model.yaml's preprocessing and labels would be applied to other weights.
            raise TritonError(
                f"{predictor.identity.describe()} serves weights {served[:16]}, but "
                f"{settings.model or 'the reference model.yaml'} describes {model.sha256[:16]}"
            )
        return predictor
    return load_torchscript(model.model_path, settings.threads)


class PatientContextLookup:
    """The patient context of one study, looked up in a thread while the images are processed.

    :meth:`statements` waits for it and gives the SR's sentences; :attr:`outcome` is then set.
    Nothing is looked up (and the SR says nothing of it) without a ``fhir:`` section.

    Raises (from :meth:`statements`):
        ContextUnavailable: the FHIR server is unavailable and the site holds such studies.
    """

    def __init__(
        self,
        provider: PatientContextProvider | None,
        files: Sequence[Path],
        pool: ThreadPoolExecutor,
    ) -> None:
        self.outcome: ContextOutcome | None = None
        self._future: Future[ContextOutcome] | None = None
        if provider is not None and files:
            self._future = pool.submit(_lookup, provider, list(files))

    def statements(self) -> list[str]:
        if self._future is None:
            return []
        self.outcome = self._future.result()
        return [self.outcome.describe(), IMAGING_ONLY]

    def abandon(self) -> None:
        """The study failed before its results were written: drop the lookup if it has not
        started (one that has runs to its end in the background; its outcome is unused)."""
        if self._future is not None:
            self._future.cancel()


_DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: names no one patient


def _header(files: Sequence[Path]) -> Dataset | None:
    """The first file that is a DICOM instance of a study (any of them names its patient)."""
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM, unreadable: another file will do
            continue
        if "StudyInstanceUID" in ds and ds.get("SOPClassUID") != _DICOMDIR:
            return ds
    return None


def _lookup(provider: PatientContextProvider, files: Sequence[Path]) -> ContextOutcome:
    """The provider's outcome; under ``imaging-only`` nothing in the lookup may fail the study,
    so an unexpected error is an outcome too (named by its type: its text may hold paths or
    patient data)."""
    try:
        header = _header(files)
        if header is None:
            return ContextOutcome("no-patient", reason="no instance of the study could be read")
        return provider(header)
    except ContextUnavailable:
        raise
    except Exception as err:
        log.warning("patient context lookup failed (%s); imaging only", type(err).__name__)
        return ContextOutcome("refused", reason=f"the lookup failed ({type(err).__name__})")


class LungCTApp(Application):
    """The graph for one study: ``files`` in, SEG and SR written to ``output_dir``.

    ``statements``, when given, is called as the results are written and its sentences go into
    the SR (see :class:`ResultsWriterOperator`).
    """

    def __init__(
        self,
        *,
        files: Sequence[Path],
        output_dir: Path,
        settings: LungCTConfig,
        uid_root: str,
        timings: dict[str, float] | None = None,
        model: SegmentationModelConfig | None = None,
        predictor: Predictor | None = None,
        statements: Callable[[], Sequence[str]] | None = None,
        **kw: object,
    ) -> None:
        self.timings: dict[str, float] = {} if timings is None else timings
        self._statements = statements
        self.written: list[Path] = []  # filled by the results writer when the graph runs
        self._model = model
        self._predictor = predictor
        self._files = list(files)
        self._output_dir = Path(output_dir)
        self._settings = settings
        self._uid_root = uid_root
        # Holoscan would otherwise parse sys.argv (e.g. `radfusion serve --config FILE`) as its own
        # command line and load radfusion's config file as a Holoscan config.
        super().__init__(argv=[sys.executable, "lung-ct"], **kw)

    def compose(self) -> None:
        model = self._model or model_config(self._settings)
        predictor = self._predictor or load_torchscript(model.model_path, self._settings.threads)
        study = StudyFilesOperator(self, CountCondition(self, 1), files=self._files, name="study")
        select = SeriesSelectorOperator(
            self,
            rule=SelectionRule.from_settings(self._settings),
            report_refusals=self._settings.report_refusals,
            name="select_series",
        )
        volume = VolumeOperator(self, timings=self.timings, name="volume")
        segment = SegmentationOperator(
            self,
            config=model,
            predictor=predictor,
            timings=self.timings,
            name="segment",
        )
        scorer_path = self._settings.nodule_scorer or default_scorer_path()
        detect = DetectionOperator(
            self,
            settings=detection_settings(self._settings),
            scorer=NoduleScorer.from_json(scorer_path),
            timings=self.timings,
            name="detect",
        )
        measure = MeasurementOperator(
            self, uid_root=self._uid_root, timings=self.timings, name="measure"
        )
        write = ResultsWriterOperator(
            self,
            algorithm=algorithm_info(model, predictor, scorer_path),
            output_dir=self._output_dir,
            uid_root=self._uid_root,
            labelmap=self._settings.seg_type == "labelmap",
            timings=self.timings,
            written=self.written,
            statements=self._statements,
            name="write_results",
        )
        self.add_flow(study, select, {("files", "files")})
        self.add_flow(select, volume, {("selection", "selection")})
        self.add_flow(volume, segment, {("volume", "volume")})
        self.add_flow(volume, detect, {("volume", "volume")})
        self.add_flow(segment, detect, {("classes", "classes")})
        self.add_flow(volume, measure, {("volume", "volume")})
        self.add_flow(detect, measure, {("anatomy", "anatomy")})
        self.add_flow(select, write, {("selection", "selection")})
        self.add_flow(volume, write, {("volume", "volume")})
        self.add_flow(measure, write, {("measured", "measured")})


def run_folder(input_dir: Path, output_dir: Path, config: RadfusionConfig) -> list[Path]:
    """Run the app once over every file under ``input_dir``; returns the files written.

    Raises:
        NoSeriesQualifies: no series can be analysed; it names each series and why, and holds
            the refusal SR written (``apps.lung_ct.report_refusals``).
    """
    files = sorted(p for p in Path(input_dir).rglob("*") if p.is_file())
    # Headers only, before the model loads: a study the app cannot analyse fails with every
    # series' reason (the graph selects again, and writes the refusal SR if the site wants it).
    selection = select_series(
        read_headers(files), rule=SelectionRule.from_settings(config.apps.lung_ct)
    )
    refused = selection is None or selection.refused
    if selection is None or (refused and not config.apps.lung_ct.report_refusals):
        raise NoSeriesQualifies(selection)
    model = model_config(config.apps.lung_ct)
    predictor = make_predictor(config, model)
    provider = PatientContextProvider(config.fhir) if config.fhir is not None else None
    pool = ThreadPoolExecutor(1, thread_name_prefix="fhir")
    lookup = PatientContextLookup(provider, files, pool)
    try:
        app = LungCTApp(
            files=files,
            output_dir=Path(output_dir),
            settings=config.apps.lung_ct,
            uid_root=config.uid_root,
            model=model,
            predictor=predictor,
            statements=lookup.statements,
        )
        app.run()
    finally:
        lookup.abandon()
        pool.shutdown(wait=False, cancel_futures=True)
        _close(predictor, provider)
    if refused:
        raise NoSeriesQualifies(selection, app.written)
    return list(app.written)


def _close(*resources: object) -> None:
    for resource in resources:
        close = getattr(resource, "close", None)
        if close is not None:
            close()


class LungCT:
    """The registry entry: runs the app on each study the service hands over.

    The model is loaded once, on the first study, and kept for the next ones; so is the FHIR
    client (and its token). When the patient context is not available, the study's
    ``notes`` say why, for ``radfusion status``.
    """

    name = "lung-ct"

    def __init__(self, config: RadfusionConfig) -> None:
        self.config = config
        self._model: SegmentationModelConfig | None = None
        self._predictor: Predictor | None = None
        self._provider: PatientContextProvider | None = None
        # Two workers: a lookup left running by a failed study does not delay the next one's.
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="fhir")

    def close(self) -> None:
        """Stop looking up (pending lookups are dropped) and close the FHIR and Triton
        clients; the service calls this when it stops."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        _close(self._predictor, self._provider)
        self._predictor = self._provider = None

    def run(self, study: StudyInput, work_dir: Path) -> list[Path]:
        settings = self.config.apps.lung_ct
        if self._predictor is None:
            self._model = model_config(settings)
            self._predictor = make_predictor(self.config, self._model)
        if self._provider is None and self.config.fhir is not None:
            self._provider = PatientContextProvider(self.config.fhir)
        lookup = PatientContextLookup(self._provider, study.files, self._pool)
        app = LungCTApp(
            files=study.files,
            output_dir=Path(work_dir) / "output",
            settings=settings,
            uid_root=self.config.uid_root,
            model=self._model,
            predictor=self._predictor,
            statements=lookup.statements,
        )
        try:
            app.run()
        finally:
            lookup.abandon()
        if lookup.outcome is not None and lookup.outcome.status != "available":
            study.notes.append(lookup.outcome.describe())
        log.info(
            "lung-ct stage seconds: %s",
            " ".join(f"{k}={v:.2f}" for k, v in app.timings.items()),
        )
        return list(app.written)


def main() -> None:
    """MONAI Deploy convention: HOLOSCAN_INPUT_PATH → HOLOSCAN_OUTPUT_PATH."""
    from radfusion.config import load_config

    config_path = os.environ.get("RADFUSION_CONFIG")
    config = load_config(Path(config_path) if config_path else None)
    input_dir = Path(os.environ.get("HOLOSCAN_INPUT_PATH", "input"))
    output_dir = Path(os.environ.get("HOLOSCAN_OUTPUT_PATH", "output"))
    try:
        written = run_folder(input_dir, output_dir, config)
    except NoSeriesQualifies as err:
        # A refusal is an outcome, not a crash: say why per series (the SR, when configured,
        # has been written) and exit non-zero for the orchestrator.
        log.error("lung-ct %s: %s", __version__, err)
        raise SystemExit(1) from None
    log.info("lung-ct %s wrote %d file(s) to %s", __version__, len(written), output_dir)


if __name__ == "__main__":
    main()
