"""The synthetic cohort: valid R4 bundles, patient match, ground truth, determinism, CLI.

``_Client`` below is a small reference reader of a bundle written from the module docstring's
rules (not from the generator's code): the ground truth must be what it derives.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from fhir.resources.R4B.bundle import Bundle

from radfusion.cli import main
from radfusion.synth.cohort import (
    LUNG_PANEL,
    RESOURCE_KEY_SYSTEM,
    SITE_A_OID,
    SITE_B_URI,
    SynthCohort,
    synth_cohort,
)
from radfusion.synth.cohort_clinical import (
    FOLLOW_UP_DAYS,
    OUTCOME_INTERCEPT,
    OUTCOME_WEIGHTS,
    TUMOUR_TYPE_P,
    Imaging,
    draw_clinical,
    draw_demographics,
    draw_outcome,
    draw_stage,
    draw_tumour_types,
    stage_group,
    tumour_profile,
)
from radfusion.synth.cohort_genomics import draw_genotype

SMALL: dict[str, Any] = {"patients": 4, "seed": 11, "slices": 24, "size": 48}
LOINC = "http://loinc.org"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> SynthCohort:
    return synth_cohort(tmp_path_factory.mktemp("cohort"), **SMALL)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _codes(concept: dict[str, Any] | None) -> set[tuple[str, str]]:
    return {(c.get("system"), c.get("code")) for c in (concept or {}).get("coding", [])}


def _has(resource: dict[str, Any], system: str, code: str) -> bool:
    return (system, code) in _codes(resource.get("code"))


def _component(resource: dict[str, Any], code: str) -> dict[str, Any] | None:
    for comp in resource.get("component", []):
        if (LOINC, code) in _codes(comp["code"]):
            return comp
    return None


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


class _Client:
    """What a client following the documented rules derives from one patient's bundle."""

    def __init__(self, bundle: dict[str, Any], study_date: datetime.date) -> None:
        self.by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
        self.study_date = study_date

    @staticmethod
    def date(resource: dict[str, Any]) -> datetime.date | None:
        value = resource.get("effectiveDateTime") or resource.get("issued")
        return datetime.date.fromisoformat(value[:10]) if value else None

    def current(self, resource: dict[str, Any]) -> bool:
        day = self.date(resource)
        return day is not None and day <= self.study_date

    def observations(self, code: str) -> list[dict[str, Any]]:
        return sorted(
            (
                r
                for r in self.by_url.values()
                if r["resourceType"] == "Observation"
                and _has(r, LOINC, code)
                and r["status"] in ("final", "amended", "corrected")
                and self.current(r)
            ),
            key=lambda r: self.date(r) or datetime.date.min,
        )

    def latest(self, code: str) -> dict[str, Any] | None:
        found = self.observations(code)
        return found[-1] if found else None

    def reports(self) -> list[dict[str, Any]]:
        """Genomic reports as of the study date; a preliminary one yields to a final one with the
        same accession."""
        reports = [
            r
            for r in self.by_url.values()
            if r["resourceType"] == "DiagnosticReport"
            and _has(r, LOINC, "51969-4")
            and self.current(r)
        ]
        finals = {
            i["value"] for r in reports if r["status"] == "final" for i in r.get("identifier", [])
        }
        return [
            r
            for r in reports
            if r["status"] == "final" or not {i["value"] for i in r.get("identifier", [])} & finals
        ]

    def results(self, code: str) -> list[dict[str, Any]]:
        found = []
        for report in self.reports():
            for ref in report["result"]:
                r = self.by_url[ref["reference"]]
                if _has(r, LOINC, code) and r["status"] != "entered-in-error":
                    found.append(r)
        return found

    def genes(self) -> dict[str, dict[str, Any]]:
        tested = {
            _gene(r) for r in self.results("53041-0")
        }  # region studied: one gene-studied component each
        variants: dict[str, list[dict[str, Any]]] = {}
        for r in self.results("69548-6"):
            variants.setdefault(_gene(r), []).append(r)
        out = {}
        for gene in LUNG_PANEL:
            if gene not in tested:
                out[gene] = {"status": "untested", "variants": []}
            else:
                found = variants.get(gene, [])
                out[gene] = {"status": "positive" if found else "wild-type", "variants": found}
        return out


def _gene(resource: dict[str, Any]) -> str:
    comp = _component(resource, "48018-6")
    assert comp is not None, resource
    (coding,) = comp["valueCodeableConcept"]["coding"]
    assert coding["system"] == "http://www.genenames.org/geneId"
    assert coding["code"].startswith("HGNC:")
    return coding["display"]


def _key(resource: dict[str, Any]) -> str:
    (value,) = [
        i["value"] for i in resource["identifier"] if i.get("system") == RESOURCE_KEY_SYSTEM
    ]
    return value.split("/", 1)[1]


def _patient_files(cohort: SynthCohort) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(_load(p.bundle), _load(p.ground_truth)) for p in cohort.patients]


# -- bundles ---------------------------------------------------------------------------------


def test_bundles_validate_as_r4b_transactions(cohort: SynthCohort) -> None:
    for patient in cohort.patients:
        bundle = Bundle.model_validate_json(patient.bundle.read_text())
        assert bundle.type == "transaction"
        urls = [e.fullUrl for e in bundle.entry]
        assert len(set(urls)) == len(urls) and all(u.startswith("urn:uuid:") for u in urls)
        for entry in bundle.entry:
            assert type(entry.resource).__module__.startswith("fhir.resources.R4B."), entry
            assert (entry.request.method, entry.request.url) == (
                "POST",
                entry.resource.get_resource_type(),
            )
            assert [s.code for s in entry.resource.meta.security] == ["HTEST"]
        raw = _load(patient.bundle)
        assert set(_references(raw)) <= set(urls)  # every reference resolves inside the bundle


def test_bundle_has_the_documented_resources(cohort: SynthCohort) -> None:
    for raw, truth in _patient_files(cohort):
        resources = [e["resource"] for e in raw["entry"]]
        kinds = [r["resourceType"] for r in resources]
        assert kinds.count("Patient") == 1 and kinds.count("ImagingStudy") == 1
        (condition,) = [r for r in resources if r["resourceType"] == "Condition"]
        assert _codes(condition["code"]) & {
            ("http://snomed.info/sct", c) for c in ("254626006", "254634000", "254637007")
        }
        (site,) = condition["bodySite"]
        assert ("http://snomed.info/sct", "39607008") in _codes(site)
        for code in ("21908-9", "21905-5", "21906-3", "21907-1", "72166-2", "89247-1"):
            assert any(_has(r, LOINC, code) for r in resources), code
        for r in resources:
            if _has(r, LOINC, "69548-6"):
                assert _component(r, "48018-6") and _component(r, "48002-0")
                vaf = _component(r, "81258-6")
                assert vaf is not None and vaf["valueQuantity"]["system"] == (
                    "http://unitsofmeasure.org"
                )
                if _gene(r) != "ALK":  # the fusion has no HGVS
                    assert _component(r, "48004-6") and _component(r, "48005-3")
        (study,) = [r for r in resources if r["resourceType"] == "ImagingStudy"]
        assert {
            "system": "urn:dicom:uid",
            "value": f"urn:oid:{truth['dicom']['StudyInstanceUID']}",
        } in (study["identifier"])


# -- patient match ---------------------------------------------------------------------------


def test_patient_identifier_matches_the_ct(cohort: SynthCohort) -> None:
    types = set()
    for patient in cohort.patients:
        ds = pydicom.dcmread(patient.ct.files[0], stop_before_pixels=True)
        (item,) = ds.IssuerOfPatientIDQualifiersSequence
        types.add(item.UniversalEntityIDType)
        system = {"ISO": f"urn:oid:{item.UniversalEntityID}", "URI": item.UniversalEntityID}[
            item.UniversalEntityIDType
        ]
        raw = _load(patient.bundle)
        patients = [
            e["resource"] for e in raw["entry"] if e["resource"]["resourceType"] == "Patient"
        ]
        (resource,) = patients
        matches = [
            i for i in resource["identifier"] if (i["system"], i["value"]) == (system, ds.PatientID)
        ]
        assert len(matches) == 1 and matches[0]["type"]["coding"][0]["code"] == "MR"
        assert system == patient.identifier_system
        truth = _load(patient.ground_truth)
        assert truth["identifier"] == {"system": system, "value": ds.PatientID}
        assert truth["dicom"]["IssuerOfPatientIDQualifiersSequence"] == [
            {
                "UniversalEntityID": item.UniversalEntityID,
                "UniversalEntityIDType": item.UniversalEntityIDType,
            }
        ]
        # demographics agree (though a client must never match on them)
        assert ds.PatientBirthDate == resource["birthDate"].replace("-", "")
        assert ds.PatientSex == {"female": "F", "male": "M"}[resource["gender"]]
        assert (
            str(ds.PatientName)
            == f"{resource['name'][0]['family']}^{resource['name'][0]['given'][0]}"
        )
    assert types == {"ISO", "URI"}
    assert {p.identifier_system for p in cohort.patients} == {f"urn:oid:{SITE_A_OID}", SITE_B_URI}


def test_decoy_identifier_collides_only_without_the_system(cohort: SynthCohort) -> None:
    patients = [
        next(
            e["resource"]
            for e in _load(p.bundle)["entry"]
            if e["resource"]["resourceType"] == "Patient"
        )
        for p in cohort.patients
    ]
    for k, patient in enumerate(cohort.patients[1:], start=1):
        by_value = [
            p for p in patients if any(i["value"] == patient.patient_id for i in p["identifier"])
        ]
        by_token = [
            p
            for p in patients
            if any(
                (i["system"], i["value"]) == (patient.identifier_system, patient.patient_id)
                for i in p["identifier"]
            )
        ]
        assert len(by_value) == 2 and by_token == [patients[k]]


# -- ground truth ----------------------------------------------------------------------------


def test_ground_truth_is_what_a_client_derives(cohort: SynthCohort) -> None:
    for patient in cohort.patients:
        raw, truth = _load(patient.bundle), _load(patient.ground_truth)
        header = pydicom.dcmread(patient.ct.files[0], stop_before_pixels=True)
        study_date = datetime.datetime.strptime(header.StudyDate, "%Y%m%d").date()
        assert truth["study_date"] == study_date.isoformat()
        client = _Client(raw, study_date)
        context = truth["context"]
        (person,) = [r for r in client.by_url.values() if r["resourceType"] == "Patient"]
        birth = datetime.date.fromisoformat(person["birthDate"])
        age = (
            study_date.year
            - birth.year
            - ((study_date.month, study_date.day) < (birth.month, birth.day))
        )
        assert (context["sex"], context["age_at_study_years"]) == (person["gender"], age)

        smoking = client.latest("72166-2")
        assert smoking is not None and _key(smoking) == context["smoking_status"]["source"]["key"]
        (coding,) = smoking["valueCodeableConcept"]["coding"]
        assert f"{coding['system']}|{coding['code']}" == context["smoking_status"]["code"]

        ecog = client.latest("89247-1")
        assert ecog is not None and ecog["valueInteger"] == context["ecog"]["value"]
        karnofsky = client.latest("89243-0")
        assert (karnofsky or {}).get("valueInteger") == (context["karnofsky"] or {}).get("value")
        cea = client.latest("2039-6")
        assert [m["value"] for m in context["tumour_markers"]] == (
            [cea["valueQuantity"]["value"]] if cea else []
        )
        stage = client.latest("21908-9")
        assert stage is not None
        assert stage["valueCodeableConcept"]["coding"][0]["code"] == context["stage"]["ajcc_code"]

        (condition,) = [r for r in client.by_url.values() if r["resourceType"] == "Condition"]
        cancer = context["primary_cancer"]
        assert f"http://snomed.info/sct|{condition['code']['coding'][0]['code']}" == cancer["code"]
        histology = condition["extension"][0]["valueCodeableConcept"]["coding"][0]["code"]
        assert cancer["histology_code"].endswith(f"|{histology}")
        laterality = condition["bodySite"][0]["extension"][0]["valueCodeableConcept"]["coding"][0]
        assert laterality["display"].lower().startswith(cancer["laterality"])

        genes = client.genes()
        expected = context["genomics"]["genes"]
        assert {g: v["status"] for g, v in genes.items()} == {
            g: v["status"] for g, v in expected.items()
        }
        for gene, derived in genes.items():
            want = expected[gene]["variants"]
            assert [_key(r) for r in derived["variants"]] == [v["source"]["key"] for v in want]
            for r, v in zip(derived["variants"], want, strict=True):
                assert _component(r, "81258-6")["valueQuantity"]["value"] == v["vaf_percent"]
                c_hgvs = _component(r, "48004-6")
                assert (
                    c_hgvs["valueCodeableConcept"]["coding"][0]["code"] if c_hgvs else None
                ) == v["c_hgvs"]
        tmb = client.results("94076-7")
        assert [r["valueQuantity"]["value"] for r in tmb] == (
            [context["genomics"]["tmb"]["value"]] if context["genomics"]["tmb"] else []
        )
        assert context["genomics"]["tested"] == bool(client.reports())


def test_ground_truth_lists_every_resource_and_the_exclusions(cohort: SynthCohort) -> None:
    for raw, truth in _patient_files(cohort):
        study_date = datetime.date.fromisoformat(truth["study_date"])
        rows = {row["key"]: row for row in truth["resources"]}
        entries = {
            _key(e["resource"]) if e["resource"]["resourceType"] != "Patient" else "patient": e
            for e in raw["entry"]
        }
        assert rows.keys() == entries.keys()
        after = set()
        for key, entry in entries.items():
            resource, row = entry["resource"], rows[key]
            assert (row["fullUrl"], row["resourceType"]) == (
                entry["fullUrl"],
                resource["resourceType"],
            )
            assert row["status"] == resource.get("status")
            day = _Client.date(resource)
            if day is not None and day > study_date:
                after.add(key)
                assert row["disregard"] == "after-study-date" and row["after_study_date"]
            if resource.get("status") == "entered-in-error":
                assert row["disregard"] == "entered-in-error"
            if resource.get("status") == "preliminary":
                assert row["disregard"] == "superseded-preliminary"
        assert set(truth["excluded_after_study_date"]) == after
        # nothing the context uses is disregarded
        used = json.dumps(truth["context"])
        for key, row in rows.items():
            if row["disregard"]:
                assert f'"key": "{key}"' not in used, key


def test_scenarios_cover_untested_genes_dates_and_messiness(cohort: SynthCohort) -> None:
    truths = [t for _, t in _patient_files(cohort)]
    statuses = {v["status"] for t in truths for v in t["context"]["genomics"]["genes"].values()}
    assert {"untested", "wild-type"} <= statuses
    kinds = {m["kind"] for t in truths for m in t["messiness"]}
    assert {
        "preliminary-superseded",
        "entered-in-error",
        "no-effective-date",
        "after-study-date",
        "decoy-identifier",
    } <= kinds
    never_tested = truths[3]["context"]["genomics"]
    assert not never_tested["tested"] and any(
        k.startswith("genomics-followup") for k in truths[3]["excluded_after_study_date"]
    )
    for t in truths:  # a gene never tested is not wild-type, whatever the truth
        for gene, value in t["context"]["genomics"]["genes"].items():
            if value["status"] == "untested":
                assert gene not in t["truth"]["panel_tested_before_study"]


def test_outcome_follows_the_documented_logit(cohort: SynthCohort) -> None:
    for _, truth in _patient_files(cohort):
        outcome = truth["outcome"]
        assert outcome["features"].keys() == OUTCOME_WEIGHTS.keys()
        logit = OUTCOME_INTERCEPT + sum(
            OUTCOME_WEIGHTS[k] * v for k, v in outcome["features"].items()
        )
        assert outcome["logit"] == pytest.approx(logit, abs=1e-3)
        assert outcome["probability"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-3)
        assert isinstance(outcome["label"], bool)
        genotype = truth["truth"]["genotype"]
        driver = genotype["EGFR"]["status"] == "positive" or genotype["ALK"]["status"] == "positive"
        assert outcome["features"]["targetable_driver"] == float(driver)
        assert truth["synthetic"] is True and "not for clinical use" in truth["notice"]


def test_time_to_event_and_the_12_month_label_agree(cohort: SynthCohort) -> None:
    for _, truth in _patient_files(cohort):
        outcome = truth["outcome"]
        tte = outcome["time_to_event"]
        assert outcome["label"] == (tte["true_days"] <= 365)
        assert FOLLOW_UP_DAYS[0] <= tte["follow_up_days"] <= FOLLOW_UP_DAYS[1]
        assert tte["event"] == (tte["true_days"] <= tte["follow_up_days"])
        assert tte["days"] == min(tte["true_days"], tte["follow_up_days"])
        imaging = truth["imaging"]
        assert len(imaging["types"]) == imaging["tumour_count"]
        assert outcome["features"]["primary_subsolid"] == float(
            imaging["primary_density"] != "solid"
        )
        assert outcome["features"]["primary_spiculated"] == float(
            imaging["primary_shape"] == "spiculated"
        )


def test_the_label_is_drawn_with_the_generators_probability() -> None:
    """P(progression-free days <= 365) is the outcome's probability (2,000 draws, one patient's
    features): the time carries the same risk as the logistic label."""
    rng = np.random.default_rng(3)
    demo = draw_demographics(rng)
    genotype = draw_genotype(rng, "adenocarcinoma", "former")
    imaging = Imaging(1, 1, ("right",), (22.0,), 5.6, "right", 7, ("solid",), "solid", "sphere")
    stage = draw_stage(rng, imaging)
    clinical = draw_clinical(rng, demo, "former", "adenocarcinoma", stage)
    outcomes = [
        draw_outcome(np.random.default_rng(i), demo, clinical, stage, imaging, genotype)
        for i in range(2000)
    ]
    p = outcomes[0].probability
    share = sum(o.label for o in outcomes) / len(outcomes)
    assert abs(share - p) <= 3 * math.sqrt(p * (1 - p) / len(outcomes)) + 1e-3
    assert all(o.label == (o.progression_free_days <= 365) for o in outcomes)
    # Later progression is possible: the time is not cut at one year.
    assert any(o.progression_free_days > 365 for o in outcomes)


def test_tumour_types_follow_the_radiogenomic_associations() -> None:
    rng = np.random.default_rng(0)
    drawn = {profile: draw_tumour_types(rng, profile, 4000) for profile in TUMOUR_TYPE_P}

    def share(profile: str, kinds: set[str]) -> float:
        return sum(t in kinds for t in drawn[profile]) / len(drawn[profile])

    subsolid, solid = {"ground_glass", "part_solid"}, {"solid", "spiculated"}
    assert share("egfr", subsolid) > 0.5 > share("kras_or_smoker", subsolid)
    assert share("kras_or_smoker", solid) > 0.6 > share("egfr", solid)
    assert share("kras_or_smoker", {"spiculated"}) > 2 * share("egfr", {"spiculated"})
    genotype = draw_genotype(np.random.default_rng(1), "adenocarcinoma", "never")
    assert tumour_profile(genotype, "never") in ("egfr", "other")
    assert tumour_profile(genotype, "current") in ("egfr", "kras_or_smoker")


def test_cohort_index(cohort: SynthCohort) -> None:
    index = _load(cohort.index)
    assert index["synthetic"] is True and index["patient_count"] == 4
    assert [row["patient_id"] for row in index["patients"]] == [
        p.patient_id for p in cohort.patients
    ]
    for row, patient in zip(index["patients"], cohort.patients, strict=True):
        assert row["StudyInstanceUID"] == patient.ct.StudyInstanceUID
        assert (cohort.directory / row["directory"] / "bundle.json") == patient.bundle


@pytest.mark.parametrize(
    ("t", "n", "m", "group"),
    [
        ("T1a", "N0", "M0", "IA1"),
        ("T1c", "N0", "M0", "IA3"),
        ("T2a", "N0", "M0", "IB"),
        ("T3", "N0", "M0", "IIB"),
        ("T1b", "N1", "M0", "IIB"),
        ("T1a", "N2", "M0", "IIIA"),
        ("T3", "N2", "M0", "IIIB"),
        ("T1c", "N3", "M0", "IIIB"),
        ("T3", "N3", "M0", "IIIC"),
        ("T1a", "N0", "M1a", "IVA"),
        ("T3", "N1", "M1c", "IVB"),
    ],
)
def test_stage_group_follows_ajcc_8(t: str, n: str, m: str, group: str) -> None:
    assert stage_group(t, n, m) == group


# -- determinism -----------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_patients_do_not_depend_on_n(
    cohort: SynthCohort, tmp_path: Path
) -> None:
    again = synth_cohort(tmp_path / "again", **{**SMALL, "patients": 2})
    for patient in again.patients:
        first = cohort.directory / patient.patient_id
        names = sorted(
            p.relative_to(patient.directory) for p in patient.directory.rglob("*") if p.is_file()
        )
        assert names == sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
        for name in names:
            assert (patient.directory / name).read_bytes() == (first / name).read_bytes(), name
    other = synth_cohort(tmp_path / "other", **{**SMALL, "patients": 1, "seed": 12})
    assert other.patients[0].patient_id == "RFC12-0001"
    assert other.patients[0].ct.StudyInstanceUID != cohort.patients[0].ct.StudyInstanceUID


def test_rerun_into_a_cohort_folder_rewrites_it(tmp_path: Path) -> None:
    first = synth_cohort(tmp_path, **{**SMALL, "patients": 2})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    second = synth_cohort(tmp_path, **{**SMALL, "patients": 1})
    assert not first.patients[1].directory.exists()  # the patient the new cohort lacks
    assert second.patients[0].bundle.read_bytes() == before[first.patients[0].bundle]


# -- arguments and CLI -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"patients": 0}, ValueError, "patients"),
        ({"patients": -3}, ValueError, "patients"),
        ({"patients": "4"}, TypeError, "patients"),
        ({"patients": True}, TypeError, "patients"),
        ({"patients": 1, "seed": -1}, ValueError, "seed"),
        ({"patients": 1, "slices": 2}, ValueError, "slices"),
        ({"patients": 1, "size": 16}, ValueError, "size"),
    ],
)
def test_synth_cohort_rejects_bad_arguments(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        synth_cohort(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are checked


def test_synth_cohort_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="out_dir"):
        synth_cohort(tmp_path, patients=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_writes_a_cohort(tmp_path: Path) -> None:
    args = ["synth", "cohort", "--out", str(tmp_path), "--patients", "1", "--seed", "3"]
    result = CliRunner().invoke(main, [*args, "--slices", "24", "--size", "48"])
    assert result.exit_code == 0, result.output
    assert "RFC3-0001" in result.output and "wrote 1 patient(s)" in result.output
    index = _load(tmp_path / "cohort.json")
    assert index["seed"] == 3 and index["ct"]["slices"] == 24
    assert Bundle.model_validate_json((tmp_path / "RFC3-0001" / "bundle.json").read_text())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--patients", "0"], "--patients"),
        (["--patients", "x"], "--patients"),
        (["--seed", "-1"], "--seed"),
        (["--size", "8"], "--size"),
        (["--slices", "2"], "--slices"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["synth", "cohort", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_cli_reports_a_foreign_folder_clearly(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    result = CliRunner().invoke(
        main, ["synth", "cohort", "--out", str(tmp_path), "--patients", "1"]
    )
    assert result.exit_code == 1 and "not empty" in result.output
    assert "Traceback" not in result.output
