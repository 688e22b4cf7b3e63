"""The patient context from FHIR resources: codes, not profiles; provenance on every value;
tested-absent vs not tested; nothing after the study date."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydicom.dataset import Dataset

from radfusion.config import FhirConfig
from radfusion.integrations.fhir.client import SearchResult
from radfusion.integrations.fhir.context import build_context
from radfusion.integrations.fhir.patient import patient_identifier
from radfusion.patient_context import ContextOutcome

LOINC = "http://loinc.org"
STUDY = dt.date(2026, 3, 10)


def _concept(system: str, code: str, display: str = "") -> dict[str, Any]:
    return {
        "coding": [{"system": system, "code": code, **({"display": display} if display else {})}]
    }


def _gene(symbol: str, hgnc: str) -> dict[str, Any]:
    return {
        "code": _concept(LOINC, "48018-6"),
        "valueCodeableConcept": _concept("http://www.genenames.org/geneId", hgnc, symbol),
    }


def _obs(oid: str, code: str, when: str | None = "2026-03-01", **extra: Any) -> dict[str, Any]:
    resource = {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"versionId": "2"},
        "status": "final",
        "code": _concept(LOINC, code),
        "subject": {"reference": "Patient/p1"},
        **extra,
    }
    if when:
        resource["effectiveDateTime"] = when
    return resource


PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"versionId": "1"},
    "gender": "female",
    "birthDate": "1960-03-11",
}


def _context(observations: list[dict[str, Any]], **kw: Any) -> Any:
    return build_context(
        PATIENT,
        STUDY,
        SearchResult(match=observations),
        SearchResult(),
        SearchResult(),
        **kw,
    )


def test_variant_region_studied_and_untested_genes_are_told_apart() -> None:
    egfr = _obs(
        "v1",
        "69548-6",
        valueCodeableConcept=_concept(LOINC, "LA9633-4", "Present"),
        component=[
            _gene("EGFR", "HGNC:3236"),
            {"code": _concept(LOINC, "48005-3"), "valueCodeableConcept": _concept(
                "http://varnomen.hgvs.org", "p.Leu858Arg", "p.Leu858Arg")},
            {"code": _concept(LOINC, "81258-6"), "valueQuantity": {"value": 0.31}},
            {"code": _concept(LOINC, "48002-0"), "valueCodeableConcept": _concept(
                LOINC, "LA6684-0", "Somatic")},
        ],
    )  # fmt: skip
    region = _obs(
        "r1", "53041-0", component=[_gene("EGFR", "HGNC:3236"), _gene("KRAS", "HGNC:6407")]
    )
    context = _context([egfr, region])
    assert context.genes["EGFR"].status == "present"
    (variant,) = context.genes["EGFR"].variants
    assert (variant.hgvs_p, variant.vaf_percent, variant.origin) == ("p.Leu858Arg", 31.0, "somatic")
    assert variant.source.versioned == "Observation/v1/_history/2"
    assert context.genes["KRAS"].status == "absent"  # tested (region studied), no variant
    assert context.genes["KRAS"].sources[0].reference == "Observation/r1"
    assert context.genes["ALK"].status == "not-tested"
    assert context.tested_genes() == {"EGFR", "KRAS"}


def test_results_after_the_study_date_never_leak() -> None:
    early = _obs("e1", "89247-1", "2026-02-01", valueInteger=1)
    late = _obs("e2", "89247-1", "2026-03-11", valueInteger=3)
    context = _context([early, late])
    assert context.ecog.value == 1 and context.ecog.sources[0].reference == "Observation/e1"
    assert context.excluded == {"after the study date": 1}
    # A site may allow results taken shortly after the scan (e.g. the biopsy's pathology).
    assert _context([early, late], results_after_study_days=2).ecog.value == 3


def test_erroneous_preliminary_and_undated_results_are_left_out_and_counted() -> None:
    context = _context(
        [
            _obs("x1", "72166-2", status="entered-in-error",
                 valueCodeableConcept=_concept("http://snomed.info/sct", "77176002", "Smoker")),
            _obs("x2", "94076-7", when=None, valueQuantity={"value": 12.0}),
            _obs("x3", "81695-9", status="preliminary",
                 valueCodeableConcept=_concept(LOINC, "LA14122-8", "MSI-H")),
        ]
    )  # fmt: skip
    assert context.smoking.value is None and "no smoking status" in context.smoking.missing
    assert context.tmb.value is None and context.msi.value is None
    assert context.excluded == {"status entered-in-error": 1, "undated": 1, "status preliminary": 1}


def test_age_at_the_study_date_and_missing_values_say_why() -> None:
    context = _context([])
    assert context.age_years.value == 65  # the birthday is the day after the study
    assert context.sex.value == "female"
    assert context.cancer.value is None and "lung cancer" in context.cancer.missing
    assert context.stage_group.missing


def test_identifier_from_the_issuer_qualifiers_sequence() -> None:
    ds = Dataset()
    ds.PatientID = "RF-0001"
    item = Dataset()
    item.UniversalEntityID = "1.2.826.0.1.3680043.10.1234.99"
    item.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [item]
    ident = patient_identifier(ds, FhirConfig(base_url="http://x"))
    assert ident.token == "urn:oid:1.2.826.0.1.3680043.10.1234.99|RF-0001"


def test_identifier_through_the_site_issuer_map_or_not_at_all() -> None:
    ds = Dataset()
    ds.PatientID = "12345"
    ds.IssuerOfPatientID = "HOSP_A"
    mapped = FhirConfig(base_url="http://x", issuers={"HOSP_A": "http://hosp-a.example/mrn"})
    assert patient_identifier(ds, mapped).token == "http://hosp-a.example/mrn|12345"
    unmapped = patient_identifier(ds, FhirConfig(base_url="http://x"))
    assert unmapped.system is None and "not mapped" in unmapped.reason
    del ds.IssuerOfPatientID
    assert "no issuer" in patient_identifier(ds, FhirConfig(base_url="http://x")).reason


def test_outcome_describes_what_was_found_or_why_not() -> None:
    region = _obs("r1", "53041-0", component=[_gene("KRAS", "HGNC:6407"), _gene("EGFR", "x")])
    late = _obs("e2", "89247-1", "2026-03-11", valueInteger=3)
    assert ContextOutcome("available", _context([region, late])).describe() == (
        "Clinical and genomic data (FHIR): available as of the study date 2026-03-10; "
        "genes tested: EGFR, KRAS; results left out: 1 after the study date"
    )
    withheld = _context([region], genomics_withheld="genomic data withheld: no Consent")
    assert ContextOutcome("available", withheld).describe() == (
        "Clinical and genomic data (FHIR): available as of the study date 2026-03-10; "
        "genomic data withheld: no Consent"
    )
    assert withheld.genes == {}
    assert ContextOutcome("available", _context([])).describe().endswith("; no gene tested")
    assert ContextOutcome("no-patient", reason="no Patient matches").describe() == (
        "Clinical and genomic data (FHIR): none, the patient was not identified "
        "(no Patient matches)"
    )
    for status, words in (
        ("unavailable", "could not be reached"),
        ("refused", "refused the request"),
        ("no-study-date", "not looked up"),
    ):
        assert words in ContextOutcome(status, reason="x").describe()  # type: ignore[arg-type]


def _condition(cid: str, verification: str | None, clinical: str = "active") -> dict[str, Any]:
    condition: dict[str, Any] = {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": "Patient/p1"},
        "code": _concept("http://snomed.info/sct", "254626006", "Adenocarcinoma of lung"),
        "clinicalStatus": _concept(
            "http://terminology.hl7.org/CodeSystem/condition-clinical", clinical
        ),
        "recordedDate": "2026-01-05" if cid == "c1" else "2026-02-05",
    }
    if verification:
        condition["verificationStatus"] = _concept(
            "http://terminology.hl7.org/CodeSystem/condition-ver-status", verification
        )
    return condition


def test_only_a_confirmed_diagnosis_is_the_cancer() -> None:
    def cancer_of(*conditions: dict[str, Any]) -> Any:
        return build_context(
            PATIENT, STUDY, SearchResult(), SearchResult(), SearchResult(match=list(conditions))
        )

    # The later record is a suspicion only: the confirmed earlier one stands.
    context = cancer_of(_condition("c1", "confirmed", "remission"), _condition("c2", "provisional"))
    assert context.cancer.sources[0].reference == "Condition/c1"
    assert context.cancer.value.clinical_status == "remission"
    assert context.excluded == {"condition provisional": 1}
    for status in ("unconfirmed", "differential", "refuted", "entered-in-error"):
        assert cancer_of(_condition("c2", status)).cancer.value is None, status
    assert cancer_of(_condition("c2", None)).cancer.value is not None  # R4 allows no status


SNOMED = "http://snomed.info/sct"


def _synthea_condition(code: str, display: str) -> dict[str, Any]:
    """A Condition as Synthea's lung_cancer module writes it (SNOMED CT only, no stage
    Observation, onsetDateTime, no verification status)."""
    return {
        "resourceType": "Condition",
        "id": f"syn-{code}",
        "meta": {"versionId": "1"},
        "clinicalStatus": _concept(
            "http://terminology.hl7.org/CodeSystem/condition-clinical", "active"
        ),
        "category": [_concept("http://terminology.hl7.org/CodeSystem/condition-category",
                              "encounter-diagnosis", "Encounter Diagnosis")],
        "code": {**_concept(SNOMED, code, display), "text": display},
        "subject": {"reference": "Patient/p1"},
        "onsetDateTime": "2025-11-02T10:21:09+00:00",
        "recordedDate": "2025-11-02T10:21:09+00:00",
    }  # fmt: skip


def test_a_stage_in_the_condition_code_is_read_when_no_stage_observation_exists() -> None:
    def context_of(*resources: dict[str, Any], observations: Any = ()) -> Any:
        return build_context(
            PATIENT,
            STUDY,
            SearchResult(match=list(observations)),
            SearchResult(),
            SearchResult(match=list(resources)),
        )

    nsclc_1 = _synthea_condition("424132000", "Non-small cell carcinoma of lung, TNM stage 1")
    sclc_1 = _synthea_condition(
        "67811000119102", "Primary small cell malignant neoplasm of lung, TNM stage 1"
    )
    nsclc_3 = _synthea_condition("422968005", "Non-small cell carcinoma of lung, TNM stage 3")
    for condition, stage in ((nsclc_1, "258215001"), (sclc_1, "258215001"), (nsclc_3, "258224005")):
        context = context_of(condition)
        assert context.cancer.value is not None, condition["code"]  # recognised as lung cancer
        assert context.stage_group.value.token == f"{SNOMED}|{stage}"
        assert context.stage_group.sources[0].reference == f"Condition/{condition['id']}"
        assert condition["code"]["coding"][0]["code"] in context.stage_group.derived
    # A stage group Observation outweighs the concept's stage; an unstaged concept gives none.
    observed = _obs("s1", "21908-9", valueCodeableConcept=_concept(SNOMED, "258219007", "Stage 2"))
    context = context_of(nsclc_1, observations=[observed])
    assert context.stage_group.value.code == "258219007" and not context.stage_group.derived
    unstaged = _synthea_condition("254637007", "Non-small cell lung cancer")
    assert context_of(unstaged).stage_group.value is None


def test_an_mcode_stage_group_coded_in_snomed_ct_is_read() -> None:
    """mCODE's TNMClinicalStageGroup / TNMPathologicalStageGroup: code SNOMED CT 399537006 /
    399588009, value an AJCC stage coded in SNOMED CT."""
    clinical = _obs("tnm-c", "x", valueCodeableConcept=_concept(SNOMED, "1222806003",
                    "American Joint Committee on Cancer stage IIIA"))  # fmt: skip
    clinical["code"] = _concept(SNOMED, "399537006", "Clinical TNM stage grouping")
    pathologic = _obs("tnm-p", "x", "2026-03-05", valueCodeableConcept=_concept(SNOMED,
                      "1222805004", "American Joint Committee on Cancer stage IIB"))  # fmt: skip
    pathologic["code"] = _concept(SNOMED, "399588009", "Pathologic TNM stage grouping")
    context = _context([clinical, pathologic])
    assert context.stage_group.value.code == "1222805004"  # the latest of the two
    assert context.stage_group.sources[0].reference == "Observation/tnm-p"


def test_a_region_studied_lists_every_gene_however_it_is_sent() -> None:
    several_codings = _obs("r1", "53041-0", component=[{
        "code": _concept(LOINC, "48018-6"),
        "valueCodeableConcept": {"coding": [
            {"system": "http://www.genenames.org/geneId", "code": "HGNC:11998", "display": "TP53"},
            {"system": "http://www.genenames.org/geneId", "code": "HGNC:11389"},  # no display
        ]},
    }])  # fmt: skip
    in_text = _obs("r2", "53041-0", component=[
        {"code": _concept(LOINC, "48018-6"), "valueCodeableConcept": {"text": "ALK; ros1"}},
    ])  # fmt: skip
    context = _context([several_codings, in_text])
    assert {g for g, r in context.genes.items() if r.status == "absent"} == {
        "TP53", "STK11", "ALK", "ROS1"
    }  # fmt: skip
    assert context.genes["STK11"].sources[0].reference == "Observation/r1"
    assert context.genes["EGFR"].status == "not-tested"
