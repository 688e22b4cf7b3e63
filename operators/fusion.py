"""Fusion operator: the tumours' radiomics and the patient context → progression risk and EGFR
probability, each with its uncertainty, what it was computed from and why.

Inputs ``measured`` (:class:`Measured`), ``radiomics`` (:class:`Radiomics` or None) and
``context`` (:class:`ContextOutcome` or None) → output ``fusion`` (:class:`FusionResult`, or
None when the study was not analysed or fusion is off).

The model (a ``model.yaml`` read as :class:`FusionModelConfig`) is any callable from the
input tensor ``[B, F + 3]`` (the features of
:mod:`radfusion.operators.fusion_features`, then the three presence flags) to the output
columns its model.yaml lists: in this process (TorchScript) or on a Triton server, as for
segmentation. The operator builds the vector, runs the model and reads the columns by name;
it never invents an input: a modality that is missing is absent for the model too, and the
result says which and why. When EGFR was tested, the result reports the test (with its
source), not the model's probability.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from monai.deploy.core import Fragment, Operator, OperatorSpec

from radfusion.model_config import FusionModelConfig, ModelConfigError
from radfusion.operators.fusion_features import (
    FEATURES,
    MODALITIES,
    FusionInputs,
    fusion_inputs,
    primary_tumour,
)
from radfusion.operators.measurement import Measured
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.radiomics import Radiomics
from radfusion.patient_context import ContextOutcome, Fact, PatientContext, Source

__all__ = [
    "LABELS",
    "Contribution",
    "EGFRResult",
    "FusionModel",
    "FusionOperator",
    "FusionResult",
    "LoadedFusion",
    "check_model",
    "predict",
]

log = logging.getLogger("radfusion.operators.fusion")

FusionModel = Callable[[torch.Tensor], torch.Tensor]
"""``[B, F + 3]`` float32 → ``[B, len(outputs)]`` float32 (see the module docstring)."""

RiskGroup = Literal["low", "intermediate", "high"]

LABELS: dict[str, str] = {
    "log1p_total_volume_ml": "total tumour volume",
    "tumour_count": "number of tumours",
    "primary_log1p_volume_ml": "primary tumour volume",
    "primary_max_diameter_cm": "primary tumour diameter",
    "primary_sphericity": "primary tumour sphericity",
    "primary_ground_glass_fraction": "primary tumour ground-glass fraction",
    "primary_mean_hu_100": "primary tumour mean attenuation",
    "primary_sd_hu_100": "primary tumour attenuation SD",
    "primary_skewness": "primary tumour attenuation skewness",
    "primary_excess_kurtosis": "primary tumour attenuation kurtosis",
    "primary_glcm_log1p_contrast": "primary tumour texture contrast (GLCM)",
    "primary_glcm_joint_entropy": "primary tumour texture entropy (GLCM)",
    "primary_glrlm_short_run_emphasis": "primary tumour short-run emphasis (GLRLM)",
    "primary_glrlm_run_entropy": "primary tumour run entropy (GLRLM)",
    "age_decades_from_67": "age",
    "male": "sex",
    "stage_minus_1": "stage group",
    "stage_missing": "stage not recorded",
    "ecog": "ECOG performance status",
    "ecog_missing": "ECOG not recorded",
    "smoking_current": "current smoker",
    "smoking_former": "former smoker",
    "smoking_missing": "smoking status not recorded",
    "log1p_cea": "CEA",
    "cea_missing": "CEA not recorded",
    "log1p_tmb": "tumour mutational burden",
    "tmb_tested": "TMB measured",
}
"""Words for the features in reports (genes: ``<gene> mutated``/``<gene> tested``)."""


def _label(feature: str) -> str:
    if feature in LABELS:
        return LABELS[feature]
    gene, _, what = feature.partition("_")
    return f"{gene} {what}"


@dataclass(frozen=True)
class Contribution:
    """What one input (a feature or a modality) added to the progression log-odds."""

    name: str
    label: str
    log_odds: float


@dataclass(frozen=True)
class EGFRResult:
    """EGFR: the record's test result (``tested``: ``status`` and its ``sources``) or, when
    untested, the model's probability of a mutation and its uncertainty."""

    tested: bool
    status: str | None = None  # "present" | "absent" when tested
    sources: tuple[str, ...] = ()
    probability: float | None = None
    sd: float | None = None


@dataclass(frozen=True)
class FusionResult:
    """One patient's fusion outputs. Probabilities in [0, 1]; ``*_sd`` are standard
    deviations (members' spread plus, for a missing modality, multiple imputation).
    Contributions are to the progression log-odds; ``baseline_log_odds`` plus the modalities'
    contributions is the log-odds of ``progression_probability``."""

    model: FusionModelConfig
    served_by: str  # "in process" or the Triton server and model version
    progression_probability: float
    progression_sd: float
    risk_group: RiskGroup
    risk_score: float
    risk_sd: float
    egfr: EGFRResult
    present: dict[str, bool]
    missing: dict[str, str]  # modality → why it is missing
    baseline_log_odds: float
    modalities: tuple[Contribution, ...]
    top_features: tuple[Contribution, ...]
    sources: tuple[str, ...]  # the FHIR resources used (type/id/_history/version)
    patient: str | None = None  # the FHIR Patient the context was read for ("Patient/id")
    primary_volume_ml: float | None = None  # the largest tumour the imaging inputs describe
    primary_diameter_mm: float | None = None  # its maximum 3D diameter

    @property
    def used(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if self.present[m])

    def describe(self) -> str:
        """One line for logs and previews (no PHI)."""
        egfr = (
            f"EGFR tested: {self.egfr.status}"
            if self.egfr.tested
            else f"EGFR {self.egfr.probability:.2f} ± {self.egfr.sd:.2f}"
        )
        top = ", ".join(f"{c.label} {c.log_odds:+.2f}" for c in self.top_features[:3])
        return (
            f"progression within 12 months {self.progression_probability:.2f} ± "
            f"{self.progression_sd:.2f} ({self.risk_group} risk); {egfr}; from "
            f"{', '.join(self.used) or 'nothing'}; top: {top}"
        )


@dataclass(frozen=True)
class LoadedFusion:
    """A fusion model ready to run: the callable, its model.yaml and where it runs (for the
    results: "in process (TorchScript)" or the Triton server and model version)."""

    model: FusionModel
    config: FusionModelConfig
    served_by: str


def check_model(model: FusionModelConfig) -> None:
    """Check that ``model`` takes the vector this version builds and gives the outputs read.

    Raises:
        ModelConfigError: its features differ from :data:`FEATURES` or an output is missing.
    """
    if model.features != FEATURES:
        raise ModelConfigError(
            f"fusion model {model.name} {model.version} was trained on other inputs than this "
            f"radfusion builds ({len(model.features)} vs {len(FEATURES)} features"
            f"{'' if len(model.features) != len(FEATURES) else ', in another order or naming'})"
        )
    needed = {"progression_probability", "progression_sd", "risk_score", "risk_sd"}
    needed |= {"egfr_probability", "egfr_sd", "baseline_log_odds"}
    needed |= {f"contribution_{m}" for m in MODALITIES}
    lacking = sorted(needed - set(model.outputs))
    if lacking:
        raise ModelConfigError(f"fusion model {model.name}: outputs lack {', '.join(lacking)}")


def _missing_reasons(
    inputs: FusionInputs, radiomics: Radiomics | None, outcome: ContextOutcome | None
) -> dict[str, str]:
    reasons: dict[str, str] = {}
    if not inputs.present[0]:
        if radiomics is None:
            reasons["imaging"] = "radiomics are off"
        elif not radiomics.tumours:
            reasons["imaging"] = "no tumour was found"
        else:
            reasons["imaging"] = "no tumour's radiomics could be computed"
    if outcome is None:
        context_reason = "no clinical data source is configured"
    elif outcome.context is None:
        context_reason = outcome.describe()
    else:
        context_reason = ""
    context = outcome.context if outcome is not None else None
    if not inputs.present[1]:
        reasons["clinical"] = context_reason or "the record has no age, sex, stage, ECOG or smoking"
    if not inputs.present[2]:
        if context_reason:
            reasons["genomic"] = context_reason
        elif context is not None and context.genomics_withheld:
            reasons["genomic"] = context.genomics_withheld
        else:
            reasons["genomic"] = "no gene tested and no TMB as of the study date"
    return reasons


def _sources(context: PatientContext | None) -> tuple[str, ...]:
    """Every resource the context's facts came from, each once, in a stable order."""
    if context is None:
        return ()
    found: list[Source] = [context.patient]
    facts: list[Fact[Any]] = [
        context.age_years,
        context.sex,
        context.tmb,
        context.cancer,
        context.stage_group,
        context.ecog,
        context.smoking,
        *context.tumour_markers.values(),
    ]
    for fact in facts:
        found.extend(fact.sources)
    for gene in context.genes.values():
        found.extend(gene.sources)
    return tuple(dict.fromkeys(s.versioned for s in found))


def _egfr(context: PatientContext | None, probability: float, sd: float) -> EGFRResult:
    gene = (
        context.genes.get("EGFR") if context is not None and not context.genomics_withheld else None
    )
    if gene is not None and gene.status in ("present", "absent"):
        return EGFRResult(True, gene.status, tuple(s.versioned for s in gene.sources))
    return EGFRResult(False, probability=probability, sd=sd)


def predict(
    model: FusionModel,
    config: FusionModelConfig,
    tumours: Sequence[dict[str, float]],
    radiomics: Radiomics | None,
    outcome: ContextOutcome | None,
    *,
    served_by: str = "in process",
    top: int = 5,
) -> FusionResult | None:
    """Fuse one patient's tumours' radiomics (name → value per tumour) and context.

    None when no modality at all is present (nothing to fuse: the model was never trained
    on an empty input).

    Raises:
        ValueError: the model's output is not one finite row of ``len(config.outputs)``.
    """
    context = outcome.context if outcome is not None else None
    inputs = fusion_inputs(tumours, context)
    if not any(inputs.present):
        return None
    row = np.concatenate([inputs.values, np.asarray(inputs.present, np.float32)])
    with torch.inference_mode():
        out = model(torch.from_numpy(row[None, :]).float())
    values = np.asarray(out, dtype=np.float64)
    if values.shape != (1, len(config.outputs)) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"fusion model {config.name}: output {values.shape} is not one finite row of "
            f"{len(config.outputs)}"
        )
    column = dict(zip(config.outputs, values[0].tolist(), strict=True))
    probability = float(column["progression_probability"])
    low, high = config.risk_groups
    group: RiskGroup = (
        "low" if probability < low else "intermediate" if probability < high else "high"
    )
    features = [
        Contribution(f, _label(f), column[f"contribution_{f}"])
        for f in FEATURES
        if f"contribution_{f}" in column
    ]
    features = [c for c in features if abs(c.log_odds) > 1e-6]
    features.sort(key=lambda c: -abs(c.log_odds))
    present = dict(zip(MODALITIES, inputs.present, strict=True))
    primary = primary_tumour(tumours)
    return FusionResult(
        model=config,
        served_by=served_by,
        progression_probability=probability,
        progression_sd=float(column["progression_sd"]),
        risk_group=group,
        risk_score=float(column["risk_score"]),
        risk_sd=float(column["risk_sd"]),
        egfr=_egfr(context, float(column["egfr_probability"]), float(column["egfr_sd"])),
        present=present,
        missing=_missing_reasons(inputs, radiomics, outcome),
        baseline_log_odds=float(column["baseline_log_odds"]),
        modalities=tuple(
            Contribution(m, m, float(column[f"contribution_{m}"])) for m in MODALITIES
        ),
        top_features=tuple(features[:top]),
        sources=_sources(context),
        patient=context.patient.reference if context is not None else None,
        primary_volume_ml=float(primary["volume"]) / 1000.0 if primary else None,
        primary_diameter_mm=float(primary["max_3d_diameter"]) if primary else None,
    )


def _tumour_values(radiomics: Radiomics | None) -> list[dict[str, float]]:
    if radiomics is None:
        return []
    return [dict(t.values) for t in radiomics.tumours if t.error is None]


class FusionOperator(Operator):
    """Inputs ``measured``, ``radiomics``, ``context`` → output ``fusion`` (see the module
    docstring). ``loaded`` None: fusion is off (emits None).

    Raises:
        ModelConfigError: from the constructor, when the model does not take this version's
            inputs (:func:`check_model`).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        loaded: LoadedFusion | None,
        **kw: object,
    ) -> None:
        if loaded is not None:
            check_model(loaded.config)
        self.loaded = loaded
        self.result: FusionResult | None = None  # the last run's, read by the app afterwards
        self.timings: dict[str, float] = {}  # this operator's stage seconds, read after a run
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("measured")
        spec.input("radiomics")
        spec.input("context")
        spec.output("fusion")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        measured = op_input.receive("measured")
        radiomics: Radiomics | None = op_input.receive("radiomics")
        outcome: ContextOutcome | None = op_input.receive("context")
        self.timings.clear()
        result = None
        analysed = isinstance(measured, Measured) and measured.result is not None
        if self.loaded is not None and analysed:
            started = time.perf_counter()
            result = predict(
                self.loaded.model,
                self.loaded.config,
                _tumour_values(radiomics),
                radiomics,
                outcome,
                served_by=self.loaded.served_by,
            )
            self.timings["fusion"] = time.perf_counter() - started
            if result is not None:
                log.info("fusion: %s", result.describe())
        self.result = result
        op_output.emit(result, "fusion")
