"""Ground truth of a synthetic patient: what a correct client derives, and what it cannot know.

:func:`patient_context` is the patient context as of the study date, each value with the
resource it comes from; :func:`hidden_truth` the true genotype (untested genes included) and
stage; :func:`imaging_truth` the phantom's tumours; :func:`messiness` the deliberate traps in the
Bundle; :func:`resource_rows` one row per resource. The writer (:mod:`radfusion.synth.cohort`)
puts them in ``ground_truth.json``.
"""

from __future__ import annotations

from typing import Any

from radfusion.synth.cohort_clinical import Clinical, Dates, Demographics, Imaging, Plan, Stage
from radfusion.synth.cohort_codes import LOINC_CEA, SCT_LUNG, SCT_SMOKING, STAGE_AJCC
from radfusion.synth.cohort_fhir import Builder, condition_code, instant, morphology
from radfusion.synth.cohort_genomics import LUNG_PANEL, Call, Genotype

__all__ = ["hidden_truth", "imaging_truth", "messiness", "patient_context", "resource_rows"]

# -- ground truth --------------------------------------------------------------------------------


def _source(b: Builder, key: str) -> dict[str, str]:
    """Where a value comes from: the resource's key and its fullUrl in the Bundle."""
    return {"key": key, "fullUrl": b.url(key)}


def _call_truth(call: Call, source: dict[str, str] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": call.spec.label,
        "c_hgvs": call.spec.c_hgvs,
        "p_hgvs": call.spec.p_hgvs,
        "change_type": call.spec.change_type.code,
        "vaf_percent": call.vaf_percent,
        "genomic_source_class": call.source,
    }
    if source is not None:
        row["source"] = source
    return row


def _genes_context(b: Builder, genotype: Genotype, plan: Plan) -> dict[str, Any]:
    genes: dict[str, Any] = {}
    for gene in LUNG_PANEL:
        if gene not in plan.panel:
            genes[gene] = {"status": "untested", "region_studied": None, "variants": []}
            continue
        region = _source(b, f"genomics-region-{gene.lower()}")
        calls = genotype.calls[gene]
        genes[gene] = {
            "status": "positive" if calls else "wild-type",
            "region_studied": region,
            "variants": [
                _call_truth(c, _source(b, f"genomics-variant-{gene.lower()}-{n}"))
                for n, c in enumerate(calls, start=1)
            ],
        }
    return genes


def _genomics_context(b: Builder, genotype: Genotype, plan: Plan, dates: Dates) -> dict[str, Any]:
    if not plan.panel:
        return {
            "tested": False,
            "report": None,
            "genes": _genes_context(b, genotype, plan),
            "tmb": None,
            "msi": None,
        }
    tmb = msi = None
    if plan.tmb_msi:
        tmb = {
            "value": genotype.tmb,
            "unit": "1/1000000{Base}",
            "high": genotype.tmb >= 10.0,
            "date": (
                dates.final_issued if plan.tmb_without_effective else dates.specimen
            ).isoformat(),
            "source": _source(b, "genomics-tmb"),
        }
        msi = {
            "status": "msi-high" if genotype.msi_high else "stable",
            "source": _source(b, "genomics-msi"),
        }
    return {
        "tested": True,
        "report": {
            **_source(b, "genomics"),
            "effective": dates.specimen.isoformat(),
            "issued": instant(dates.final_issued),
        },
        "genes": _genes_context(b, genotype, plan),
        "tmb": tmb,
        "msi": msi,
    }


def patient_context(
    b: Builder,
    demo: Demographics,
    clinical: Clinical,
    stage: Stage,
    imaging: Imaging,
    genotype: Genotype,
    plan: Plan,
    dates: Dates,
) -> dict[str, Any]:
    """What a correct client derives from the server as of the study date."""
    markers = []
    if clinical.cea is not None:
        markers.append(
            {
                "name": "CEA",
                "code": LOINC_CEA.token(),
                "value": clinical.cea,
                "unit": "ng/mL",
                "date": dates.cea.isoformat(),
                "source": _source(b, "cea"),
            }
        )
    karnofsky = None
    if clinical.karnofsky is not None:
        karnofsky = {
            "value": clinical.karnofsky,
            "date": dates.ecog.isoformat(),
            "source": _source(b, "karnofsky"),
        }
    code = condition_code(clinical)
    return {
        "as_of": demo.study_date.isoformat(),
        "patient": _source(b, "patient"),
        "sex": demo.sex,
        "birth_date": demo.birth_date.isoformat(),
        "age_at_study_years": demo.age,
        "smoking_status": {
            "category": clinical.smoking,
            "code": SCT_SMOKING[clinical.smoking].token(),
            "date": dates.smoking.isoformat(),
            "source": _source(b, "smoking-status"),
        },
        "primary_cancer": {
            "code": code.token(),
            "display": code.display,
            "histology": clinical.histology,
            "histology_code": morphology(clinical.histology).token(),
            "body_site": SCT_LUNG.token(),
            "laterality": imaging.primary_side,
            "onset": dates.diagnosis.isoformat(),
            "source": _source(b, "primary-cancer"),
        },
        "stage": {
            "group": stage.group,
            "ajcc_code": STAGE_AJCC[stage.group],
            "t": f"c{stage.t}",
            "n": f"c{stage.n}",
            "m": f"c{stage.m}",
            "date": dates.stage.isoformat(),
            "source": _source(b, "stage-group"),
        },
        "ecog": {
            "value": clinical.ecog,
            "date": dates.ecog.isoformat(),
            "source": _source(b, "ecog"),
        },
        "karnofsky": karnofsky,
        "tumour_markers": markers,
        "genomics": _genomics_context(b, genotype, plan, dates),
    }


def messiness(b: Builder, clinical: Clinical, plan: Plan) -> list[dict[str, Any]]:
    """The deliberate traps the Bundle holds, each with the keys of the resources concerned."""
    keys = {e.key for e in b.entries}
    items: list[dict[str, Any]] = []

    def note(kind: str, description: str, wanted: list[str]) -> None:
        present = [k for k in wanted if k in keys]
        if present:
            items.append({"kind": kind, "description": description, "keys": present})

    conflict = (
        " It reports KRAS G12V, which the final does not confirm." if plan.spurious_kras else ""
    )
    note(
        "preliminary-superseded",
        "a preliminary genomic report (and its Observations) shares its accession identifier "
        "with the final one, issued earlier; use the final." + conflict,
        [e.key for e in b.entries if e.disregard == "superseded-preliminary"],
    )
    note(
        "entered-in-error",
        "a variant Observation with status entered-in-error, referenced by the final report",
        [e.key for e in b.entries if e.disregard == "entered-in-error"],
    )
    note(
        "no-effective-date",
        "an Observation without effectiveDateTime; date it by issued",
        [
            e.key
            for e in b.entries
            if e.resource["resourceType"] == "Observation" and "effectiveDateTime" not in e.resource
        ],
    )
    note(
        "after-study-date",
        "results dated after the study date; a date filter must drop them",
        [e.key for e in b.entries if e.disregard == "after-study-date"],
    )
    note(
        "older-value",
        "an older smoking status; the latest one on or before the study date wins",
        [e.key for e in b.entries if e.disregard == "superseded-by-later-value"],
    )
    if clinical.generic_code:
        note(
            "generic-condition-code",
            "the Condition has only the generic NSCLC code; histology is in the extension",
            ["primary-cancer"],
        )
    note(
        "decoy-identifier",
        "the Patient's second identifier (another system) has the next patient's MRN as value",
        ["patient"],
    )
    return items


def resource_rows(b: Builder) -> list[dict[str, Any]]:
    """One row per resource of the Bundle: key, type, code, dates and why it is disregarded."""
    rows = []
    for e in b.entries:
        r = e.resource
        effective = r.get("effectiveDateTime")
        rows.append(
            {
                "key": e.key,
                "resourceType": r["resourceType"],
                "fullUrl": b.url(e.key),
                "code": e.code,
                "status": r.get("status"),
                "effective": effective,
                "issued": r.get("issued"),
                "date": e.date.isoformat() if e.date else None,
                "after_study_date": bool(e.date and e.date > b.study_date),
                "disregard": e.disregard,
            }
        )
    return rows


def imaging_truth(imaging: Imaging) -> dict[str, Any]:
    """The phantom's tumours as the ground truth describes them."""
    return {
        "tumour_count": imaging.tumour_count,
        "tumours_requested": imaging.tumours_requested,
        "sides": list(imaging.sides),
        "diameters_mm": list(imaging.diameters_mm),
        "largest_diameter_mm": imaging.largest_diameter_mm,
        "total_volume_ml": imaging.total_volume_ml,
        "primary_side": imaging.primary_side,
        "bilateral": len(set(imaging.sides)) == 2,
        "phantom_seed": imaging.phantom_seed,
        "types": list(imaging.types),
        "primary_density": imaging.primary_density,
        "primary_shape": imaging.primary_shape,
        "ct_truth": "ct/truth.json",
    }


def hidden_truth(
    genotype: Genotype, stage: Stage, plan: Plan, clinical: Clinical
) -> dict[str, Any]:
    """What a client cannot know as of the study date: the true genotype, stage, follow-ups."""
    return {
        "genotype": {
            gene: {
                "status": "positive" if calls else "wild-type",
                "variants": [_call_truth(c) for c in calls],
            }
            for gene, calls in genotype.calls.items()
        },
        "tmb": genotype.tmb,
        "msi_high": genotype.msi_high,
        "acquired_after_study": ["EGFR T790M"] if plan.acquired_t790m else [],
        "stage": {
            "t": stage.t,
            "n": stage.n,
            "m": stage.m,
            "group": stage.group,
            "number": stage.number,
        },
        "ecog_followup": clinical.ecog_followup,
        "cea_followup": clinical.cea_followup,
        "panel_tested_before_study": list(plan.panel),
    }
