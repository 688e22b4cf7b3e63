"""FHIR R4 resources of one synthetic patient: the Bundle builder and the clinical resources.

:class:`Builder` collects a patient's resources with stable ``urn:uuid`` fullUrls, the HTEST
security label and an identifier naming each one for the ground truth; the ``add_*`` functions
add the Patient, ImagingStudy, Condition, staging, smoking status, performance status and CEA;
:func:`bundle_json` validates and serialises the transaction Bundle. Genomic reports are in
:mod:`radfusion.synth.cohort_fhir_genomics`. Synthetic data only: see
:mod:`radfusion.synth.cohort`.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass
from typing import Any

import pydicom
from fhir.resources.R4B.bundle import Bundle

from radfusion.synth.cohort_clinical import (
    Clinical,
    Dates,
    Demographics,
    Identity,
    Imaging,
    Plan,
    Stage,
)
from radfusion.synth.cohort_codes import (
    AJCC,
    DCM_CT,
    DECOY_SYSTEM,
    ECOG_ANSWERS,
    KARNOFSKY_ANSWERS,
    LOINC_CEA,
    LOINC_ECOG,
    LOINC_KARNOFSKY,
    LOINC_SMOKING,
    LOINC_STAGE_GROUP,
    LOINC_STAGE_M,
    LOINC_STAGE_N,
    LOINC_STAGE_T,
    MCODE_HISTOLOGY_EXTENSION,
    MCODE_LATERALITY_EXTENSION,
    RESOURCE_KEY_SYSTEM,
    SCT_ADENOCARCINOMA_MORPHOLOGY,
    SCT_AJCC_8,
    SCT_LATERALITY,
    SCT_LUNG,
    SCT_LUNG_ADENOCARCINOMA,
    SCT_LUNG_SQUAMOUS,
    SCT_NSCLC,
    SCT_SMOKING,
    SCT_SQUAMOUS_MORPHOLOGY,
    SCT_THORAX,
    STAGE_AJCC,
    UCUM,
    Code,
)
from radfusion.synth.ct_series import SynthStudy

__all__ = [
    "Builder",
    "Entry",
    "add_cea",
    "add_imaging_study",
    "add_patient",
    "add_performance",
    "add_primary_cancer",
    "add_smoking",
    "add_staging",
    "bundle_json",
    "condition_code",
    "instant",
    "morphology",
    "obs_component",
]

# Seeds the fullUrls, so a patient's resources keep their urn:uuid from run to run.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://radfusion.example/synth/cohort")
# HL7 terminology that only the resources' structure needs (the ground truth does not name it).
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_OBS_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_HTEST = {"system": _ACT_REASON, "code": "HTEST", "display": "test health data"}
_MRN_TYPE = Code(_IDENTIFIER_TYPE, "MR", "Medical record number")
_ACCESSION_TYPE = Code(_IDENTIFIER_TYPE, "ACSN", "Accession ID")

# -- the builder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One resource of the Bundle and what the ground truth says about it."""

    key: str
    resource: dict[str, Any]
    code: str | None  # system|code of the resource's main code
    date: datetime.date | None  # effective date, else the date of issued (what a filter uses)
    disregard: str | None  # why a correct client ignores it; None: it counts


def instant(day: datetime.date, hour: int = 10) -> str:
    """A FHIR instant on ``day`` at ``hour``:30 UTC (a fixed time keeps the output stable)."""
    return f"{day.isoformat()}T{hour:02d}:30:00Z"


class Builder:
    """Collects one patient's resources with stable ``urn:uuid`` fullUrls and key identifiers."""

    def __init__(self, patient_id: str, study_date: datetime.date) -> None:
        self.patient_id = patient_id
        self.study_date = study_date
        self.entries: list[Entry] = []

    def url(self, key: str) -> str:
        """The ``urn:uuid`` fullUrl of the resource named ``key``."""
        return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, f'{self.patient_id}/{key}')}"

    def ref(self, key: str) -> dict[str, str]:
        """A FHIR Reference to the resource named ``key``."""
        return {"reference": self.url(key)}

    def key_identifier(self, key: str) -> dict[str, str]:
        """The identifier naming the resource ``<PatientID>/<key>`` for the ground truth."""
        return {"system": RESOURCE_KEY_SYSTEM, "value": f"{self.patient_id}/{key}"}

    def add(
        self,
        key: str,
        resource: dict[str, Any],
        *,
        code: Code | None = None,
        disregard: str | None = None,
    ) -> None:
        """Add ``resource`` (meta and key identifier are filled in here)."""
        resource = {"resourceType": resource["resourceType"], "meta": {"security": [_HTEST]}} | {
            k: v for k, v in resource.items() if k != "resourceType"
        }
        if resource["resourceType"] != "Patient":
            resource["identifier"] = [*resource.get("identifier", []), self.key_identifier(key)]
        date = _resource_date(resource)
        if disregard is None and date is not None and date > self.study_date:
            disregard = "after-study-date"
        self.entries.append(Entry(key, resource, code.token() if code else None, date, disregard))

    def observation(
        self,
        key: str,
        code: Code,
        *,
        category: str | None,
        effective: datetime.date | None,
        issued: datetime.date | None = None,
        status: str = "final",
        disregard: str | None = None,
        **fields: Any,
    ) -> None:
        """Add an Observation about the patient."""
        resource: dict[str, Any] = {"resourceType": "Observation", "status": status}
        if category is not None:
            resource["category"] = [
                {"coding": [{"system": _OBS_CATEGORY, "code": category}]},
            ]
        resource["code"] = code.concept()
        resource["subject"] = self.ref("patient")
        if effective is not None:
            resource["effectiveDateTime"] = effective.isoformat()
        if issued is not None:
            resource["issued"] = instant(issued)
        resource.update(fields)
        self.add(key, resource, code=code, disregard=disregard)


def _resource_date(resource: dict[str, Any]) -> datetime.date | None:
    """The date a date filter uses: effective, else issued (else recorded or started)."""
    for name in ("effectiveDateTime", "issued", "recordedDate", "started"):
        if name in resource:
            return datetime.date.fromisoformat(resource[name][:10])
    return None


def obs_component(code: Code, **value: Any) -> dict[str, Any]:
    """An Observation component: ``code`` and its ``value[x]``."""
    return {"code": code.concept(), **value}


# -- clinical resources --------------------------------------------------------------------------


def add_patient(b: Builder, ident: Identity, demo: Demographics) -> None:
    """Add the Patient: MRN and decoy identifiers, name, gender and birth date."""
    b.add(
        "patient",
        {
            "resourceType": "Patient",
            "identifier": [
                {
                    "use": "usual",
                    "type": _MRN_TYPE.concept(),
                    "system": ident.system,
                    "value": ident.patient_id,
                },
                {"use": "secondary", "system": DECOY_SYSTEM, "value": ident.decoy_value},
            ],
            "active": True,
            "name": [{"use": "official", "family": demo.family, "given": [demo.given]}],
            "gender": demo.sex,
            "birthDate": demo.birth_date.isoformat(),
        },
    )


def add_imaging_study(b: Builder, ct: SynthStudy, header: pydicom.Dataset) -> None:
    """Add the ImagingStudy of the CT written for the patient (one series)."""
    n = len(ct.files)
    b.add(
        "imaging-study",
        {
            "resourceType": "ImagingStudy",
            "identifier": [
                {"system": "urn:dicom:uid", "value": f"urn:oid:{ct.StudyInstanceUID}"},
                {"type": _ACCESSION_TYPE.concept(), "value": str(header.AccessionNumber)},
            ],
            "status": "available",
            "modality": [DCM_CT.coding()],
            "subject": b.ref("patient"),
            "started": f"{b.study_date.isoformat()}T09:00:00Z",
            "numberOfSeries": 1,
            "numberOfInstances": n,
            "description": str(header.StudyDescription),
            "series": [
                {
                    "uid": ct.SeriesInstanceUID,
                    "number": int(header.SeriesNumber),
                    "modality": DCM_CT.coding(),
                    "description": str(header.SeriesDescription),
                    "numberOfInstances": n,
                    "bodySite": SCT_THORAX.coding(),
                }
            ],
        },
        code=DCM_CT,
    )


def condition_code(clinical: Clinical) -> Code:
    """The Condition's code: the histology's, or only the generic NSCLC code."""
    if clinical.generic_code:
        return SCT_NSCLC
    return SCT_LUNG_ADENOCARCINOMA if clinical.histology == "adenocarcinoma" else SCT_LUNG_SQUAMOUS


def morphology(histology: str) -> Code:
    """The histology's SNOMED morphology (the mCODE histology extension's value)."""
    return (
        SCT_ADENOCARCINOMA_MORPHOLOGY if histology == "adenocarcinoma" else SCT_SQUAMOUS_MORPHOLOGY
    )


def _stage_value(stage: Stage) -> Code:
    return Code(AJCC, STAGE_AJCC[stage.group], stage.group)


def add_primary_cancer(
    b: Builder, clinical: Clinical, stage: Stage, imaging: Imaging, dates: Dates
) -> None:
    """Add the mCODE PrimaryCancerCondition: code, histology, laterality and stage summary."""
    code = condition_code(clinical)
    b.add(
        "primary-cancer",
        {
            "resourceType": "Condition",
            "extension": [
                {
                    "url": MCODE_HISTOLOGY_EXTENSION,
                    "valueCodeableConcept": morphology(clinical.histology).concept(),
                }
            ],
            "clinicalStatus": Code(_CONDITION_CLINICAL, "active", "Active").concept(),
            "verificationStatus": Code(_CONDITION_VERIFICATION, "confirmed", "Confirmed").concept(),
            "category": [
                Code(_CONDITION_CATEGORY, "problem-list-item", "Problem List Item").concept()
            ],
            "code": code.concept(),
            "bodySite": [
                {
                    "extension": [
                        {
                            "url": MCODE_LATERALITY_EXTENSION,
                            "valueCodeableConcept": SCT_LATERALITY[imaging.primary_side].concept(),
                        }
                    ],
                    "coding": [SCT_LUNG.coding()],
                }
            ],
            "subject": b.ref("patient"),
            "onsetDateTime": dates.diagnosis.isoformat(),
            "recordedDate": dates.diagnosis.isoformat(),
            "stage": [
                {
                    "summary": _stage_value(stage).concept(),
                    "assessment": [b.ref("stage-group")],
                    "type": LOINC_STAGE_GROUP.concept(),
                }
            ],
        },
        code=code,
    )


def add_staging(b: Builder, stage: Stage, dates: Dates) -> None:
    """Add the TNM Observations and the stage group that has them as members."""
    common: dict[str, Any] = {  # keyword arguments of Builder.observation
        "category": None,
        "effective": dates.stage,
        "focus": [b.ref("primary-cancer")],
        "method": SCT_AJCC_8.concept(),
    }
    for key, code, value in (
        ("stage-t", LOINC_STAGE_T, f"c{stage.t}"),
        ("stage-n", LOINC_STAGE_N, f"c{stage.n}"),
        ("stage-m", LOINC_STAGE_M, f"c{stage.m}"),
    ):
        b.observation(key, code, valueCodeableConcept=Code(AJCC, value, value).concept(), **common)
    b.observation(
        "stage-group",
        LOINC_STAGE_GROUP,
        valueCodeableConcept=_stage_value(stage).concept(),
        hasMember=[b.ref("stage-t"), b.ref("stage-n"), b.ref("stage-m")],
        **common,
    )


def add_smoking(b: Builder, clinical: Clinical, dates: Dates) -> None:
    """Add the smoking status, after an older "daily smoker" one when the record has it."""
    if clinical.smoking_history:
        b.observation(
            "smoking-status-earlier",
            LOINC_SMOKING,
            category="social-history",
            effective=dates.smoking_history,
            valueCodeableConcept=SCT_SMOKING["current"].concept(),
            disregard="superseded-by-later-value",
        )
    b.observation(
        "smoking-status",
        LOINC_SMOKING,
        category="social-history",
        effective=dates.smoking,
        valueCodeableConcept=SCT_SMOKING[clinical.smoking].concept(),
    )


def add_performance(b: Builder, clinical: Clinical, plan: Plan, dates: Dates) -> None:
    """Add ECOG, Karnofsky when drawn, and the follow-up ECOG when the plan has one."""
    b.observation(
        "ecog",
        LOINC_ECOG,
        category="survey",
        effective=dates.ecog,
        valueInteger=clinical.ecog,
        interpretation=[ECOG_ANSWERS[clinical.ecog].concept()],
    )
    if clinical.karnofsky is not None:
        b.observation(
            "karnofsky",
            LOINC_KARNOFSKY,
            category="survey",
            effective=dates.ecog,
            valueInteger=clinical.karnofsky,
            interpretation=[KARNOFSKY_ANSWERS[clinical.karnofsky].concept()],
        )
    if plan.ecog_followup:
        b.observation(
            "ecog-followup",
            LOINC_ECOG,
            category="survey",
            effective=dates.ecog_followup,
            valueInteger=clinical.ecog_followup,
            interpretation=[ECOG_ANSWERS[clinical.ecog_followup].concept()],
        )


def add_cea(b: Builder, value: float, effective: datetime.date, key: str) -> None:
    """Add a CEA result (ng/mL, high above 5) named ``key``."""
    b.observation(
        key,
        LOINC_CEA,
        category="laboratory",
        effective=effective,
        issued=effective,
        valueQuantity={"value": value, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"},
        interpretation=[
            Code(_OBS_INTERPRETATION, "H", "High").concept()
            if value > 5.0
            else Code(_OBS_INTERPRETATION, "N", "Normal").concept()
        ],
        referenceRange=[{"high": {"value": 5.0, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"}}],
    )


# -- the Bundle ----------------------------------------------------------------------------------


def bundle_json(b: Builder) -> str:
    """The transaction Bundle, validated by ``fhir.resources.R4B`` and serialised by it.

    Raises:
        pydantic.ValidationError: a resource is not valid R4 (a bug in this module).
    """
    bundle = {
        "resourceType": "Bundle",
        "meta": {"security": [_HTEST]},
        "type": "transaction",
        "entry": [
            {
                "fullUrl": b.url(e.key),
                "resource": e.resource,
                "request": {"method": "POST", "url": e.resource["resourceType"]},
            }
            for e in b.entries
        ],
    }
    return Bundle.model_validate(bundle).model_dump_json(indent=2) + "\n"
