"""The patient context: what the fusion model may know about the patient at the study date.

Built from FHIR R4 resources found by code, never by profile URL (servers drop or vary
``meta.profile``):

- demographics: age in whole years at the study date, administrative gender;
- genomics (HL7 Genomics Reporting IG): genomic reports (LOINC 51969-4) with their results;
  variant Observations (69548-6) with gene studied (48018-6, HGNC), c.HGVS (48004-6),
  p.HGVS (48005-3), VAF (81258-6) and genomic source class (48002-0); region-studied
  Observations (53041-0) listing the genes tested; TMB (94076-7) and MSI (81695-9). A gene is
  ``present`` (a variant Observation valued LA9633-4 Present), ``absent`` (tested, wild type:
  a region studied names it, or a variant Observation valued LA9634-2 Absent),
  ``indeterminate`` (a variant Observation with any other value or none) or ``not-tested``;
  never "absent" from the mere lack of a variant;
- oncology (mCODE): the primary cancer Condition (code, histology, body site), the TNM stage
  group, ECOG (89247-1) and Karnofsky (89243-0) performance status, tumour markers, and
  smoking status (72166-2).

Every value carries the resource and version it came from (:class:`Source`). A value that
could not be established is ``None`` with the reason in :attr:`Fact.missing`; nothing is
imputed. Only results dated (and, when they say so, issued) up to the study date (plus
``fhir.results_after_study_days``) are used, so a later result never leaks into an earlier
study; undated results, and results that are entered-in-error, cancelled or only
preliminary, are left out and counted in :attr:`PatientContext.excluded`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any, TypeVar

from radfusion.config import FhirConfig
from radfusion.integrations.fhir.client import FhirClient, SearchResult
from radfusion.integrations.fhir.value_sets import (
    HGNC_SYMBOLS,
    LUNG_CANCER_SNOMED,
    LUNG_CANCER_STAGE,
    STAGE_GROUP_LOINC,
    STAGE_GROUP_SNOMED,
    STAGE_VALUES,
)
from radfusion.patient_context import (
    CancerCondition,
    Coded,
    Fact,
    GeneResult,
    PatientContext,
    Source,
    Variant,
)

__all__ = ["LUNG_PANEL", "build_context", "fetch_context"]

T = TypeVar("T")

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"

LUNG_PANEL = ("EGFR", "KRAS", "ALK", "TP53", "STK11")
"""Genes the lung context always reports (tested or not); others found are reported too."""

VARIANT = "69548-6"
REGION_STUDIED = "53041-0"
GENOMIC_REPORT = "51969-4"
GENE_STUDIED = "48018-6"
HGVS_C = "48004-6"
HGVS_P = "48005-3"
VAF = "81258-6"
GENOMIC_SOURCE_CLASS = "48002-0"
TMB = "94076-7"
MSI = "81695-9"
ECOG = "89247-1"
KARNOFSKY = "89243-0"
SMOKING = "72166-2"
TUMOUR_MARKERS = {"2039-6": "CEA", "19166-8": "CYFRA 21-1", "19123-9": "NSE"}
PRESENT, ABSENT = "LA9633-4", "LA9634-2"
SOURCE_CLASS = {"LA6684-0": "somatic", "LA6683-2": "germline", "LA18197-1": "unknown"}
HGNC = "http://www.genenames.org"  # also .../geneId (Genomics Reporting IG)

_OBSERVATION_CODES = (
    VARIANT,
    REGION_STUDIED,
    TMB,
    MSI,
    ECOG,
    KARNOFSKY,
    SMOKING,
    *sorted(STAGE_GROUP_LOINC),
    *sorted(TUMOUR_MARKERS),
)
_USABLE_STATUS = {"final", "amended", "corrected", "appended"}


# -- small readers -----------------------------------------------------------------------------


def _source(resource: dict[str, Any]) -> Source:
    version = (resource.get("meta") or {}).get("versionId")
    return Source(f"{resource.get('resourceType')}/{resource.get('id')}", version)


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict)]


def _has_code(concept: Any, system: str, codes: Iterable[str]) -> bool:
    wanted = set(codes)
    return any(c.get("system") == system and c.get("code") in wanted for c in _codings(concept))


def _code_of(concept: Any, system: str | None = None) -> str | None:
    for c in _codings(concept):
        if system is None or c.get("system") == system:
            return str(c.get("code")) if c.get("code") is not None else None
    return None


def _text_of(concept: Any) -> str | None:
    if not isinstance(concept, dict):
        return None
    for c in _codings(concept):
        if c.get("display"):
            return str(c["display"])
    text = concept.get("text")
    return str(text) if text else _code_of(concept)


def _parse_date(value: Any) -> dt.date | None:
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) == 4:  # a year alone: its last day, so it never counts as earlier
            return dt.date(int(value), 12, 31)
        if len(value) == 7:
            year, month = int(value[:4]), int(value[5:7])
            following = dt.date(year + month // 12, month % 12 + 1, 1)
            return following - dt.timedelta(days=1)
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def _result_date(resource: dict[str, Any]) -> str | None:
    """The clinically relevant date of a result: effective, else issued/recorded/onset."""
    for key in ("effectiveDateTime", "effectiveInstant"):
        if resource.get(key):
            return str(resource[key])
    period = resource.get("effectivePeriod") or {}
    if period.get("start"):
        return str(period["start"])
    for key in ("issued", "recordedDate", "onsetDateTime"):
        if resource.get(key):
            return str(resource[key])
    return None


def _component(observation: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [
        c for c in observation.get("component") or [] if _has_code(c.get("code"), LOINC, [code])
    ]


def _gene_names(observation: dict[str, Any]) -> list[str]:
    """Every gene the Observation's gene-studied components name: one per component, or
    several in one (several HGNC codings, or a text listing them, as some senders write a
    region studied)."""
    names: list[str] = []
    for c in _component(observation, GENE_STUDIED):
        names.extend(_genes_of(c.get("valueCodeableConcept")))
    return list(dict.fromkeys(names))


def _genes_of(concept: Any) -> list[str]:
    hgnc = [c for c in _codings(concept) if str(c.get("system", "")).startswith(HGNC)]
    # HGNC codings carry the symbol as display (the code is HGNC:nnnn); a coding of another
    # system is a translation of the same gene, not another gene.
    symbols = [
        str(c["display"]).strip().upper()
        if c.get("display")
        else HGNC_SYMBOLS.get(str(c.get("code")))
        for c in hgnc
    ]
    if any(symbols):
        return [s for s in symbols if s]
    for coding in _codings(concept):
        if coding.get("display"):
            return [str(coding["display"]).strip().upper()]
    text = concept.get("text") if isinstance(concept, dict) else None
    if not text:
        return []
    # A list in text: "TP53, STK11", "TP53; STK11", "TP53 and STK11".
    parts = re.split(r"\s*(?:,|;|/|\band\b)\s*", str(text), flags=re.IGNORECASE)
    return [p.strip().upper() for p in parts if p.strip()]


_NOT_A_DIAGNOSIS = {"entered-in-error", "refuted", "unconfirmed", "provisional", "differential"}


class _Selector:
    """Applies the date cut-off and status rules, counting what it leaves out."""

    def __init__(self, cutoff: dt.date) -> None:
        self.cutoff = cutoff
        self.excluded: Counter[str] = Counter()

    def keep(self, resource: dict[str, Any], *, status_rule: bool = True) -> bool:
        status = str(resource.get("status", ""))
        is_result = resource.get("resourceType") in ("Observation", "DiagnosticReport")
        if status_rule and is_result and status not in _USABLE_STATUS:
            self.excluded[f"status {status or 'missing'}"] += 1
            return False
        if resource.get("resourceType") == "Condition":
            verification = _code_of(resource.get("verificationStatus"))
            # Only a confirmed diagnosis (or one without verification status, which R4 allows)
            # may stand as the patient's cancer; a suspicion is not a diagnosis.
            if verification in _NOT_A_DIAGNOSIS:
                self.excluded[f"condition {verification}"] += 1
                return False
        when = _parse_date(_result_date(resource))
        if when is None:
            self.excluded["undated"] += 1
            return False
        # Taken before the study but issued after it: not known when the study was read.
        issued = _parse_date(resource.get("issued"))
        if when > self.cutoff or (issued is not None and issued > self.cutoff):
            self.excluded["after the study date"] += 1
            return False
        return True


def _local(reference: str) -> str:
    """``Type/id`` of a reference that may be absolute or versioned."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:])


def _latest(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(items, key=lambda r: _result_date(r) or "", default=None)


def _single(
    observations: list[dict[str, Any]], codes: set[str], system: str = LOINC
) -> dict[str, Any] | None:
    return _latest([o for o in observations if _has_code(o.get("code"), system, codes)])


# LOINC answer list LL529-9 (ECOG performance status): answer code → grade.
_ECOG_ANSWERS = {
    "LA9622-7": 0,
    "LA9623-5": 1,
    "LA9624-3": 2,
    "LA9625-0": 3,
    "LA9626-8": 4,
    "LA9627-6": 5,
}


def _number(observation: dict[str, Any] | None) -> float | None:
    """A numeric value: valueQuantity, valueInteger, or an ECOG answer code. Codes of other
    systems are never read as numbers (a SNOMED concept id is not a grade)."""
    if observation is None:
        return None
    quantity = observation.get("valueQuantity") or {}
    if isinstance(quantity.get("value"), int | float):
        return float(quantity["value"])
    if isinstance(observation.get("valueInteger"), int):
        return float(observation["valueInteger"])
    answer = _code_of(observation.get("valueCodeableConcept"), LOINC)
    if answer in _ECOG_ANSWERS and _has_code(observation.get("code"), LOINC, [ECOG]):
        return float(_ECOG_ANSWERS[answer])
    return None


def _fact_number(observation: dict[str, Any] | None, what: str) -> Fact[float]:
    value = _number(observation)
    if observation is None:
        return Fact.unknown(f"no {what} recorded up to the study date")
    if value is None:
        return Fact.unknown(f"{what} in {_source(observation).reference} has no numeric value")
    return Fact(value, (_source(observation),), _result_date(observation))


def _fact_concept(observation: dict[str, Any] | None, what: str) -> Fact[Coded]:
    if observation is None:
        return Fact.unknown(f"no {what} recorded up to the study date")
    concept = observation.get("valueCodeableConcept")
    codings = [c for c in _codings(concept) if c.get("code")]
    if not codings:
        return Fact.unknown(f"{what} in {_source(observation).reference} has no coded value")
    first = codings[0]
    value = Coded(
        str(first.get("system", "")),
        str(first["code"]),
        str(first.get("display") or (concept or {}).get("text") or first["code"]),
    )
    return Fact(value, (_source(observation),), _result_date(observation))


# -- the parts -----------------------------------------------------------------------------------


def _percent(quantity: dict[str, Any]) -> float | None:
    """A VAF Quantity in percent: UCUM "%" as is; a unitless fraction (or UCUM "1") × 100."""
    value = quantity.get("value")
    if not isinstance(value, int | float):
        return None
    unit = str(quantity.get("code") or quantity.get("unit") or "")
    if unit == "%":
        return float(value)
    if unit in ("", "1") and 0 <= value <= 1:
        return float(value) * 100
    return None  # an unknown unit: not guessed


def _genes(observations: list[dict[str, Any]]) -> dict[str, GeneResult]:
    found: dict[str, list[Variant]] = {}
    absent: dict[str, list[Source]] = {}
    indeterminate: dict[str, list[Source]] = {}
    present_sources: dict[str, list[Source]] = {}
    for o in observations:
        if _has_code(o.get("code"), LOINC, [REGION_STUDIED]):
            for gene in _gene_names(o):
                absent.setdefault(gene, []).append(_source(o))
            continue
        if not _has_code(o.get("code"), LOINC, [VARIANT]):
            continue
        genes = _gene_names(o)
        if not genes:
            continue
        value = _code_of(o.get("valueCodeableConcept"), LOINC)
        if value == ABSENT:
            for gene in genes:
                absent.setdefault(gene, []).append(_source(o))
            continue
        if value != PRESENT:
            # Unknown, no call, or no value at all: neither a finding nor a wild type.
            for gene in genes:
                indeterminate.setdefault(gene, []).append(_source(o))
            continue
        hgvs_c = _text_of((_component(o, HGVS_C) or [{}])[0].get("valueCodeableConcept"))
        hgvs_p = _text_of((_component(o, HGVS_P) or [{}])[0].get("valueCodeableConcept"))
        vaf = _percent((_component(o, VAF) or [{}])[0].get("valueQuantity") or {})
        origin_code = _code_of(
            (_component(o, GENOMIC_SOURCE_CLASS) or [{}])[0].get("valueCodeableConcept")
        )
        for gene in genes:
            found.setdefault(gene, []).append(
                Variant(
                    gene=gene,
                    hgvs_c=hgvs_c,
                    hgvs_p=hgvs_p,
                    vaf_percent=vaf,
                    origin=SOURCE_CLASS.get(origin_code or ""),
                    source=_source(o),
                )
            )
            present_sources.setdefault(gene, []).append(_source(o))
    results = {}
    for gene in sorted({*LUNG_PANEL, *found, *absent, *indeterminate}):
        if gene in found:
            results[gene] = GeneResult(
                gene, "present", tuple(found[gene]), tuple(present_sources[gene])
            )
        elif gene in indeterminate:
            # A failed or unknown call outweighs a region studied: the gene was tested but
            # its status is not known.
            results[gene] = GeneResult(
                gene, "indeterminate", (), tuple(dict.fromkeys(indeterminate[gene]))
            )
        elif gene in absent:
            results[gene] = GeneResult(gene, "absent", (), tuple(dict.fromkeys(absent[gene])))
        else:
            results[gene] = GeneResult(gene, "not-tested")
    return results


def _cancer(conditions: list[dict[str, Any]]) -> Fact[CancerCondition]:
    lung = [
        c
        for c in conditions
        if _has_code(c.get("code"), SNOMED, LUNG_CANCER_SNOMED.keys())
        or any(
            str(coding.get("code", "")).upper().startswith("C34")
            for coding in _codings(c.get("code"))
            if str(coding.get("system", "")).startswith(ICD10)
        )
    ]
    condition = _latest(lung)
    if condition is None:
        return Fact.unknown("no primary lung cancer Condition up to the study date")
    codings = _codings(condition.get("code"))
    # The SNOMED CT concept of the value set first: it may carry the stage.
    code = next(
        (c for c in codings if c.get("system") == SNOMED and c.get("code") in LUNG_CANCER_SNOMED),
        codings[0],
    )
    histology = None
    for extension in condition.get("extension") or []:
        if "histology" in str(extension.get("url", "")).lower():
            histology = _text_of(extension.get("valueCodeableConcept"))
    site = _text_of((condition.get("bodySite") or [None])[0])
    return Fact(
        CancerCondition(
            code=str(code.get("code")),
            system=str(code.get("system")),
            display=str(code.get("display") or code.get("code")),
            histology=histology,
            body_site=site,
            clinical_status=_code_of(condition.get("clinicalStatus")),
        ),
        (_source(condition),),
        _result_date(condition),
    )


def _age(patient: dict[str, Any], study_date: dt.date) -> Fact[int]:
    born = patient.get("birthDate")
    birth = None
    if isinstance(born, str) and len(born) == 10:
        try:
            birth = dt.date.fromisoformat(born)
        except ValueError:
            birth = None
    if birth is None:
        return Fact.unknown("the Patient has no full birth date")
    years = (
        study_date.year
        - birth.year
        - ((study_date.month, study_date.day) < (birth.month, birth.day))
    )
    return Fact(years, (_source(patient),))


def build_context(
    patient: dict[str, Any],
    study_date: dt.date,
    observations: SearchResult,
    reports: SearchResult,
    conditions: SearchResult,
    *,
    results_after_study_days: float = 0,
    genomics_withheld: str = "",
) -> PatientContext:
    """The context from already fetched resources (see :func:`fetch_context`).
    ``genomics_withheld``: why genomic data was not fetched (then no gene, TMB or MSI is
    reported, not even as "not tested")."""
    cutoff = study_date + dt.timedelta(days=int(results_after_study_days))
    select = _Selector(cutoff)
    usable_reports: list[dict[str, Any]] = []
    unused_reports: list[dict[str, Any]] = []
    for report in reports.match:
        (usable_reports if select.keep(report) else unused_reports).append(report)
    by_reference = {
        f"{r.get('resourceType')}/{r.get('id')}": r for r in (*observations.match, *reports.include)
    }

    def results_of(items: list[dict[str, Any]]) -> set[str]:
        return {
            _local(str(ref.get("reference", ""))) for r in items for ref in r.get("result") or []
        }

    # A report's results count when the report does; results reached through a report are
    # merged with those found directly (each once). Results only a report that is not used
    # (preliminary, superseded, after the study date) speaks for are left out with it.
    used, unused = (
        results_of(usable_reports),
        results_of(unused_reports) - results_of(usable_reports),
    )
    chosen: dict[str, dict[str, Any]] = {}
    for reference in sorted(used):
        if reference in by_reference:
            chosen[reference] = by_reference[reference]
    for o in observations.match:
        reference = f"Observation/{o.get('id')}"
        if reference in unused:
            select.excluded["in a report that is not used"] += 1
            continue
        chosen.setdefault(reference, o)
    kept = [o for o in chosen.values() if select.keep(o)]
    conditions_kept = [c for c in conditions.match if select.keep(c, status_rule=False)]
    cancer = _cancer(conditions_kept)
    sex = patient.get("gender")
    return PatientContext(
        patient=_source(patient),
        study_date=study_date,
        age_years=_age(patient, study_date),
        sex=Fact(str(sex), (_source(patient),)) if sex else Fact.unknown("no gender recorded"),
        genes={} if genomics_withheld else _genes(kept),
        tmb=(
            Fact.unknown(genomics_withheld)
            if genomics_withheld
            else _fact_number(_single(kept, {TMB}), "tumour mutational burden")
        ),
        msi=(
            Fact.unknown(genomics_withheld)
            if genomics_withheld
            else _fact_concept(_single(kept, {MSI}), "microsatellite instability")
        ),
        cancer=cancer,
        stage_group=_stage(kept, cancer),
        ecog=_int_fact(_fact_number(_single(kept, {ECOG}), "ECOG performance status")),
        karnofsky=_int_fact(_fact_number(_single(kept, {KARNOFSKY}), "Karnofsky score")),
        smoking=_fact_concept(_single(kept, {SMOKING}), "smoking status"),
        tumour_markers={
            name: _fact_number(marker, name)
            for code, name in TUMOUR_MARKERS.items()
            if (marker := _single(kept, {code})) is not None
        },
        excluded=dict(select.excluded),
        genomics_withheld=genomics_withheld,
    )


def _stage(observations: list[dict[str, Any]], cancer: Fact[CancerCondition]) -> Fact[Coded]:
    """The latest stage group Observation (LOINC or SNOMED CT coded); without one, the stage
    the lung cancer concept carries (Synthea's staged concepts), saying so in ``derived``."""
    stage = _latest(
        [
            o
            for o in observations
            if _has_code(o.get("code"), LOINC, STAGE_GROUP_LOINC)
            or _has_code(o.get("code"), SNOMED, STAGE_GROUP_SNOMED)
        ]
    )
    condition = cancer.value
    group = None
    if condition is not None and condition.system == SNOMED:
        group = LUNG_CANCER_STAGE.get(condition.code)
    if stage is None and condition is not None and group is not None:
        code, display = STAGE_VALUES[group]
        return Fact(
            Coded(SNOMED, code, display),
            cancer.sources,
            cancer.date,
            derived=f"from the Condition's code {SNOMED}|{condition.code} (no stage group "
            "Observation)",
        )
    return _fact_concept(stage, "TNM stage group")


def _int_fact(fact: Fact[float]) -> Fact[int]:
    if fact.value is None:
        return Fact.unknown(fact.missing)
    return Fact(int(fact.value), fact.sources, fact.date)


def fetch_context(
    client: FhirClient,
    patient: dict[str, Any],
    study_date: dt.date,
    config: FhirConfig,
    *,
    genomics_withheld: str = "",
) -> PatientContext:
    """Fetch and build the context of ``patient`` as of ``study_date``: three searches
    (Observations by code, genomic reports with their results included, Conditions), each
    following its pages. With ``genomics_withheld`` (the reason), no genomic data is asked for.

    Raises:
        FhirUnavailable, FhirError: from the searches.
    """
    subject = f"Patient/{patient.get('id')}"
    genomic = {VARIANT, REGION_STUDIED, TMB, MSI}
    codes = [c for c in _OBSERVATION_CODES if not (genomics_withheld and c in genomic)]
    # No server-side date filter: undated and later results are dropped here, where they are
    # counted (a server would drop undated ones silently).
    tokens = [f"{LOINC}|{c}" for c in codes] + [f"{SNOMED}|{c}" for c in sorted(STAGE_GROUP_SNOMED)]
    observations = client.search("Observation", {"subject": subject, "code": ",".join(tokens)})
    reports = SearchResult()
    if not genomics_withheld:
        reports = client.search(
            "DiagnosticReport",
            {
                "subject": subject,
                "code": f"{LOINC}|{GENOMIC_REPORT}",
                "_include": "DiagnosticReport:result",
            },
        )
    conditions = client.search("Condition", {"subject": subject})
    return build_context(
        patient,
        study_date,
        observations,
        reports,
        conditions,
        results_after_study_days=config.results_after_study_days,
        genomics_withheld=genomics_withheld,
    )
