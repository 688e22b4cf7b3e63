"""Fusion SR: a :class:`FusionResult` → a TID 1500 Measurement Report of its own (series 903).

The fusion outputs are about the patient, not about a region of an image, so they form one
TID 1501 "Measurement and Qualitative Evaluation Group" (tracking identifier "Fusion risk
assessment", finding: neoplasm of lung), in a report apart from the lung-ct SR: the
measurement SR keeps only groups with image coordinates (OHIF 3.13 cannot open a report in
which a group has none; see :mod:`radfusion.operators.sr_writer`), and the fusion can be
reissued without touching the image results. Its evidence is the CT series and the lung-ct SR
whose tumours it used.

The group holds:

- NUM (TID 300, unit "1"): the probability of progression within 12 months and its SD, the
  risk score for progression-free time and its SD, the EGFR mutation probability and its SD
  (only when EGFR was not tested), the baseline log-odds and each modality's contribution to
  the progression log-odds;
- CODE: the risk group, each modality as used or missing, and, when EGFR was tested, the
  record's result (SNOMED CT Present/Absent);
- TEXT: why each missing modality is missing, the top contributing inputs, the EGFR test's
  source, the FHIR resources used (type/id/_history/version), and where the model ran.

Concepts without a standard code use the private coding scheme ``99RADFUSION``
(:data:`CODES`), declared in the Coding Scheme Identification Sequence. The algorithm (TID
4019) is the fusion model, with its version and weights' digest; a demonstration model says so
in the series description.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from radfusion.operators.fusion import Contribution, FusionResult
from radfusion.operators.result_identity import save_atomically, with_type2_attributes
from radfusion.operators.results import AlgorithmInfo
from radfusion.operators.sr_writer import (
    CT_CHEST,
    PRIVATE_SCHEME,
    algorithm_identification,
    algorithm_report,
    declare_private_scheme,
    distinct_sources,
    image_library,
    observation_context,
)

__all__ = [
    "CODES",
    "SCHEME",
    "SERIES_NUMBER",
    "build_fusion_sr",
    "fusion_algorithm",
    "write_fusion_sr",
]

SERIES_NUMBER = 903  # after the SEG (901) and the lung-ct SR (902)

SCHEME = PRIVATE_SCHEME


def _private(value: str, meaning: str) -> Code:
    return Code(value, SCHEME, meaning)


CODES: dict[str, Code] = {
    "assessment": _private("RF0001", "Fusion risk assessment"),
    "progression_probability": _private("RF0010", "Probability of progression within 12 months"),
    "progression_sd": _private("RF0011", "Uncertainty (SD) of the progression probability"),
    "risk_score": _private("RF0012", "Progression-free survival risk score"),
    "risk_sd": _private("RF0013", "Uncertainty (SD) of the risk score"),
    "risk_group": _private("RF0014", "Progression risk group"),
    "low": _private("RF0015", "Low risk"),
    "intermediate": _private("RF0016", "Intermediate risk"),
    "high": _private("RF0017", "High risk"),
    "egfr_probability": _private("RF0020", "Predicted probability of an EGFR mutation"),
    "egfr_sd": _private("RF0021", "Uncertainty (SD) of the EGFR probability"),
    "egfr_tested": _private("RF0022", "EGFR mutation status from the patient record"),
    "baseline_log_odds": _private("RF0030", "Baseline progression log-odds"),
    "contribution_imaging": _private("RF0031", "Imaging contribution to progression log-odds"),
    "contribution_clinical": _private("RF0032", "Clinical contribution to progression log-odds"),
    "contribution_genomic": _private("RF0033", "Genomic contribution to progression log-odds"),
    "modality_used": _private("RF0040", "Input modality used"),
    "modality_missing": _private("RF0041", "Input modality missing"),
    "imaging": _private("RF0042", "Imaging (tumour radiomics)"),
    "clinical": _private("RF0043", "Clinical record"),
    "genomic": _private("RF0044", "Genomic results"),
    "missing_reason": _private("RF0050", "Why an input modality is missing"),
    "top_contributions": _private("RF0051", "Top contributions to progression log-odds"),
    "fhir_sources": _private("RF0052", "FHIR resources used"),
    "egfr_sources": _private("RF0053", "Source of the EGFR result"),
    "served_by": _private("RF0054", "Where the model ran"),
}
"""Every private concept the fusion SR uses."""

_NO_UNITS = Code("1", "UCUM", "no units")
_PRESENT = Code("52101004", "SCT", "Present")
_ABSENT = Code("2667000", "SCT", "Absent")
_NEOPLASM_OF_LUNG = Code("126713003", "SCT", "Neoplasm of lung")


def fusion_algorithm(result: FusionResult) -> AlgorithmInfo:
    """The fusion model as the algorithm of the report (TID 4019, equipment)."""
    model = result.model
    return AlgorithmInfo(
        name=model.name,
        version=model.version,
        demonstration=model.demonstration,
        parameters=(("model_sha256", model.sha256[:16]), ("inference", result.served_by)),
    )


def _text(concept: str, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=CODES[concept], value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _contributions(items: Sequence[Contribution]) -> str:
    return "; ".join(f"{c.label} {c.log_odds:+.3f}" for c in items)


def _group(
    result: FusionResult, tracking_uid: str, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    numbers = {
        "progression_probability": result.progression_probability,
        "progression_sd": result.progression_sd,
        "risk_score": result.risk_score,
        "risk_sd": result.risk_sd,
    }
    if not result.egfr.tested:
        numbers["egfr_probability"] = float(result.egfr.probability or 0.0)
        numbers["egfr_sd"] = float(result.egfr.sd or 0.0)
    numbers["baseline_log_odds"] = result.baseline_log_odds
    numbers |= {f"contribution_{c.name}": c.log_odds for c in result.modalities}
    measurements = [
        hd.sr.Measurement(
            name=CODES[k], value=round(v, 6), unit=_NO_UNITS, algorithm_id=algorithm_id
        )
        for k, v in numbers.items()
    ]
    evaluations = [hd.sr.QualitativeEvaluation(CODES["risk_group"], CODES[result.risk_group])]
    for modality, present in result.present.items():
        which = "modality_used" if present else "modality_missing"
        evaluations.append(hd.sr.QualitativeEvaluation(CODES[which], CODES[modality]))
    if result.egfr.tested:
        status = _PRESENT if result.egfr.status == "present" else _ABSENT
        evaluations.append(hd.sr.QualitativeEvaluation(CODES["egfr_tested"], status))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier="Fusion risk assessment"
        ),
        finding_type=_NEOPLASM_OF_LUNG,
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    texts = [_text("missing_reason", f"{m}: {why}") for m, why in result.missing.items()]
    if result.top_features:
        texts.append(_text("top_contributions", _contributions(result.top_features)))
    if result.egfr.tested and result.egfr.sources:
        texts.append(_text("egfr_sources", ", ".join(result.egfr.sources)))
    if result.sources:
        texts.append(_text("fhir_sources", ", ".join(result.sources)))
    texts.append(_text("served_by", result.served_by))
    group[0].ContentSequence.extend(texts)
    return group


def build_fusion_sr(
    source_images: Sequence[Dataset],
    result: FusionResult,
    *,
    measurement_sr: Dataset | None,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> hd.sr.Comprehensive3DSR:
    """Build the fusion report for one analysed series (not written): same study as the
    sources, series 903, instance 1; complete, unverified, preliminary. ``measurement_sr`` (the
    lung-ct SR whose tumours the imaging inputs came from) joins the evidence.

    Raises:
        ValueError: as :func:`radfusion.operators.sr_writer.distinct_sources`.
    """
    sources = distinct_sources(source_images)
    first = with_type2_attributes(sources[0])
    algorithm = fusion_algorithm(result)
    algorithm_id = algorithm_identification(algorithm)
    tracking_uid = str(generate_uid(entropy_srcs=["radfusion-fusion-group", sop_instance_uid]))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(algorithm),
        procedure_reported=CT_CHEST,
        imaging_measurements=[_group(result, tracking_uid, algorithm_id)],
    )
    root = report[0]
    root.ContentSequence.insert(len(root.ContentSequence) - 1, image_library(sources))
    evidence = [first, *sources[1:], *([measurement_sr] if measurement_sr is not None else [])]
    sr = algorithm_report(
        root,
        evidence,
        algorithm,
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        holds="Fusion risk and EGFR",
    )
    declare_private_scheme(sr)
    return sr


def write_fusion_sr(
    source_images: Sequence[Dataset],
    result: FusionResult,
    *,
    measurement_sr: Dataset | None,
    series_instance_uid: str,
    sop_instance_uid: str,
    path: Path,
) -> Path:
    """:func:`build_fusion_sr`, written atomically to ``path``.

    Raises:
        ValueError: as :func:`build_fusion_sr`.
        OSError: the file cannot be written.
    """
    sr = build_fusion_sr(
        source_images,
        result,
        measurement_sr=measurement_sr,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
    )
    return save_atomically(sr, path)
