"""FHIR write-back of a fusion result (``fhir.writeback: true``): the risk where clinicians look.

For a study whose fusion used a patient's record, four kinds of resources go to the FHIR
server the record came from, in this order (each referencing the ones before):

1. an **ImagingStudy** of the study (identifier ``urn:dicom:uid`` = ``urn:oid:`` + Study
   Instance UID): the one already there, or a minimal one created for it;
2. **Observations** (status preliminary): the predicted EGFR mutation probability when EGFR
   was not tested (never when it was: the test is the answer), and the primary tumour's volume
   and maximum 3D diameter;
3. a **DiagnosticReport** (status preliminary) for the study, its results the Observations;
4. a **RiskAssessment** of progression within 12 months (probability, qualitative risk, the
   SD and what was used and missing in its note), part of the report (``parent``).

Each carries two identifiers: radfusion's (:data:`IDENTIFIER_SYSTEM`, value
``<StudyInstanceUID>:<model name>:<kind>``), by which a later run finds and updates it instead
of creating another, and the fusion SR's SOP Instance UID (``urn:dicom:uid``), which cites the
DICOM result it came from. An update keeps the resource's id; a create is conditional
(``If-None-Exist`` on radfusion's identifier). Every text says the model is a demonstration
when it is one.

Failures never touch the DICOM results, which are written before: a refusal (e.g. 403, 422)
or an unreachable server (after the client's retries) is returned as an outcome with its
reason, which the app reports.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from radfusion.integrations.fhir.client import FhirClient, FhirError, FhirUnavailable
from radfusion.logs import uid_tag
from radfusion.operators.fusion import FusionResult
from radfusion.operators.results import DEMONSTRATION_NOTICE

__all__ = ["IDENTIFIER_SYSTEM", "WritebackOutcome", "fusion_resources", "write_back"]

log = logging.getLogger("radfusion.apps.lung_ct.writeback")

IDENTIFIER_SYSTEM = "urn:radfusion:result"
DICOM_UID = "urn:dicom:uid"
CONCEPTS = "urn:radfusion:concept"  # radfusion's own codes, where no standard one fits
_UCUM = "http://unitsofmeasure.org"
_RISK = {"low": "low", "intermediate": "moderate", "high": "high"}


@dataclass(frozen=True)
class WritebackOutcome:
    """``written`` (with the references), ``skipped`` (nothing to write, and why),
    ``refused`` or ``unavailable`` (the reason, without PHI)."""

    status: Literal["written", "skipped", "refused", "unavailable"]
    references: tuple[str, ...] = ()
    reason: str = ""

    def describe(self) -> str:
        if self.status == "written":
            return f"FHIR write-back: {', '.join(self.references)}"
        return f"FHIR write-back {self.status}: {self.reason}"


@dataclass
class _Planned:
    kind: str
    resource: dict[str, Any]
    refs: dict[str, str] = field(default_factory=dict)


def _identifiers(study_uid: str, model: str, kind: str, sr_uid: str) -> list[dict[str, str]]:
    return [
        {"system": IDENTIFIER_SYSTEM, "value": f"{study_uid}:{model}:{kind}"},
        {"system": DICOM_UID, "value": f"urn:oid:{sr_uid}"},
    ]


def _method(fusion: FusionResult) -> dict[str, str]:
    model = fusion.model
    notice = f" ({DEMONSTRATION_NOTICE})" if model.demonstration else ""
    return {"text": f"{model.name} {model.version}{notice}"}


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": round(value, 4), "unit": unit, "system": _UCUM, "code": code}


def _note(fusion: FusionResult) -> str:
    parts = [
        f"SD {fusion.progression_sd:.3f}",
        f"inputs used: {', '.join(fusion.used) or 'none'}",
    ]
    parts += [f"{m} missing: {why}" for m, why in fusion.missing.items()]
    top = "; ".join(f"{c.label} {c.log_odds:+.2f}" for c in fusion.top_features[:5])
    if top:
        parts.append(f"top contributions to the log-odds: {top}")
    if fusion.model.demonstration:
        parts.append(DEMONSTRATION_NOTICE)
    return ". ".join(parts)


def fusion_resources(
    fusion: FusionResult, *, study_uid: str, sr_uid: str, study_date: dt.date | None
) -> list[tuple[str, dict[str, Any]]]:
    """The resources to write, in order, as ``(kind, resource)``; references between them are
    placeholders ``{kind}`` that :func:`write_back` fills with the server's ids.

    Raises:
        ValueError: the fusion result names no patient (no context was read).
    """
    if not fusion.patient:
        raise ValueError("the fusion used no patient record: nothing to write back")
    subject = {"reference": fusion.patient}
    model = fusion.model.name

    def ids(kind: str) -> list[dict[str, str]]:
        return _identifiers(study_uid, model, kind, sr_uid)

    planned: list[tuple[str, dict[str, Any]]] = []
    observations: list[str] = []
    if not fusion.egfr.tested and fusion.egfr.probability is not None:
        observations.append("egfr")
        planned.append(
            (
                "egfr",
                {
                    "resourceType": "Observation",
                    "identifier": ids("egfr"),
                    "status": "preliminary",
                    "code": {
                        "coding": [{"system": CONCEPTS, "code": "egfr-mutation-probability"}],
                        "text": "EGFR mutation, probability predicted from imaging and "
                        "clinical data (not a test result)",
                    },
                    "subject": subject,
                    "derivedFrom": [{"reference": "{imaging}"}],
                    "valueQuantity": _quantity(fusion.egfr.probability, "probability", "1"),
                    "component": [
                        {
                            "code": {"coding": [{"system": CONCEPTS, "code": "sd"}], "text": "SD"},
                            "valueQuantity": _quantity(fusion.egfr.sd or 0.0, "probability", "1"),
                        },
                        {
                            "code": {
                                "coding": [
                                    {
                                        "system": "http://loinc.org",
                                        "code": "48018-6",
                                        "display": "Gene studied [ID]",
                                    }
                                ]
                            },
                            "valueCodeableConcept": {
                                "coding": [
                                    {
                                        "system": "http://www.genenames.org/geneId",
                                        "code": "HGNC:3236",
                                        "display": "EGFR",
                                    }
                                ]
                            },
                        },
                    ],
                    "method": _method(fusion),
                },
            )
        )
    measurements = (
        (
            "volume",
            fusion.primary_volume_ml,
            {"system": "http://snomed.info/sct", "code": "118565006", "display": "Volume"},
            "primary lung tumour volume",
            ("mL", "mL"),
        ),
        (
            "diameter",
            fusion.primary_diameter_mm,
            {"system": CONCEPTS, "code": "max-3d-diameter"},
            "primary lung tumour maximum 3D diameter",
            ("mm", "mm"),
        ),
    )
    for kind, value, coding, text, (unit, code) in measurements:
        if value is None:
            continue
        observations.append(kind)
        planned.append(
            (
                kind,
                {
                    "resourceType": "Observation",
                    "identifier": ids(kind),
                    "status": "preliminary",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "observation-category",
                                    "code": "imaging",
                                }
                            ]
                        }
                    ],
                    "code": {"coding": [coding], "text": text},
                    "subject": subject,
                    "derivedFrom": [{"reference": "{imaging}"}],
                    "valueQuantity": _quantity(value, unit, code),
                    "method": _method(fusion),
                },
            )
        )
    summary = (
        f"Progression within 12 months: {fusion.progression_probability:.2f} "
        f"(SD {fusion.progression_sd:.2f}, {fusion.risk_group} risk)."
    )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": ids("report"),
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}],
            "text": "CT chest: fusion risk assessment",
        },
        "subject": subject,
        "imagingStudy": [{"reference": "{imaging}"}],
        "result": [{"reference": "{" + kind + "}"} for kind in observations],
        "conclusion": f"{summary} {_note(fusion)}.",
    }
    if study_date is not None:
        report["effectiveDateTime"] = study_date.isoformat()
    planned.append(("report", report))
    planned.append(
        (
            "risk",
            {
                "resourceType": "RiskAssessment",
                "identifier": ids("risk"),
                "status": "preliminary",
                "subject": subject,
                "parent": {"reference": "{report}"},
                "method": _method(fusion),
                "basis": [{"reference": "{imaging}"}]
                + [{"reference": "{" + kind + "}"} for kind in observations],
                "prediction": [
                    {
                        "outcome": {"text": "Progression or death within 12 months"},
                        "probabilityDecimal": round(fusion.progression_probability, 4),
                        "qualitativeRisk": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "risk-probability",
                                    "code": _RISK[fusion.risk_group],
                                }
                            ]
                        },
                        "whenRange": {"high": _quantity(12, "months", "mo")},
                    }
                ],
                "note": [{"text": _note(fusion)}],
            },
        )
    )
    return planned


def _fill(value: Any, refs: Mapping[str, str]) -> Any:
    """``value`` with every ``{"reference": "{kind}"}`` placeholder replaced."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.startswith("{") and ref.endswith("}"):
            return {**value, "reference": refs[ref[1:-1]]}
        return {k: _fill(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, refs) for v in value]
    return value


def _upsert(client: FhirClient, resource: dict[str, Any]) -> str:
    """Update the resource carrying radfusion's identifier, or create it; its reference."""
    kind = str(resource["resourceType"])
    token = f"{IDENTIFIER_SYSTEM}|{resource['identifier'][0]['value']}"
    found = client.search(kind, {"identifier": token}).match
    if len(found) > 1:
        raise FhirError(f"{len(found)} {kind} resources carry radfusion's identifier; not guessing")
    if found:
        stored = client.update({**resource, "id": found[0]["id"]})
    else:
        stored = client.create(resource, if_none_exist=f"identifier={token}")
    return f"{kind}/{stored['id']}"


def _imaging_study(
    client: FhirClient, study_uid: str, subject: str, study_date: dt.date | None
) -> str:
    """The study's ImagingStudy: the one the server has, else a minimal one made for it."""
    token = f"{DICOM_UID}|urn:oid:{study_uid}"
    found = client.search("ImagingStudy", {"identifier": token}).match
    if found:
        return f"ImagingStudy/{found[0]['id']}"
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{study_uid}"}],
        "status": "available",
        "subject": {"reference": subject},
    }
    if study_date is not None:
        study["started"] = study_date.isoformat()
    stored = client.create(study, if_none_exist=f"identifier={token}")
    return f"ImagingStudy/{stored['id']}"


def write_back(
    client: FhirClient,
    fusion: FusionResult,
    *,
    study_uid: str,
    sr_uid: str,
    study_date: dt.date | None,
) -> WritebackOutcome:
    """Write ``fusion`` for the study (see the module docstring); never raises for the
    server's answers: refusals and outages are outcomes."""
    if not fusion.patient:
        return WritebackOutcome("skipped", reason="no patient record was used")
    try:
        refs = {"imaging": _imaging_study(client, study_uid, fusion.patient, study_date)}
        for kind, resource in fusion_resources(
            fusion, study_uid=study_uid, sr_uid=sr_uid, study_date=study_date
        ):
            refs[kind] = _upsert(client, _fill(resource, refs))
    except FhirUnavailable as err:
        log.warning("FHIR write-back for study %s: unavailable", uid_tag(study_uid))
        return WritebackOutcome("unavailable", reason=str(err))
    except FhirError as err:
        log.warning("FHIR write-back for study %s: refused", uid_tag(study_uid))
        return WritebackOutcome("refused", reason=str(err))
    log.info("FHIR write-back for study %s: %d resources", uid_tag(study_uid), len(refs))
    return WritebackOutcome("written", tuple(refs.values()))
