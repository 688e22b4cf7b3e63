"""Patient context from a real FHIR server (Medplum) loaded with the synthetic cohort: the
context equals the cohort's ground truth, and every way of not getting one is a reason."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from radfusion.config import FhirConfig
from radfusion.fusion.dataset import context_from_truth
from radfusion.integrations.fhir.provider import (
    ContextOutcome,
    ContextUnavailable,
    PatientContextProvider,
)
from radfusion.operators.fusion_features import fusion_inputs
from tests.fhir_support import cohort_patients, operation_outcome, registered_smart_client

pytestmark = pytest.mark.integration

GENE_STATUS = {"positive": "present", "wild-type": "absent", "untested": "not-tested"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Four patients (one of each scenario): header, bundle and ground truth."""
    return cohort_patients(
        tmp_path_factory.mktemp("cohort"), patients=4, seed=11, slices=24, size=48
    )


@pytest.fixture
def loaded(fhir_tenant: Any, cohort: list[dict[str, Any]]) -> Any:
    for patient in cohort:
        fhir_tenant.post(patient["bundle"])
    return fhir_tenant


def _context(base_url: str, header: Any, **config: Any) -> ContextOutcome:
    settings = {"retry": {"attempts": 2, "initial_backoff_s": 0.05}, **config}
    provider = PatientContextProvider(FhirConfig(base_url=base_url, **settings))
    try:
        return provider(header)
    finally:
        provider.close()


def _key_of(endpoint: Any, reference: str, patient_id: str) -> str:
    """The cohort key of a resource (its identifier ``<PatientID>/<key>``)."""
    resource = endpoint.get(reference)
    for identifier in resource.get("identifier") or []:
        value = str(identifier.get("value", ""))
        if value.startswith(f"{patient_id}/"):
            return value.removeprefix(f"{patient_id}/")
    raise AssertionError(f"{reference} has no cohort key")


def test_context_equals_the_ground_truth(loaded: Any, cohort: list[dict[str, Any]]) -> None:
    for patient in cohort:
        truth, header = patient["truth"], patient["header"]
        expected = truth["context"]
        outcome = _context(loaded.base_url, header, page_size=3)  # several pages per search
        assert outcome.status == "available", outcome.reason
        context = outcome.context
        assert context is not None
        pid = truth["patient_id"]
        assert context.sex.value == expected["sex"]
        assert context.age_years.value == expected["age_at_study_years"]
        assert context.smoking.value is not None
        assert context.smoking.value.token == expected["smoking_status"]["code"]
        assert (
            _key_of(loaded, context.smoking.sources[0].reference, pid)
            == (expected["smoking_status"]["source"]["key"])
        )
        assert context.ecog.value == expected["ecog"]["value"]
        assert context.karnofsky.value == (expected.get("karnofsky") or {}).get("value")
        assert context.cancer.value is not None
        assert context.cancer.value.code == expected["primary_cancer"]["code"].split("|")[1]
        assert context.stage_group.value is not None
        assert context.stage_group.value.code == expected["stage"]["ajcc_code"]
        genomics = expected["genomics"]
        for gene, result in genomics["genes"].items():
            got = context.genes[gene]
            assert got.status == GENE_STATUS[result["status"]], (pid, gene)
            assert sorted(v.hgvs_p or "" for v in got.variants) == sorted(
                v["p_hgvs"] or "" for v in result["variants"]
            ), (pid, gene)
        if genomics.get("tmb"):
            assert context.tmb.value == pytest.approx(genomics["tmb"]["value"])
        else:
            assert context.tmb.value is None and context.tmb.missing
        # Nothing dated after the study leaks in, and each left-out result is counted.
        used = {s.reference for fact in (context.ecog, context.smoking) for s in fact.sources}
        used |= {s.reference for g in context.genes.values() for s in g.sources}
        keys = {_key_of(loaded, r, pid) for r in used}
        assert not keys & set(truth["excluded_after_study_date"]), pid
        if truth["excluded_after_study_date"]:
            assert context.excluded.get("after the study date", 0) >= 1
        # The fusion model is trained on the ground truth's context: the context read from
        # the server must give it the same inputs.
        served, trained = (
            fusion_inputs([], context),
            fusion_inputs([], context_from_truth(expected)),
        )
        assert served.present == trained.present, pid
        np.testing.assert_allclose(served.values, trained.values, atol=1e-6, err_msg=pid)


def test_paging_follows_next_links(
    loaded: Any, fhir_proxy: Any, cohort: list[dict[str, Any]]
) -> None:
    proxy = fhir_proxy(loaded)
    outcome = _context(proxy.base_url, cohort[0]["header"], page_size=2)
    assert outcome.status == "available"
    pages = [r for r in proxy.requests if r.path.split("?")[0].endswith("/Observation")]
    assert len(pages) >= 3
    # Every page asks for this patient's Observations (a next link keeps the query), and the
    # pages after the first move on.
    subject = pages[0].query["subject"]
    assert all(r.query.get("subject") == subject for r in pages)
    assert len({tuple(r.query.get("_offset", ["0"])) for r in pages}) == len(pages)


def test_no_match_two_matches_and_unmapped_issuer(
    loaded: Any, cohort: list[dict[str, Any]]
) -> None:
    header = cohort[0]["header"]
    stranger = copy.deepcopy(header)  # Dataset.update would share (and change) the elements
    stranger.PatientID = "NOT-A-PATIENT"
    outcome = _context(loaded.base_url, stranger)
    assert (outcome.status, outcome.reason) == (
        "no-patient",
        "no Patient has the study's identifier",
    )

    identifier = cohort[0]["truth"]["identifier"]
    loaded.post(
        {
            "resourceType": "Patient",
            "identifier": [{"system": identifier["system"], "value": identifier["value"]}],
        }
    )
    twice = _context(loaded.base_url, header)
    assert twice.status == "no-patient" and "2 Patients share" in twice.reason

    unmapped = copy.deepcopy(cohort[1]["header"])
    del unmapped.IssuerOfPatientIDQualifiersSequence
    outcome = _context(loaded.base_url, unmapped)
    assert outcome.status == "no-patient" and "not mapped" in outcome.reason
    system = cohort[1]["truth"]["identifier"]["system"]
    mapped = _context(loaded.base_url, unmapped, issuers={str(unmapped.IssuerOfPatientID): system})
    assert mapped.status == "available"


def test_server_down_gives_imaging_only_or_holds(
    loaded: Any, fhir_proxy: Any, cohort: list[dict[str, Any]]
) -> None:
    proxy = fhir_proxy(loaded)
    proxy.down = True
    outcome = _context(proxy.base_url, cohort[0]["header"])
    assert outcome.status == "unavailable" and "ConnectError" in outcome.reason
    with pytest.raises(ContextUnavailable, match=proxy.base_url):
        _context(proxy.base_url, cohort[0]["header"], on_unavailable="hold")


def test_slow_server_times_out(loaded: Any, fhir_proxy: Any, cohort: list[dict[str, Any]]) -> None:
    proxy = fhir_proxy(loaded)
    proxy.delay_s = 2.0
    outcome = _context(proxy.base_url, cohort[0]["header"], timeout_s=0.3)
    assert outcome.status == "unavailable" and "Timeout" in outcome.reason


def test_transient_failures_are_retried(
    loaded: Any, fhir_proxy: Any, cohort: list[dict[str, Any]]
) -> None:
    proxy = fhir_proxy(loaded)
    proxy.fail_next(2, status=503)
    outcome = _context(
        proxy.base_url, cohort[0]["header"], retry={"attempts": 3, "initial_backoff_s": 0.05}
    )
    assert outcome.status == "available"


def test_operation_outcome_is_reported_without_its_text(
    loaded: Any,
    fhir_proxy: Any,
    cohort: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = fhir_proxy(loaded)
    secret = "Patient Jane Example born 1961-02-03 is restricted"
    proxy.fail_next(1, status=403, body=operation_outcome("forbidden", secret))
    with caplog.at_level(logging.INFO):
        outcome = _context(proxy.base_url, cohort[0]["header"])
    assert outcome.status == "refused"
    assert "HTTP 403" in outcome.reason and "error forbidden" in outcome.reason
    assert "Jane" not in outcome.reason and "Jane" not in caplog.text
    assert str(cohort[0]["header"].PatientID) not in caplog.text


def test_smart_backend_services_token_is_refreshed_after_401(
    loaded: Any,
    fhir_proxy: Any,
    smart_token_endpoint: Any,
    cohort: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    auth = registered_smart_client(smart_token_endpoint, tmp_path, "ES384")
    proxy = fhir_proxy(loaded)
    proxy.require_bearer(smart_token_endpoint.validate)
    provider = PatientContextProvider(FhirConfig(base_url=proxy.base_url, auth=auth))
    try:
        assert provider(cohort[0]["header"]).status == "available"
        assert len(smart_token_endpoint.issued) == 1  # cached across all the searches
        smart_token_endpoint.revoke_all()  # the server forgets the token: 401, then a new one
        assert provider(cohort[0]["header"]).status == "available"
        assert len(smart_token_endpoint.issued) == 2
        assert any(r.status == 401 for r in proxy.requests)
    finally:
        provider.close()


def _consent(
    patient: str, provision: dict[str, Any], policy: str, scope: str = "patient-privacy"
) -> dict[str, Any]:
    """An active Consent of ``patient`` with ``provision``."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": scope}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "policyRule": {"text": policy},
        "provision": provision,
    }


def test_without_consent_no_genomics_are_fetched(
    loaded: Any, fhir_proxy: Any, cohort: list[dict[str, Any]]
) -> None:
    proxy = fhir_proxy(loaded)
    outcome = _context(proxy.base_url, cohort[0]["header"], consent_required=True)
    assert outcome.context is not None and outcome.context.genes == {}
    assert "no active privacy or treatment Consent" in outcome.context.tmb.missing
    assert not [r for r in proxy.requests if "DiagnosticReport" in r.path]
    (observations,) = [r for r in proxy.requests if r.path.split("?")[0].endswith("Observation")]
    asked = observations.query["code"][0]
    assert not any(code in asked for code in ("69548-6", "53041-0", "94076-7", "81695-9"))
    assert outcome.context.ecog.value is not None  # clinical data still comes
    patient = outcome.context.patient.reference
    # A research consent, permit or deny, does not govern clinical use.
    loaded.post(_consent(patient, {"type": "permit"}, "biobank", scope="research"))
    loaded.post(_consent(patient, {"type": "deny"}, "no registry", scope="research"))
    research_only = _context(loaded.base_url, cohort[0]["header"], consent_required=True)
    assert research_only.context is not None and research_only.context.genes == {}
    assert "no active privacy or treatment Consent" in research_only.context.tmb.missing
    loaded.post(_consent(patient, {"type": "permit"}, "genomic data for decision support"))
    permitted = _context(loaded.base_url, cohort[0]["header"], consent_required=True)
    assert permitted.context is not None and permitted.context.tested_genes()
    # A permit with a nested deny (e.g. of genetic data) withholds genomics.
    loaded.post(
        _consent(patient, {"type": "permit", "provision": [{"type": "deny"}]}, "no genetic data")
    )
    nested = _context(loaded.base_url, cohort[0]["header"], consent_required=True)
    assert nested.context is not None and nested.context.genes == {}
    assert "denies" in nested.context.tmb.missing


def test_study_resolved_through_its_imaging_study(
    loaded: Any, cohort: list[dict[str, Any]]
) -> None:
    # The header's Patient ID is of no use here; the ImagingStudy names the subject.
    header = copy.deepcopy(cohort[2]["header"])
    header.PatientID = "UNKNOWN-AT-THIS-SITE"
    assert _context(loaded.base_url, header).status == "no-patient"
    outcome = _context(loaded.base_url, header, resolve_through_imaging_study=True)
    assert outcome.status == "available", outcome.reason
    assert outcome.context is not None
    assert outcome.context.sex.value == cohort[2]["truth"]["context"]["sex"]


SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"


def _coded(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def test_resources_shaped_as_synthea_and_mcode_write_them(
    fhir_tenant: Any, cohort: list[dict[str, Any]]
) -> None:
    """A Synthea lung cancer Condition (stage in the concept), an mCODE pathologic stage group
    coded in SNOMED CT, and a region studied naming two genes in one component: each is found
    by the searches the provider sends to the real server and read whole."""
    header, identifier = cohort[0]["header"], cohort[0]["truth"]["identifier"]
    patient = fhir_tenant.post(
        {
            "resourceType": "Patient",
            "identifier": [{"system": identifier["system"], "value": identifier["value"]}],
            "gender": "male",
            "birthDate": "1950-01-01",
        }
    )
    subject = {"reference": f"Patient/{patient['id']}"}
    condition = fhir_tenant.post(
        {
            "resourceType": "Condition",
            "clinicalStatus": _coded(
                "http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"
            ),
            "code": _coded(
                SNOMED,
                "67811000119102",
                "Primary small cell malignant neoplasm of lung, TNM stage 1",
            ),
            "subject": subject,
            "onsetDateTime": "2000-01-01T00:00:00Z",
        }
    )
    outcome = _context(fhir_tenant.base_url, header)
    assert outcome.status == "available" and outcome.context is not None, outcome.reason
    context = outcome.context
    assert context.cancer.value is not None and context.cancer.value.code == "67811000119102"
    assert context.stage_group.value is not None
    assert context.stage_group.value.code == "258215001"  # Stage 1, from the concept
    assert context.stage_group.sources[0].reference == f"Condition/{condition['id']}"
    assert "67811000119102" in context.stage_group.derived

    stage = fhir_tenant.post(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": _coded(SNOMED, "399588009", "Pathologic TNM stage grouping"),
            "subject": subject,
            "effectiveDateTime": "2000-02-01",
            "valueCodeableConcept": _coded(
                SNOMED, "1222805004", "American Joint Committee on Cancer stage IIB"
            ),
        }
    )
    gene_studied = {"system": "http://www.genenames.org/geneId"}
    fhir_tenant.post(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": _coded(LOINC, "53041-0", "DNA region of interest panel"),
            "subject": subject,
            "effectiveDateTime": "2000-02-01",
            "component": [
                {
                    "code": _coded(LOINC, "48018-6", "Gene studied [ID]"),
                    "valueCodeableConcept": {
                        "coding": [
                            {**gene_studied, "code": "HGNC:11998", "display": "TP53"},
                            {**gene_studied, "code": "HGNC:11389", "display": "STK11"},
                        ]
                    },
                }
            ],
        }
    )
    context = _context(fhir_tenant.base_url, header).context
    assert context is not None
    assert context.stage_group.value is not None
    assert context.stage_group.value.code == "1222805004" and not context.stage_group.derived
    assert context.stage_group.sources[0].reference == f"Observation/{stage['id']}"
    assert (context.genes["TP53"].status, context.genes["STK11"].status) == ("absent", "absent")
