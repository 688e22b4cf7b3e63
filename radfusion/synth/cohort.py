"""Synthetic lung-cancer cohort: chest CT phantoms, FHIR R4 patient records and ground truth.

**Everything here is synthetic.** No real patient, no real record, and no clinical claim: the
rules below borrow textbook associations (EGFR in never-smokers, KRAS in smokers, stage from
tumour size) so that a fusion model has something learnable, but their numbers are made up. Not
for clinical use; every file written says so.

Test data for the FHIR patient context (issue 5) and training data for the fusion model that
follows it. :func:`synth_cohort` (``radfusion synth cohort --out DIR --patients N --seed S``)
writes::

    DIR/cohort.json                       index: one row per patient, the rules' constants
    DIR/<PatientID>/ct/                   chest CT series + labels.npz + truth.json (synth.ct)
    DIR/<PatientID>/bundle.json           FHIR R4 transaction Bundle (POST it to a server base)
    DIR/<PatientID>/ground_truth.json     the context a correct client derives, and the truth

Patient match
    PatientID is ``RFC<seed>-<n>`` (n = index + 1, four digits). Patients with ``index % 4 != 3``
    come from site A, whose issuer is the ISO OID :data:`SITE_A_OID`: the CT's Issuer of Patient
    ID Qualifiers Sequence holds UniversalEntityID = the OID, UniversalEntityIDType = ISO, and the
    Patient's identifier system is ``urn:oid:<OID>``. Patients with ``index % 4 == 3`` come from
    site B, whose issuer is the URI :data:`SITE_B_URI`: UniversalEntityIDType = URI and the
    identifier system is the URI itself. Issuer of Patient ID (0010,0021) is ``RADFUSION-A`` or
    ``RADFUSION-B``, for a site configuration that maps local issuers. Every Patient also has a
    second identifier in :data:`DECOY_SYSTEM` whose *value* is the next patient's PatientID
    (deliberately): searching ``Patient?identifier=<value>`` without the system finds two
    patients, ``identifier=<system>|<value>`` exactly one. The CT's PatientName, PatientSex,
    PatientBirthDate and PatientAge are the Patient's, so nothing disagrees (but a client must
    never match on them).

Bundle content (the Bundle is validated with ``fhir.resources.R4B`` and written as it
serialises it; every resource carries ``meta.security`` HTEST "test health data", every one but
the Patient an identifier in :data:`RESOURCE_KEY_SYSTEM` whose value ``<PatientID>/<key>``
names it in the ground truth; references are ``urn:uuid:`` fullUrls inside the transaction,
every request is a plain ``POST``, so posting a bundle twice makes a second patient)
    - Patient: MRN identifier (above), decoy identifier, synthetic name, gender, birthDate.
    - ImagingStudy: ``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``, accession, one CT series.
    - Condition (mCODE PrimaryCancerCondition): SNOMED 254626006 Adenocarcinoma of lung or
      254634000 Squamous cell carcinoma of lung (30 % of patients only the generic 254637007
      Non-small cell lung cancer); histology in the mCODE histology-morphology-behavior
      extension (SNOMED 1187332001 / 1162767002); bodySite 39607008 Lung structure with the mCODE
      laterality-qualifier extension (24028007 Right / 7771000 Left); stage summary + assessment.
    - TNM: stage group LOINC 21908-9 (value AJCC ``http://cancerstaging.org``, method SNOMED
      897275008 AJCC 8th edition) with hasMember T 21905-5, N 21906-3, M 21907-1.
    - Smoking status LOINC 72166-2 (SNOMED 266919005 never / 8517006 ex-smoker / 449868002 daily).
    - ECOG LOINC 89247-1 (valueInteger + LOINC LA interpretation); Karnofsky LOINC 89243-0 for
      35 % of patients; CEA LOINC 2039-6 (ng/mL) for 40 %.
    - Genomics (HL7 Genomics Reporting IG): DiagnosticReport LOINC 51969-4 whose ``result``
      references one region-studied Observation (LOINC 53041-0, component gene-studied 48018-6
      with an HGNC code + 81293-3 region description) per gene TESTED (the IG's RegionStudied
      profile allows one gene-studied component per Observation), one variant Observation
      (LOINC 69548-6, value LA9633-4 Present; components 48018-6 gene, 48004-6 c.HGVS, 48005-3
      p.HGVS, 51958-7 transcript, 48019-4 DNA change type, 48002-0 genomic source class LA6684-0
      somatic / LA6683-2 germline, 81258-6 VAF as a UCUM % Quantity) per variant found, and, on
      the NGS panel, TMB (LOINC 94076-7) and MSI (LOINC 81695-9, LA14122-8 Stable / LA26203-2
      MSI-H). A tested gene with no variant Observation is wild-type; a gene without a
      region-studied Observation was not tested. The ALK fusion has no c./p.HGVS (DNA change type
      SO:0001565 gene_fusion).

Rules linking phenotype, genotype and outcome (all random draws seeded; constants below)
    - Demographics: sex 50/50; age at the study date ~ N(67, 9) clipped to 40..90; study date
      uniform over 2023-01-02..2025-12-31.
    - Smoking: never/former/current with :data:`SMOKING_PRIOR` (women more often never).
    - Histology: adenocarcinoma with probability :data:`P_ADENO` by smoking, else squamous.
    - Genotype (the tumour's, whether or not tested): EGFR (L858R or exon 19 deletion) with
      :data:`P_EGFR`; if not EGFR, ALK fusion with :data:`P_ALK`; if neither, KRAS G12C/D/V with
      :data:`P_KRAS` (drivers are mutually exclusive); TP53 with :data:`P_TP53`; STK11 with
      :data:`P_STK11` (higher with KRAS). A TP53 variant is germline with probability 0.05.
      Somatic VAF = purity × U(0.35, 0.95) with purity ~ U(0.2, 0.8); germline VAF ~ U(45, 55) %.
      TMB (mut/Mb) is log-normal with median 2.7 (never) / 7.4 (former) / 10 (current) smokers;
      MSI-H with probability 0.01 (TMB × 3).
    - Imaging (phenotype): a realistic phantom (``synth ct --style realistic``: vessels,
      airways, soft kernel). Tumour count 1..3 from :data:`TUMOUR_COUNT_P` (EGFR-mutant
      tumours are more often multifocal); tumour types from :data:`TUMOUR_TYPE_P` by profile:
      EGFR-mutant mostly ground-glass or part-solid, KRAS-mutant or smokers' mostly solid and
      spiculated (the textbook radiogenomic associations, with made-up numbers); sizes and
      sides come from the phantom. The primary tumour is the largest: it gives the laterality,
      and its density and shape enter the outcome.
    - Stage (AJCC 8, clinical): T from the primary's diameter (≤10 T1a, ≤20 T1b, ≤30 T1c, ≤40
      T2a, ≤50 T2b, ≤70 T3, else T4), T3 when another tumour lies in the same lung; M1a when a
      tumour lies in the other lung; N (not visible in the phantom) drawn from
      :data:`N_PRIOR` by T; distant M1b/M1c with probability 0.08 (0.16 with N2-3). Stage
      group from the AJCC 8 lung table.
    - ECOG ~ round(N(0.1 + 0.35·stage + 0.3·[age ≥ 75], 0.7)) clipped to 0..4 (stage I..IV =
      1..4); Karnofsky from ECOG (0 → 90-100, 1 → 70-80, 2 → 50-60, 3 → 30-40, 4 → 10-20).
      CEA ng/mL log-normal, median 2.0·(1 + 0.6·(stage - 1)), ×1.5 in current smokers.
    - Outcome ``progression_12m`` (progression or death within 12 months of the study date):
      z = :data:`OUTCOME_INTERCEPT` + Σ weight·feature over :data:`OUTCOME_WEIGHTS` (stage - 1,
      ECOG, ln(1 + total tumour volume ml), tumour count - 1, TP53 mutated, KRAS and STK11
      co-mutated, targetable driver (EGFR sensitising or ALK), TMB ≥ 10 without a driver,
      (age - 67) / 10, current smoker, primary tumour ground-glass or part-solid, primary
      tumour spiculated); probability = sigmoid(z). Progression-free days T: Weibull with shape
      :data:`PFS_WEIBULL_SHAPE` and the scale that makes P(T ≤ 365) = probability, drawn by
      inversion from one uniform u, so label = (T ≤ 365) = (u < probability) keeps
      ``progression_12m`` derived from the time. Follow-up ends uniformly within
      :data:`FOLLOW_UP_DAYS`: the observed (days, event) is (T, true) before it, else
      (follow-up, false). The ground truth keeps the probability (no model can beat it), the
      label, the observed pair and the true T.
      The features use the TRUE genotype, including genes not tested as of the study date, so
      untested genes are genuinely missing information. Risk category: low < 0.3 ≤
      intermediate < 0.6 ≤ high.

Dates (relative to the CT's StudyDate S; a result counts as of the study date when its date is
on or before S at day precision, its date being ``effectiveDateTime`` or, when absent, the date
of ``issued``)
    Diagnosis and specimen collection 16-85 days before S; the final genomic report is issued
    before S; stage, smoking, ECOG/Karnofsky (0-21 days before, sometimes on S itself) and CEA
    precede S. After S (to test a date filter; listed in the ground truth's
    ``excluded_after_study_date``): a follow-up ECOG (1-120 days after, same or worse), a
    follow-up CEA, and a re-biopsy genomic report (45-200 days after) testing all five genes,
    sometimes with an acquired EGFR T790M.

Scenarios and deliberate messiness (patient ``index % 4``; extras are random on top)
    0. NGS panel (all five genes, TMB, MSI) plus a ``preliminary`` rapid EGFR/KRAS report with
       the same accession identifier as the ``final`` one, issued earlier; sometimes with a KRAS
       call the final report does not confirm. Use the final. A follow-up ECOG after S.
    1. Partial testing (EGFR + ALK, or EGFR + KRAS + ALK): the other genes are untested. The
       final report also references a variant Observation with status ``entered-in-error`` in a
       tested wild-type gene: ignore it.
    2. NGS panel whose TMB Observation has no ``effectiveDateTime``, only ``issued``; a re-biopsy
       report after S.
    3. Site B (URI issuer); no genomic test before S, but a first test after it: as of the study
       date every gene is untested.
    Also: 30 % of Conditions carry only the generic NSCLC code; 60 % of former smokers have an
    older smoking-status Observation saying "daily smoker" (the latest on or before S wins).

Determinism: every draw comes from ``numpy.random.default_rng`` seeded per patient from
``(seed, index)``, so the same arguments write byte-identical files, and patient ``k`` is the
same whatever the cohort size.

Modules
    This one writes the files (:func:`synth_cohort`); the rules and the records it writes live
    beside it: :mod:`~radfusion.synth.cohort_clinical` (identity, demographics, imaging, stage,
    clinical values, testing plan, dates, outcome), :mod:`~radfusion.synth.cohort_genomics`
    (panel, variants, genotype), :mod:`~radfusion.synth.cohort_codes` (codes and identifier
    systems), :mod:`~radfusion.synth.cohort_fhir` and
    :mod:`~radfusion.synth.cohort_fhir_genomics` (the Bundle's resources) and
    :mod:`~radfusion.synth.cohort_truth` (the ground truth).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from radfusion.synth.cohort_clinical import (
    FIELD_OF_VIEW_MM,
    FOLLOW_UP_DAYS,
    OUTCOME_INTERCEPT,
    OUTCOME_WEIGHTS,
    PFS_WEIBULL_SHAPE,
    SCENARIOS,
    SLICE_THICKNESS_MM,
    TUMOUR_TYPE_P,
    Demographics,
    Identity,
    draw_clinical,
    draw_dates,
    draw_demographics,
    draw_outcome,
    draw_phantom,
    draw_plan,
    draw_smoking_histology,
    draw_stage,
    patient_identity,
    patient_rngs,
)
from radfusion.synth.cohort_codes import DECOY_SYSTEM, RESOURCE_KEY_SYSTEM, SITE_A_OID, SITE_B_URI
from radfusion.synth.cohort_fhir import (
    Builder,
    add_cea,
    add_imaging_study,
    add_patient,
    add_performance,
    add_primary_cancer,
    add_smoking,
    add_staging,
    bundle_json,
)
from radfusion.synth.cohort_fhir_genomics import add_genomic_report, genomic_reports
from radfusion.synth.cohort_genomics import LUNG_PANEL, draw_genotype
from radfusion.synth.cohort_truth import (
    hidden_truth,
    imaging_truth,
    messiness,
    patient_context,
    resource_rows,
)

# The same argument checks as `synth ct`, so both commands word their errors alike.
from radfusion.synth.ct import Phantom, _int_arg
from radfusion.synth.ct_series import SynthStudy, write_ct_series

__all__ = [
    "DECOY_SYSTEM",
    "LUNG_PANEL",
    "NOTICE",
    "RESOURCE_KEY_SYSTEM",
    "SITE_A_OID",
    "SITE_B_URI",
    "CohortPatient",
    "SynthCohort",
    "synth_cohort",
]

NOTICE = (
    "Synthetic data generated by radfusion.synth.cohort: no real patient, no clinical claim. "
    "Demonstration and testing only, not for clinical use."
)

_FORMAT_PATIENT = "radfusion.synth.cohort.patient/2"  # 2: realistic CT, time to event
_FORMAT_COHORT = "radfusion.synth.cohort/2"
_OUR_FORMATS = (_FORMAT_COHORT, "radfusion.synth.cohort/1")  # folders a rerun may rewrite
_MAX_PATIENTS = 100_000

# -- public results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortPatient:
    """What :func:`synth_cohort` wrote for one patient."""

    index: int
    patient_id: str
    directory: Path
    ct: SynthStudy
    bundle: Path  # FHIR R4 transaction Bundle (JSON)
    ground_truth: Path  # ground_truth.json
    identifier_system: str
    stage_group: str
    outcome_label: bool


@dataclass(frozen=True)
class SynthCohort:
    """What :func:`synth_cohort` wrote: the index file and one :class:`CohortPatient` each."""

    directory: Path
    index: Path  # cohort.json
    patients: tuple[CohortPatient, ...]


# -- argument checks -----------------------------------------------------------------------------


def _check_out_dir(out: Path) -> dict[str, Any] | None:
    """Refuse to write into a non-empty folder that is not an earlier cohort; return its index."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return None
    index = out / "cohort.json"
    try:
        previous = json.loads(index.read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or previous.get("format") not in _OUR_FORMATS:
        raise ValueError(
            f"out_dir: {out} is not empty and holds no cohort.json from an earlier run; "
            "choose an empty or new directory"
        )
    return previous


# -- writing ------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _write_ct(
    out: Path, ident: Identity, demo: Demographics, phantom: Phantom, phantom_seed: int
) -> tuple[SynthStudy, pydicom.Dataset]:
    """Write the CT, then give its headers the patient's demographics and site issuer."""
    ct = write_ct_series(
        phantom,
        out,
        patient_id=ident.patient_id,
        patient_name=f"{demo.family}^{demo.given}",
        issuer_of_patient_id=ident.issuer,
        seed=phantom_seed,
        study_date=demo.study_date.strftime("%Y%m%d"),
    )
    headers = []
    for path in ct.files:
        ds = pydicom.dcmread(path)
        ds.IssuerOfPatientID = f"RADFUSION-{ident.site}"
        ds.PatientBirthDate = demo.birth_date.strftime("%Y%m%d")
        ds.PatientSex = "F" if demo.sex == "female" else "M"
        ds.PatientAge = f"{demo.age:03d}Y"
        ds.save_as(path, enforce_file_format=True)
        headers.append(ds)
    return ct, headers[0]  # make_phantom makes at least one slice


def _make_patient(
    out: Path, seed: int, index: int, slices: int, size: int
) -> tuple[CohortPatient, dict[str, Any]]:
    """Draw, write and describe one patient; returns it and its cohort.json row."""
    # The order of the draws on each stream is part of the output (the genomic reports draw from
    # the plan stream after the dates): reordering them changes every seeded cohort.
    rng = patient_rngs(seed, index)
    ident = patient_identity(seed, index)
    demo = draw_demographics(rng["identity"])
    smoking, histology = draw_smoking_histology(rng["clinical"], demo.sex)
    genotype = draw_genotype(rng["genomics"], histology, smoking)
    phantom, imaging = draw_phantom(rng["imaging"], genotype, smoking, slices, size)
    stage = draw_stage(rng["clinical"], imaging)
    clinical = draw_clinical(rng["clinical"], demo, smoking, histology, stage)
    plan = draw_plan(rng["plan"], index % 4, genotype)
    dates = draw_dates(rng["plan"], demo.study_date)
    outcome = draw_outcome(rng["outcome"], demo, clinical, stage, imaging, genotype)

    directory = out / ident.patient_id
    directory.mkdir(parents=True, exist_ok=True)
    ct, header = _write_ct(directory / "ct", ident, demo, phantom, imaging.phantom_seed)

    b = Builder(ident.patient_id, demo.study_date)
    add_patient(b, ident, demo)
    add_imaging_study(b, ct, header)
    add_primary_cancer(b, clinical, stage, imaging, dates)
    add_staging(b, stage, dates)
    add_smoking(b, clinical, dates)
    add_performance(b, clinical, plan, dates)
    if clinical.cea is not None:
        add_cea(b, clinical.cea, dates.cea, "cea")
        if clinical.cea_followup is not None:
            add_cea(b, clinical.cea_followup, dates.cea_followup, "cea-followup")
    for report in genomic_reports(ident, genotype, plan, dates, rng["plan"]):
        add_genomic_report(b, report)
    bundle_path = directory / "bundle.json"
    bundle_path.write_text(bundle_json(b))

    truth = {
        "format": _FORMAT_PATIENT,
        "synthetic": True,
        "notice": NOTICE,
        "index": index,
        "patient_id": ident.patient_id,
        "scenario": {"number": plan.scenario, "description": SCENARIOS[plan.scenario]},
        "site": ident.site,
        "identifier": {"system": ident.system, "value": ident.patient_id},
        "decoy_identifier": {"system": DECOY_SYSTEM, "value": ident.decoy_value},
        "dicom": {
            "PatientID": ident.patient_id,
            "IssuerOfPatientID": str(header.IssuerOfPatientID),
            "IssuerOfPatientIDQualifiersSequence": [
                {
                    "UniversalEntityID": str(item.UniversalEntityID),
                    "UniversalEntityIDType": str(item.UniversalEntityIDType),
                }
                for item in header.IssuerOfPatientIDQualifiersSequence
            ],
            "StudyInstanceUID": ct.StudyInstanceUID,
            "SeriesInstanceUID": ct.SeriesInstanceUID,
            "StudyDate": str(header.StudyDate),
            "AccessionNumber": str(header.AccessionNumber),
            "directory": "ct",
        },
        "study_date": demo.study_date.isoformat(),
        "bundle": bundle_path.name,
        "context": patient_context(b, demo, clinical, stage, imaging, genotype, plan, dates),
        "imaging": imaging_truth(imaging),
        "truth": hidden_truth(genotype, stage, plan, clinical),
        "outcome": {
            "name": "progression_12m",
            "label": outcome.label,
            "probability": outcome.probability,
            "logit": outcome.logit,
            "risk_category": outcome.risk_category,
            "features": outcome.features,
            "time_to_event": {
                "name": "progression_free_days",
                "days": outcome.observed[0],
                "event": outcome.observed[1],
                "true_days": outcome.progression_free_days,
                "follow_up_days": outcome.follow_up_days,
            },
        },
        "resources": resource_rows(b),
        "excluded_after_study_date": [
            e.key for e in b.entries if e.disregard == "after-study-date"
        ],
        "messiness": messiness(b, clinical, plan),
    }
    truth_path = directory / "ground_truth.json"
    _write_json(truth_path, truth)
    patient = CohortPatient(
        index=index,
        patient_id=ident.patient_id,
        directory=directory,
        ct=ct,
        bundle=bundle_path,
        ground_truth=truth_path,
        identifier_system=ident.system,
        stage_group=stage.group,
        outcome_label=outcome.label,
    )
    row = {
        "index": index,
        "patient_id": ident.patient_id,
        "directory": ident.patient_id,
        "identifier": {"system": ident.system, "value": ident.patient_id},
        "StudyInstanceUID": ct.StudyInstanceUID,
        "study_date": demo.study_date.isoformat(),
        "scenario": plan.scenario,
        "stage_group": stage.group,
        "genes_tested_before_study": list(plan.panel),
        "outcome_label": outcome.label,
        "outcome_probability": outcome.probability,
        "progression_free_days": outcome.observed[0],
        "progression_event": outcome.observed[1],
        "resources": len(b.entries),
    }
    return patient, row


def _cohort_index(seed: int, slices: int, size: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": _FORMAT_COHORT,
        "synthetic": True,
        "notice": NOTICE,
        "generator": "radfusion.synth.cohort",
        "seed": seed,
        "patient_count": len(rows),
        "ct": {
            "slices": slices,
            "rows": size,
            "columns": size,
            "pixel_spacing_mm": FIELD_OF_VIEW_MM / size,
            "slice_thickness_mm": SLICE_THICKNESS_MM,
        },
        "panel": list(LUNG_PANEL),
        "sites": {
            "A": {
                "identifier_system": f"urn:oid:{SITE_A_OID}",
                "UniversalEntityID": SITE_A_OID,
                "UniversalEntityIDType": "ISO",
                "IssuerOfPatientID": "RADFUSION-A",
            },
            "B": {
                "identifier_system": SITE_B_URI,
                "UniversalEntityID": SITE_B_URI,
                "UniversalEntityIDType": "URI",
                "IssuerOfPatientID": "RADFUSION-B",
            },
        },
        "decoy_identifier_system": DECOY_SYSTEM,
        "resource_key_system": RESOURCE_KEY_SYSTEM,
        "scenarios": {str(k): v for k, v in SCENARIOS.items()},
        "date_rule": "a result counts as of the study date when its effectiveDateTime (or, "
        "without one, the date of issued) is on or before the StudyDate",
        "outcome": {
            "name": "progression_12m",
            "intercept": OUTCOME_INTERCEPT,
            "weights": OUTCOME_WEIGHTS,
            "time_to_event": {
                "name": "progression_free_days",
                "distribution": "Weibull; P(days <= 365) = the outcome's probability",
                "shape": PFS_WEIBULL_SHAPE,
                "follow_up_days": list(FOLLOW_UP_DAYS),
            },
        },
        "tumour_type_p": TUMOUR_TYPE_P,
        "patients": rows,
    }


def synth_cohort(
    out_dir: Path | str,
    *,
    patients: int,
    seed: int = 0,
    slices: int = 64,
    size: int = 128,
    progress: Callable[[CohortPatient], None] | None = None,
) -> SynthCohort:
    """Write a synthetic lung-cancer cohort of ``patients`` patients into ``out_dir``.

    Per patient: a chest CT (``slices`` axial slices of ``size`` × ``size``, 360 mm field of
    view, 2.5 mm slices), a FHIR R4 transaction Bundle and ``ground_truth.json``; then
    ``cohort.json``. The module docstring lists the content and the rules. ``out_dir`` must be
    new, empty, or an earlier cohort (its patient folders that the new cohort lacks are
    removed). ``progress`` is called after each patient.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range (the message names it), ``out_dir`` is a
            non-empty folder that is not a cohort, or a tumour does not fit the phantom size.
    """
    patients = _int_arg("patients", patients, 1, _MAX_PATIENTS)
    seed = _int_arg("seed", seed, 0)
    slices = _int_arg("slices", slices, 8, 9999)
    size = _int_arg("size", size, 32, 4096)
    out = Path(out_dir)
    previous = _check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)

    written: list[CohortPatient] = []
    rows: list[dict[str, Any]] = []
    for index in range(patients):
        patient, row = _make_patient(out, seed, index, slices, size)
        written.append(patient)
        rows.append(row)
        if progress is not None:
            progress(patient)
    if previous is not None:
        _remove_stale(out, previous, {p.patient_id for p in written})
    index_path = out / "cohort.json"
    _write_json(index_path, _cohort_index(seed, slices, size, rows))
    return SynthCohort(directory=out, index=index_path, patients=tuple(written))


def _remove_stale(out: Path, previous: dict[str, Any], keep: set[str]) -> None:
    """Remove patient folders an earlier cohort.json listed that this cohort does not have."""
    for row in previous.get("patients", []):
        name = row.get("directory") if isinstance(row, dict) else None
        if not isinstance(name, str) or name in keep or "/" in name or name in ("", ".", ".."):
            continue
        path = out / name
        if path.is_dir() and (path / "ground_truth.json").exists():
            shutil.rmtree(path)
