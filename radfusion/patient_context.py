"""What is known of the patient at the study date, as the apps and operators see it.

The FHIR adapter (:mod:`radfusion.integrations.fhir`) fills these types; the operators that
use them (the results writer, fusion) know nothing of FHIR. Every value carries where it came
from (:class:`Source`); a value that could not be established is ``None`` with the reason in
:attr:`Fact.missing`, never imputed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

__all__ = [
    "CancerCondition",
    "Coded",
    "ContextOutcome",
    "Fact",
    "GeneResult",
    "PatientContext",
    "Source",
    "Status",
    "Variant",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """Where a value came from: ``Type/id`` and the version read (``meta.versionId``)."""

    reference: str
    version: str | None = None

    @property
    def versioned(self) -> str:
        return f"{self.reference}/_history/{self.version}" if self.version else self.reference


@dataclass(frozen=True)
class Fact(Generic[T]):
    """A value with its provenance, or ``None`` and why (``missing``). ``derived`` says how
    the value was inferred when no resource states it directly (else "")."""

    value: T | None
    sources: tuple[Source, ...] = ()
    date: str | None = None
    missing: str = ""
    derived: str = ""

    @classmethod
    def unknown(cls, reason: str) -> Fact[T]:
        return cls(None, missing=reason)


@dataclass(frozen=True)
class Coded:
    """A coded answer: ``system|code`` and its display (or text)."""

    system: str
    code: str
    display: str

    @property
    def token(self) -> str:
        return f"{self.system}|{self.code}"


@dataclass(frozen=True)
class Variant:
    gene: str
    hgvs_c: str | None
    hgvs_p: str | None
    vaf_percent: float | None  # allele frequency in %, whether sent as % or as a fraction
    origin: str | None  # somatic | germline | unknown
    source: Source


@dataclass(frozen=True)
class GeneResult:
    """One gene: ``present`` (variants found), ``absent`` (tested, wild type),
    ``indeterminate`` (tested, no usable call) or ``not-tested``; ``sources`` are the
    Observations that say so."""

    gene: str
    status: str
    variants: tuple[Variant, ...] = ()
    sources: tuple[Source, ...] = ()


@dataclass(frozen=True)
class CancerCondition:
    code: str
    system: str
    display: str
    histology: str | None
    body_site: str | None
    clinical_status: str | None = None  # active, recurrence, remission, resolved, …


@dataclass(frozen=True)
class PatientContext:
    """What is known of the patient at the study date. See the module docstring."""

    patient: Source
    study_date: dt.date
    age_years: Fact[int]
    sex: Fact[str]
    genes: dict[str, GeneResult]
    tmb: Fact[float]
    msi: Fact[Coded]
    cancer: Fact[CancerCondition]
    stage_group: Fact[Coded]
    ecog: Fact[int]
    karnofsky: Fact[int]
    smoking: Fact[Coded]
    tumour_markers: dict[str, Fact[float]] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)  # reason → resources left out
    genomics_withheld: str = ""  # why no genomic data was fetched (consent), else ""

    def tested_genes(self) -> set[str]:
        return {g for g, r in self.genes.items() if r.status in ("present", "absent")}


Status = Literal["available", "no-patient", "unavailable", "refused", "no-study-date"]


@dataclass(frozen=True)
class ContextOutcome:
    """The context (``status == "available"``), or None and why."""

    status: Status
    context: PatientContext | None = None
    reason: str = ""

    def describe(self) -> str:
        """One sentence for reports and ``radfusion status``: whether clinical and genomic
        data were found and, when not or only in part, why. No PHI: resource types, counts,
        HTTP statuses and OperationOutcome codes only."""
        subject = "Clinical and genomic data (FHIR)"
        if self.context is None:
            return f"{subject}: {_STATUS_WORDS[self.status]} ({self.reason})"
        context = self.context
        parts = [f"{subject}: available as of the study date {context.study_date.isoformat()}"]
        if context.genomics_withheld:
            parts.append(context.genomics_withheld)
        else:
            tested = sorted(context.tested_genes())
            parts.append(f"genes tested: {', '.join(tested)}" if tested else "no gene tested")
        if context.excluded:
            left_out = ", ".join(f"{n} {why}" for why, n in sorted(context.excluded.items()))
            parts.append(f"results left out: {left_out}")
        return "; ".join(parts)


_STATUS_WORDS: dict[str, str] = {
    "no-patient": "none, the patient was not identified",
    "unavailable": "unavailable, the FHIR server could not be reached",
    "refused": "unavailable, the FHIR server refused the request",
    "no-study-date": "not looked up",
}
