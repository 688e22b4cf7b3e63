"""One call for apps: the patient context of a study, or why there is none.

``PatientContextProvider(config)(header)`` finds the study's patient (identifier only), checks
consent when the site requires it, and fetches the context as of the study date. Every way of
not getting a context is an outcome with a reason, not an exception — except a FHIR server
that is unavailable under ``on_unavailable: hold``, which raises :class:`ContextUnavailable`
so the job fails and is retried later (from the dead letters). Nothing here logs PHI: reasons
name resource types, counts and HTTP statuses, never identifiers.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from pydicom.dataset import Dataset

from radfusion.config import FhirConfig
from radfusion.errors import Unavailable
from radfusion.integrations.fhir.client import FhirClient, FhirError, FhirUnavailable
from radfusion.integrations.fhir.context import fetch_context
from radfusion.integrations.fhir.patient import find_patient
from radfusion.patient_context import ContextOutcome

__all__ = ["ContextUnavailable", "PatientContextProvider"]

log = logging.getLogger("radfusion.fhir")


class ContextUnavailable(Unavailable, RuntimeError):
    """The FHIR server is unavailable and the site holds studies until it is back (the
    service queues the job again later, ``jobs.retry``)."""


def _study_date(ds: Dataset) -> dt.date | None:
    value = str(ds.get("StudyDate", "") or "").strip()
    try:
        return dt.datetime.strptime(value, "%Y%m%d").date() if value else None
    except ValueError:
        return None


def _in_period(period: Any, today: dt.date) -> bool:
    """True when ``today`` lies in a FHIR Period (open ends count as open)."""
    if not isinstance(period, dict):
        return True
    start, end = str(period.get("start", ""))[:10], str(period.get("end", ""))[:10]
    try:
        return (not start or dt.date.fromisoformat(start) <= today) and (
            not end or today <= dt.date.fromisoformat(end)
        )
    except ValueError:
        return False  # a period that cannot be read grants nothing


def _denies(provision: dict[str, Any], today: dt.date) -> bool:
    """True when the provision or any nested one in force is a deny: without coding the
    data classes a nested deny could cover, any deny withholds genomic data."""
    if not _in_period(provision.get("period"), today):
        return False
    if provision.get("type") == "deny":
        return True
    return any(_denies(p, today) for p in provision.get("provision") or [] if isinstance(p, dict))


# Consent.scope (R4, http://terminology.hl7.org/CodeSystem/consentscope) codes that govern
# using a patient's data in their care: privacy consents and treatment consents. Research and
# advance-directive consents say nothing about it, either way.
_CONSENT_SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
_APPLICABLE_SCOPES = {"patient-privacy", "treatment"}


def _applies(consent: dict[str, Any]) -> bool:
    """True when the Consent's scope governs clinical use (or it names no coded scope: R4
    requires one, and a Consent we cannot place is taken to apply)."""
    codings = [
        c
        for c in (consent.get("scope") or {}).get("coding") or []
        if isinstance(c, dict) and c.get("system") == _CONSENT_SCOPE_SYSTEM
    ]
    return not codings or any(c.get("code") in _APPLICABLE_SCOPES for c in codings)


def _consent_withheld(client: FhirClient, patient: dict[str, Any]) -> str:
    """Why genomic data must not be fetched for ``patient`` ("" when an active privacy or
    treatment Consent in force permits it and none denies any part of it)."""
    today = dt.date.today()
    found = client.search(
        "Consent", {"patient": f"Patient/{patient.get('id')}", "status": "active"}
    ).match
    permitted = False
    for consent in filter(_applies, found):
        provision = consent.get("provision") or {}
        if _denies(provision, today):
            return "genomic data withheld: the patient's Consent denies it (or part of it)"
        if provision.get("type") == "permit" and _in_period(provision.get("period"), today):
            permitted = True
    if not permitted:
        return "genomic data withheld: no active privacy or treatment Consent in force permits it"
    return ""


class PatientContextProvider:
    """Patient context for studies, from the configured FHIR server.

    Raises (from the constructor):
        AuthError: the configured private key cannot be read.
    """

    def __init__(self, config: FhirConfig) -> None:
        self.config = config
        self.client = FhirClient(config)

    def close(self) -> None:
        self.client.close()

    def __call__(self, header: Dataset) -> ContextOutcome:
        """The context for the study ``header`` belongs to (any of its instances).

        Raises:
            ContextUnavailable: the server is unavailable and ``on_unavailable`` is ``hold``.
        """
        study_date = _study_date(header)
        if study_date is None:
            return ContextOutcome(
                "no-study-date", reason="the study has no valid Study Date to limit results to"
            )
        try:
            match = find_patient(self.client, header, self.config)
            if match.patient is None:
                log.info("no patient context: %s", match.reason)
                return ContextOutcome("no-patient", reason=match.reason)
            withheld = (
                _consent_withheld(self.client, match.patient)
                if self.config.consent_required
                else ""
            )
            context = fetch_context(
                self.client, match.patient, study_date, self.config, genomics_withheld=withheld
            )
        except FhirUnavailable as err:
            if self.config.on_unavailable == "hold":
                raise ContextUnavailable(str(err)) from err
            log.warning("patient context unavailable, imaging only: %s", err)
            return ContextOutcome("unavailable", reason=str(err))
        except FhirError as err:
            log.warning("patient context refused, imaging only: %s", err)
            return ContextOutcome("refused", reason=str(err))
        if context.excluded:
            log.info(
                "patient context: left out %s",
                ", ".join(f"{n} ({why})" for why, n in sorted(context.excluded.items())),
            )
        return ContextOutcome("available", context)
