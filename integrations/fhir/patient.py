"""Find the study's patient on the FHIR server: by identifier only, exactly one match.

The identifier comes from the study's Patient ID (0010,0020) and its issuer:

1. Issuer of Patient ID Qualifiers Sequence (0010,0024) → Universal Entity ID (0040,0032)
   with its type (0040,0033): a URI is the identifier system as is, an ISO OID becomes
   ``urn:oid:<oid>``;
2. else Issuer of Patient ID (0010,0021), mapped to a system by the site's ``fhir.issuers``;
3. else ``fhir.default_identifier_system`` (sites with one patient ID domain).

Then ``Patient?identifier=system|value``. Zero matches, several matches, an unmapped issuer
or no Patient ID at all give no patient (with the reason): names and birth dates are never
used to match. Optionally the study itself is looked up first (``ImagingStudy?identifier=
urn:dicom:uid|urn:oid:<StudyInstanceUID>``) and its subject taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from radfusion.config import FhirConfig
from radfusion.integrations.fhir.client import FhirClient

__all__ = ["PatientIdentifier", "PatientMatch", "find_patient", "patient_identifier"]


@dataclass(frozen=True)
class PatientIdentifier:
    """A FHIR identifier (system + value) for the study's patient, or why there is none."""

    system: str | None
    value: str | None
    reason: str = ""  # set when system or value is None

    @property
    def token(self) -> str:
        """The search token ``system|value``, with FHIR's search escapes (a comma would
        otherwise mean "or", a bar a new system)."""
        return f"{_escape(self.system or '')}|{_escape(self.value or '')}"

    def held_by(self, patient: dict[str, Any]) -> bool:
        """True when ``patient`` carries exactly this identifier (servers may match loosely,
        e.g. case-insensitively)."""
        return any(
            i.get("system") == self.system and i.get("value") == self.value
            for i in patient.get("identifier") or []
        )


@dataclass(frozen=True)
class PatientMatch:
    """The matched Patient resource, or None with the reason (no PHI in the reason)."""

    patient: dict[str, Any] | None
    reason: str = ""
    via: str = ""  # "identifier" or "ImagingStudy"

    @property
    def reference(self) -> str | None:
        if self.patient is None:
            return None
        return f"Patient/{self.patient.get('id')}"


def _escape(text: str) -> str:
    """FHIR search escaping (3.2.1.5.7): backslash before \\ , $ and |."""
    for char in ("\\", ",", "$", "|"):
        text = text.replace(char, "\\" + char)
    return text


def _issuer_system(item: Dataset) -> str | None:
    entity = str(item.get("UniversalEntityID", "") or "").strip()
    kind = str(item.get("UniversalEntityIDType", "") or "").strip().upper()
    if not entity:
        return None
    if kind == "ISO":
        return entity if entity.startswith("urn:oid:") else f"urn:oid:{entity}"
    if kind in ("URI", "URL", "") and ":" in entity:
        return entity
    return None  # DNS, UUID, X400, X500 … have no agreed FHIR system form


def patient_identifier(ds: Dataset, config: FhirConfig) -> PatientIdentifier:
    """The FHIR identifier for the patient of ``ds`` (any instance of the study)."""
    value = str(ds.get("PatientID", "") or "").strip()
    if not value:
        return PatientIdentifier(None, None, "the study has no Patient ID")
    for item in ds.get("IssuerOfPatientIDQualifiersSequence") or []:
        system = _issuer_system(item)
        if system:
            return PatientIdentifier(system, value)
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if issuer:
        system = config.issuers.get(issuer)
        if system:
            return PatientIdentifier(system, value)
        return PatientIdentifier(
            None, value, "the study's Issuer of Patient ID is not mapped (fhir.issuers)"
        )
    if config.default_identifier_system:
        return PatientIdentifier(config.default_identifier_system, value)
    return PatientIdentifier(
        None, value, "the study has no issuer of its Patient ID and no default system is set"
    )


def _live(patient: dict[str, Any]) -> bool:
    """False for inactive records and records merged into another ('replaced-by' link):
    servers still return both, and neither is the patient any more."""
    return patient.get("active", True) is not False and not any(
        link.get("type") == "replaced-by" for link in patient.get("link") or []
    )


def _by_identifier(client: FhirClient, identifier: PatientIdentifier) -> PatientMatch:
    found = client.search("Patient", {"identifier": identifier.token}).match
    # Servers may return inactive or merged-away records; a 'replaced-by' link means the
    # record was merged into another and is not the patient any more.
    live = [p for p in found if identifier.held_by(p) and _live(p)]
    if len(live) == 1:
        return PatientMatch(live[0], via="identifier")
    if not live:
        return PatientMatch(None, "no Patient has the study's identifier")
    return PatientMatch(None, f"{len(live)} Patients share the study's identifier")


def _by_imaging_study(client: FhirClient, study_instance_uid: str) -> PatientMatch | None:
    result = client.search(
        "ImagingStudy",
        {
            "identifier": f"urn:dicom:uid|urn:oid:{study_instance_uid}",
            "_include": "ImagingStudy:subject",
        },
    )
    subjects = {
        str((s.get("subject") or {}).get("reference", "")) for s in result.match if s.get("subject")
    }
    if len(subjects) != 1:
        return None
    reference = subjects.pop()
    patient = result.included(reference)
    if patient is None and reference.startswith("Patient/"):
        patient = client.read("Patient", reference.removeprefix("Patient/"))
    if patient is None or patient.get("resourceType") != "Patient" or not _live(patient):
        return None
    return PatientMatch(patient, via="ImagingStudy")


def find_patient(client: FhirClient, ds: Dataset, config: FhirConfig) -> PatientMatch:
    """The study's patient on the server, or None with the reason.

    Raises:
        FhirUnavailable, FhirError: from the searches (the caller decides what to do).
    """
    if config.resolve_through_imaging_study and ds.get("StudyInstanceUID"):
        match = _by_imaging_study(client, str(ds.StudyInstanceUID))
        if match is not None:
            return match
    identifier = patient_identifier(ds, config)
    if identifier.system is None or identifier.value is None:
        return PatientMatch(None, identifier.reason)
    return _by_identifier(client, identifier)
