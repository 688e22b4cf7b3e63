"""Genomic reports of a synthetic patient as FHIR resources (HL7 Genomics Reporting IG).

A :class:`Report` says which genes a report covers, the calls it makes, its status and dates;
:func:`genomic_reports` gives a patient's preliminary, final and follow-up reports as its plan
says, and :func:`add_genomic_report` adds one report's region-studied, variant, TMB and MSI
Observations and the DiagnosticReport referencing them to a
:class:`~radfusion.synth.cohort_fhir.Builder`. Synthetic data only: see
:mod:`radfusion.synth.cohort`.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from radfusion.synth.cohort_clinical import Dates, Identity, Plan
from radfusion.synth.cohort_codes import (
    GENOMICS_ACCESSION_SYSTEM,
    HGVS,
    LA_GERMLINE,
    LA_MSI_HIGH,
    LA_MSI_STABLE,
    LA_PRESENT,
    LA_SEQUENCING,
    LA_SOMATIC,
    LOINC_C_HGVS,
    LOINC_DNA_CHANGE_TYPE,
    LOINC_GENE_STUDIED,
    LOINC_GENOMIC_REPORT,
    LOINC_GENOMIC_SOURCE,
    LOINC_MSI,
    LOINC_P_HGVS,
    LOINC_REGION_DESCRIPTION,
    LOINC_REGION_STUDIED,
    LOINC_TMB,
    LOINC_TRANSCRIPT,
    LOINC_VAF,
    LOINC_VARIANT,
    REFSEQ,
    UCUM,
    Code,
)
from radfusion.synth.cohort_fhir import Builder, instant, obs_component
from radfusion.synth.cohort_genomics import EGFR_T790M, GENES, LUNG_PANEL, VARIANTS, Call, Genotype

__all__ = ["Report", "add_genomic_report", "genomic_reports"]

# HL7 v2 table 0074, diagnostic service section: the reports' category (GE, genetics).
_DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"


@dataclass(frozen=True)
class Report:
    """One genomic report to write: its key prefix, genes, calls, status and dates."""

    key: str
    accession: str
    genes: tuple[str, ...]
    calls: dict[str, tuple[Call, ...]]
    status: str
    specimen: datetime.date
    issued: datetime.date
    tmb: float | None = None
    msi_high: bool | None = None
    tmb_without_effective: bool = False
    error_gene: str | None = None  # an entered-in-error variant Observation in this gene
    disregard: str | None = None


def _variant_components(call: Call) -> list[dict[str, Any]]:
    """A variant Observation's components: gene, HGVS and transcript, type, source, VAF."""
    spec = call.spec
    gene = GENES[spec.gene]
    components = [obs_component(LOINC_GENE_STUDIED, valueCodeableConcept=gene.code().concept())]
    if spec.c_hgvs is not None:
        components.append(
            obs_component(
                LOINC_C_HGVS,
                valueCodeableConcept=Code(HGVS, spec.c_hgvs, spec.c_hgvs).concept(),
            )
        )
        components.append(
            obs_component(
                LOINC_TRANSCRIPT,
                valueCodeableConcept=Code(REFSEQ, gene.transcript, gene.transcript).concept(),
            )
        )
    if spec.p_hgvs is not None:
        components.append(
            obs_component(
                LOINC_P_HGVS,
                valueCodeableConcept=Code(HGVS, spec.p_hgvs, spec.p_hgvs).concept(),
            )
        )
    source = LA_GERMLINE if call.source == "germline" else LA_SOMATIC
    components += [
        obs_component(LOINC_DNA_CHANGE_TYPE, valueCodeableConcept=spec.change_type.concept()),
        obs_component(LOINC_GENOMIC_SOURCE, valueCodeableConcept=source.concept()),
        obs_component(
            LOINC_VAF,
            valueQuantity={"value": call.vaf_percent, "unit": "%", "system": UCUM, "code": "%"},
        ),
    ]
    return components


def add_genomic_report(b: Builder, report: Report) -> None:
    """Add a report's region-studied, variant, TMB and MSI Observations, then the report."""
    obs: dict[str, Any] = {  # keyword arguments of Builder.observation
        "category": "laboratory",
        "effective": report.specimen,
        "issued": report.issued,
        "status": report.status,
        "disregard": report.disregard,
        "method": LA_SEQUENCING.concept(),
    }
    results: list[str] = []
    for gene_symbol in report.genes:
        gene = GENES[gene_symbol]
        key = f"{report.key}-region-{gene_symbol.lower()}"
        b.observation(
            key,
            LOINC_REGION_STUDIED,
            component=[
                obs_component(LOINC_GENE_STUDIED, valueCodeableConcept=gene.code().concept()),
                obs_component(LOINC_REGION_DESCRIPTION, valueString=gene.region),
            ],
            **obs,
        )
        results.append(key)
        for n, call in enumerate(report.calls.get(gene_symbol, ()), start=1):
            key = f"{report.key}-variant-{gene_symbol.lower()}-{n}"
            note = [{"text": call.spec.label}]
            b.observation(
                key,
                LOINC_VARIANT,
                valueCodeableConcept=LA_PRESENT.concept(),
                component=_variant_components(call),
                note=note,
                **obs,
            )
            results.append(key)
    if report.error_gene is not None:
        key = f"{report.key}-variant-{report.error_gene.lower()}-entered-in-error"
        spec = VARIANTS[report.error_gene][0]
        b.observation(
            key,
            LOINC_VARIANT,
            valueCodeableConcept=LA_PRESENT.concept(),
            component=_variant_components(Call(spec, 12.0, "somatic")),
            note=[{"text": f"{spec.label}: entered in error (sample mix-up), disregard"}],
            **{**obs, "status": "entered-in-error", "disregard": "entered-in-error"},
        )
        results.append(key)
    if report.tmb is not None:
        key = f"{report.key}-tmb"
        tmb_obs = {**obs, "effective": None} if report.tmb_without_effective else obs
        b.observation(
            key,
            LOINC_TMB,
            valueQuantity={
                "value": report.tmb,
                "unit": "Mutations/Megabase",
                "system": UCUM,
                "code": "1/1000000{Base}",
            },
            **tmb_obs,
        )
        results.append(key)
    if report.msi_high is not None:
        key = f"{report.key}-msi"
        value = LA_MSI_HIGH if report.msi_high else LA_MSI_STABLE
        b.observation(key, LOINC_MSI, valueCodeableConcept=value.concept(), **obs)
        results.append(key)
    b.add(
        report.key,
        {
            "resourceType": "DiagnosticReport",
            "identifier": [{"system": GENOMICS_ACCESSION_SYSTEM, "value": report.accession}],
            "status": report.status,
            "category": [Code(_DIAGNOSTIC_SERVICE, "GE", "Genetics").concept()],
            "code": LOINC_GENOMIC_REPORT.concept(),
            "subject": b.ref("patient"),
            "effectiveDateTime": report.specimen.isoformat(),
            "issued": instant(report.issued),
            "result": [b.ref(k) for k in results],
            "conclusion": _conclusion(report),
        },
        code=LOINC_GENOMIC_REPORT,
        disregard=report.disregard,
    )


def _conclusion(report: Report) -> str:
    """The report's text: variants found, genes negative, genes not tested."""
    found = [
        f"{gene} {call.spec.label}" for gene in report.genes for call in report.calls.get(gene, ())
    ]
    negative = [gene for gene in report.genes if not report.calls.get(gene)]
    parts = [("Detected: " + ", ".join(found)) if found else "No variant detected"]
    if negative and found:
        parts.append("no variant detected in " + ", ".join(negative))
    untested = [gene for gene in LUNG_PANEL if gene not in report.genes]
    if untested:
        parts.append("not tested: " + ", ".join(untested))
    return "; ".join(parts) + ". Synthetic report."


def _preliminary_report(
    ident: Identity, genotype: Genotype, plan: Plan, dates: Dates, rng: np.random.Generator
) -> Report:
    """The rapid EGFR/KRAS report issued before the final one (same accession)."""
    rapid = ("EGFR", "KRAS")
    calls = {
        gene: tuple(
            Call(c.spec, round(max(1.0, c.vaf_percent + float(rng.uniform(-3, 3))), 1), c.source)
            for c in genotype.calls[gene]
        )
        for gene in rapid
    }
    if plan.spurious_kras:  # a call the final report does not confirm
        calls["KRAS"] = (Call(VARIANTS["KRAS"][2], 4.1, "somatic"),)
    return Report(
        key="genomics-preliminary",
        accession=f"GX-{ident.patient_id}-1",
        genes=rapid,
        calls=calls,
        status="preliminary",
        specimen=dates.specimen,
        issued=dates.preliminary_issued,
        disregard="superseded-preliminary",
    )


def _final_report(ident: Identity, genotype: Genotype, plan: Plan, dates: Dates) -> Report:
    """The report a client uses: the plan's panel, issued before the study date."""
    return Report(
        key="genomics",
        accession=f"GX-{ident.patient_id}-1",
        genes=plan.panel,
        calls=genotype.calls,
        status="final",
        specimen=dates.specimen,
        issued=dates.final_issued,
        tmb=genotype.tmb if plan.tmb_msi else None,
        msi_high=genotype.msi_high if plan.tmb_msi else None,
        tmb_without_effective=plan.tmb_without_effective,
        error_gene=plan.error_gene,
    )


def _followup_report(
    ident: Identity, genotype: Genotype, plan: Plan, dates: Dates, rng: np.random.Generator
) -> Report:
    """The re-biopsy after the study date: all five genes, sometimes an acquired EGFR T790M."""
    calls = dict(genotype.calls)
    if plan.acquired_t790m:
        vaf = round(max(2.0, genotype.calls["EGFR"][0].vaf_percent * 0.6), 1)
        calls["EGFR"] = (*calls["EGFR"], Call(EGFR_T790M, vaf, "somatic"))
    return Report(
        key="genomics-followup",
        accession=f"GX-{ident.patient_id}-2",
        genes=LUNG_PANEL,
        calls=calls,
        status="final",
        specimen=dates.followup_specimen,
        issued=dates.followup_issued,
        tmb=round(genotype.tmb * math.exp(float(rng.normal(0.0, 0.15))), 1),
        msi_high=genotype.msi_high,
        tmb_without_effective=plan.tmb_without_effective,
    )


def genomic_reports(
    ident: Identity, genotype: Genotype, plan: Plan, dates: Dates, rng: np.random.Generator
) -> list[Report]:
    """The genomic reports the patient has: preliminary, final, follow-up (as the plan says)."""
    reports = []
    if plan.preliminary:
        reports.append(_preliminary_report(ident, genotype, plan, dates, rng))
    if plan.panel:
        reports.append(_final_report(ident, genotype, plan, dates))
    if plan.followup:
        reports.append(_followup_report(ident, genotype, plan, dates, rng))
    return reports
