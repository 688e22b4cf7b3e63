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
    - Imaging (phenotype): tumour count 1..3 from :data:`TUMOUR_COUNT_P` (EGFR-mutant tumours
      are more often multifocal); sizes and sides come from the phantom. The primary tumour is
      the largest: it gives the laterality.
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
      (age - 67) / 10, current smoker); probability = sigmoid(z); label = Bernoulli(probability).
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
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fhir.resources.R4B.bundle import Bundle

# The same argument checks as `synth ct`, so both commands word their errors alike.
from radfusion.synth.ct import Phantom, SynthStudy, _int_arg, make_phantom, write_ct_series

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

LUNG_PANEL: tuple[str, ...] = ("EGFR", "KRAS", "ALK", "TP53", "STK11")
"""The lung cancer panel, in report order."""

SITE_A_OID = "1.2.826.0.1.3680043.10.1234.1"
"""Issuer (ISO OID) of site A's MRNs; the FHIR identifier system is ``urn:oid:`` + this."""
SITE_B_URI = "https://radfusion.example/fhir/sid/site-b-mrn"
"""Issuer (URI) of site B's MRNs; the FHIR identifier system is this URI."""
DECOY_SYSTEM = "https://radfusion.example/fhir/sid/regional-id"
"""A second identifier system whose values collide with other patients' MRNs (on purpose)."""
RESOURCE_KEY_SYSTEM = "https://radfusion.example/fhir/sid/synthetic-resource"
"""Identifier system naming each resource ``<PatientID>/<key>`` for the ground truth."""
GENOMICS_ACCESSION_SYSTEM = "https://radfusion.example/fhir/sid/genomics-accession"
"""Laboratory accession of a genomic report; a preliminary and its final share one."""

_FORMAT_PATIENT = "radfusion.synth.cohort.patient/1"
_FORMAT_COHORT = "radfusion.synth.cohort/1"
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://radfusion.example/synth/cohort")
_SLICE_THICKNESS_MM = 2.5
_FIELD_OF_VIEW_MM = 360.0
_PHANTOM_ATTEMPTS = 4
_MAX_PATIENTS = 100_000
_STUDY_EPOCH = datetime.date(2023, 1, 2)
_STUDY_SPAN_DAYS = 1095

# -- code systems and codes ---------------------------------------------------------------------

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
HGNC = "http://www.genenames.org/geneId"
HGVS = "http://varnomen.hgvs.org"
REFSEQ = "http://www.ncbi.nlm.nih.gov/refseq"
SEQUENCE_ONTOLOGY = "http://sequenceontology.org"
AJCC = "http://cancerstaging.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_OBS_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
MCODE_HISTOLOGY_EXTENSION = (
    "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-histology-morphology-behavior"
)
MCODE_LATERALITY_EXTENSION = (
    "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-laterality-qualifier"
)


@dataclass(frozen=True)
class Code:
    """One coded concept: system, code and display, as FHIR Coding wants them."""

    system: str
    code: str
    display: str

    def coding(self) -> dict[str, str]:
        """The FHIR Coding."""
        return {"system": self.system, "code": self.code, "display": self.display}

    def concept(self) -> dict[str, Any]:
        """A FHIR CodeableConcept holding this one Coding."""
        return {"coding": [self.coding()]}

    def token(self) -> str:
        """``system|code``, as a FHIR token search and the ground truth write it."""
        return f"{self.system}|{self.code}"


LOINC_VARIANT = Code(LOINC, "69548-6", "Genetic variant assessment")
LOINC_GENE_STUDIED = Code(LOINC, "48018-6", "Gene studied [ID]")
LOINC_C_HGVS = Code(LOINC, "48004-6", "DNA change (c.HGVS)")
LOINC_P_HGVS = Code(LOINC, "48005-3", "Amino acid change (pHGVS)")
LOINC_TRANSCRIPT = Code(LOINC, "51958-7", "Transcript reference sequence [ID]")
LOINC_DNA_CHANGE_TYPE = Code(LOINC, "48019-4", "DNA change type")
LOINC_GENOMIC_SOURCE = Code(LOINC, "48002-0", "Genomic source class [Type]")
LOINC_VAF = Code(LOINC, "81258-6", "Sample variant allelic frequency [NFr]")
LOINC_GENOMIC_REPORT = Code(LOINC, "51969-4", "Genetic analysis report")
LOINC_REGION_STUDIED = Code(LOINC, "53041-0", "DNA region of interest panel")
LOINC_REGION_DESCRIPTION = Code(LOINC, "81293-3", "Description of ranges of DNA sequences examined")
LOINC_TMB = Code(LOINC, "94076-7", "Mutations/Megabase [# Ratio] in Tumor")
LOINC_MSI = Code(
    LOINC, "81695-9", "Microsatellite instability [Interpretation] in Cancer specimen Qualitative"
)
LOINC_ECOG = Code(LOINC, "89247-1", "ECOG Performance Status score")
LOINC_KARNOFSKY = Code(LOINC, "89243-0", "Karnofsky Performance Status score")
LOINC_SMOKING = Code(LOINC, "72166-2", "Tobacco smoking status")
LOINC_CEA = Code(LOINC, "2039-6", "Carcinoembryonic Ag [Mass/volume] in Serum or Plasma")
LOINC_STAGE_GROUP = Code(LOINC, "21908-9", "Stage group.clinical Cancer")
LOINC_STAGE_T = Code(LOINC, "21905-5", "Primary tumor.clinical [Class] Cancer")
LOINC_STAGE_N = Code(LOINC, "21906-3", "Regional lymph nodes.clinical [Class] Cancer")
LOINC_STAGE_M = Code(LOINC, "21907-1", "Distant metastases.clinical [Class] Cancer")
LA_PRESENT = Code(LOINC, "LA9633-4", "Present")
LA_SOMATIC = Code(LOINC, "LA6684-0", "Somatic")
LA_GERMLINE = Code(LOINC, "LA6683-2", "Germline")
LA_SEQUENCING = Code(LOINC, "LA26398-0", "Sequencing")
LA_MSI_STABLE = Code(LOINC, "LA14122-8", "Stable")
LA_MSI_HIGH = Code(LOINC, "LA26203-2", "MSI-H")
ECOG_ANSWERS: tuple[Code, ...] = (
    Code(
        LOINC,
        "LA9622-7",
        "Fully active, able to carry on all pre-disease performance without restriction",
    ),
    Code(
        LOINC,
        "LA9623-5",
        "Restricted in physically strenuous activity but ambulatory and able "
        "to carry out work of a light or sedentary nature, e.g., light house work, office work",
    ),
    Code(
        LOINC,
        "LA9624-3",
        "Ambulatory and capable of all selfcare but unable to carry out any "
        "work activities. Up and about more than 50% of waking hours",
    ),
    Code(
        LOINC,
        "LA9625-0",
        "Capable of only limited selfcare, confined to bed or chair more than 50% of waking hours",
    ),
    Code(
        LOINC,
        "LA9626-8",
        "Completely disabled. Cannot carry on any selfcare. Totally confined to bed or chair",
    ),
)
"""LOINC answer list LL529-9, indexed by the ECOG grade 0..4."""
KARNOFSKY_ANSWERS: dict[int, Code] = {
    100: Code(LOINC, "LA29175-9", "Normal; no complaints; no evidence of disease"),
    90: Code(
        LOINC, "LA29176-7", "Able to carry on normal activity; minor signs or symptoms of disease"
    ),
    80: Code(LOINC, "LA29177-5", "Normal activity with effort; some signs or symptoms of disease"),
    70: Code(
        LOINC, "LA29178-3", "Cares for self; unable to carry on normal activity or do active work"
    ),
    60: Code(
        LOINC, "LA29179-1", "Requires occasional assistance but is able to care for most needs"
    ),
    50: Code(LOINC, "LA29180-9", "Requires considerable assistance and frequent medical care"),
    40: Code(LOINC, "LA29181-7", "Disabled; requires special care and assistance"),
    30: Code(
        LOINC,
        "LA29182-5",
        "Severely disabled; hospitalization is indicated, although death not imminent",
    ),
    20: Code(
        LOINC,
        "LA29183-3",
        "Very sick; hospitalization necessary; active supportive treatment necessary",
    ),
    10: Code(LOINC, "LA29184-1", "Moribund; fatal processes progressing rapidly"),
}
"""LOINC answer list LL4986-7 by Karnofsky score."""

SCT_NSCLC = Code(SNOMED, "254637007", "Non-small cell lung cancer (disorder)")
SCT_LUNG_ADENOCARCINOMA = Code(SNOMED, "254626006", "Adenocarcinoma of lung (disorder)")
SCT_LUNG_SQUAMOUS = Code(SNOMED, "254634000", "Squamous cell carcinoma of lung (disorder)")
SCT_ADENOCARCINOMA_MORPHOLOGY = Code(
    SNOMED, "1187332001", "Adenocarcinoma (morphologic abnormality)"
)
SCT_SQUAMOUS_MORPHOLOGY = Code(
    SNOMED, "1162767002", "Squamous cell carcinoma (morphologic abnormality)"
)
SCT_LUNG = Code(SNOMED, "39607008", "Lung structure (body structure)")
SCT_THORAX = Code(SNOMED, "51185008", "Thoracic structure (body structure)")
SCT_LATERALITY: dict[str, Code] = {
    "right": Code(SNOMED, "24028007", "Right (qualifier value)"),
    "left": Code(SNOMED, "7771000", "Left (qualifier value)"),
}
SCT_AJCC_8 = Code(
    SNOMED,
    "897275008",
    "American Joint Commission on Cancer, Cancer Staging Manual, 8th edition neoplasm staging "
    "system (tumor staging)",
)
SCT_SMOKING: dict[str, Code] = {
    "never": Code(SNOMED, "266919005", "Never smoked tobacco (finding)"),
    "former": Code(SNOMED, "8517006", "Ex-smoker (finding)"),
    "current": Code(SNOMED, "449868002", "Smokes tobacco daily (finding)"),
}
SO_SNV = Code(SEQUENCE_ONTOLOGY, "SO:0001483", "SNV")
SO_DELETION = Code(SEQUENCE_ONTOLOGY, "SO:0000159", "deletion")
SO_GENE_FUSION = Code(SEQUENCE_ONTOLOGY, "SO:0001565", "gene_fusion")
DCM_CT = Code(DCM, "CT", "Computed Tomography")
_HTEST = {"system": _ACT_REASON, "code": "HTEST", "display": "test health data"}
_MRN_TYPE = Code(_IDENTIFIER_TYPE, "MR", "Medical record number")
_ACCESSION_TYPE = Code(_IDENTIFIER_TYPE, "ACSN", "Accession ID")

_STAGE_AJCC: dict[str, str] = {
    "IA1": "1A1",
    "IA2": "1A2",
    "IA3": "1A3",
    "IB": "1B",
    "IIA": "2A",
    "IIB": "2B",
    "IIIA": "3A",
    "IIIB": "3B",
    "IIIC": "3C",
    "IVA": "4A",
    "IVB": "4B",
}

# -- the rules' constants (documented in the module docstring) --------------------------------

SMOKING_PRIOR: dict[str, tuple[float, float, float]] = {
    "female": (0.30, 0.45, 0.25),
    "male": (0.15, 0.50, 0.35),
}
"""P(never, former, current) by sex."""
P_ADENO: dict[str, float] = {"never": 0.85, "former": 0.60, "current": 0.55}
"""P(adenocarcinoma) by smoking status; otherwise squamous cell carcinoma."""
P_EGFR: dict[tuple[str, str], float] = {
    ("adenocarcinoma", "never"): 0.50,
    ("adenocarcinoma", "former"): 0.15,
    ("adenocarcinoma", "current"): 0.08,
    ("squamous", "never"): 0.05,
    ("squamous", "former"): 0.03,
    ("squamous", "current"): 0.02,
}
P_ALK: dict[tuple[str, str], float] = {
    ("adenocarcinoma", "never"): 0.15,
    ("adenocarcinoma", "former"): 0.04,
    ("adenocarcinoma", "current"): 0.03,
    ("squamous", "never"): 0.02,
    ("squamous", "former"): 0.01,
    ("squamous", "current"): 0.01,
}
"""P(ALK fusion | no EGFR variant)."""
P_KRAS: dict[tuple[str, str], float] = {
    ("adenocarcinoma", "never"): 0.08,
    ("adenocarcinoma", "former"): 0.35,
    ("adenocarcinoma", "current"): 0.40,
    ("squamous", "never"): 0.03,
    ("squamous", "former"): 0.06,
    ("squamous", "current"): 0.06,
}
"""P(KRAS variant | no EGFR variant and no ALK fusion)."""
P_TP53: dict[tuple[str, str], float] = {
    ("adenocarcinoma", "never"): 0.30,
    ("adenocarcinoma", "former"): 0.50,
    ("adenocarcinoma", "current"): 0.55,
    ("squamous", "never"): 0.70,
    ("squamous", "former"): 0.80,
    ("squamous", "current"): 0.85,
}
P_STK11: dict[bool, float] = {True: 0.30, False: 0.06}
"""P(STK11 variant) by whether the tumour has a KRAS variant."""
P_GERMLINE_TP53 = 0.05
P_MSI_HIGH = 0.01
TMB_MEDIAN: dict[str, float] = {"never": 2.7, "former": 7.4, "current": 10.0}
TUMOUR_COUNT_P: dict[bool, tuple[float, float, float]] = {
    False: (0.60, 0.30, 0.10),
    True: (0.40, 0.35, 0.25),
}
"""P(1, 2, 3 tumours) by whether the tumour has an EGFR variant."""
N_PRIOR: dict[int, tuple[float, float, float, float]] = {
    1: (0.70, 0.14, 0.11, 0.05),
    2: (0.55, 0.18, 0.18, 0.09),
    3: (0.45, 0.20, 0.25, 0.10),
    4: (0.40, 0.20, 0.27, 0.13),
}
"""P(N0..N3) by T rank (T1 = 1 … T4 = 4)."""
OUTCOME_INTERCEPT = -2.0
OUTCOME_WEIGHTS: dict[str, float] = {
    "stage_minus_1": 0.9,
    "ecog": 0.45,
    "log1p_tumour_volume_ml": 0.35,
    "extra_tumours": 0.3,
    "tp53_mutated": 0.5,
    "kras_stk11_comutated": 0.7,
    "targetable_driver": -1.1,
    "tmb_high_without_driver": -0.5,
    "age_decades_from_67": 0.3,
    "current_smoker": 0.3,
}
"""Weights of the synthetic outcome's logit; features are named as in the ground truth."""

SCENARIOS: dict[int, str] = {
    0: "NGS panel; a preliminary report superseded by the final one; a follow-up ECOG after the "
    "study date",
    1: "partial testing (some genes untested); an entered-in-error variant in a tested "
    "wild-type gene",
    2: "NGS panel; TMB without effectiveDateTime (issued only); a re-biopsy report after the "
    "study date",
    3: "site B (URI issuer); no genomic test before the study date, a first one after it",
}


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_GIVEN: dict[str, tuple[str, ...]] = {
    "female": _words("Alice Beatriz Chloe Dana Elena Fatima Greta Hana Ines Julia Keiko"),
    "male": _words("Adam Bruno Carlos David Emil Farid Georg Hiro Ivan Jonas Kofi Luca"),
}
_FAMILY = _words(
    "Abbott Berger Castillo Dubois Eriksen Fischer Garcia Hansen Ito Jensen Kowalski Laurent "
    "Moreau Novak Okafor Petrov Quinn Rossi Schmidt Tanaka Usman Vargas Weber Yilmaz"
)

# -- genes and variants ------------------------------------------------------------------------


@dataclass(frozen=True)
class Gene:
    """A gene of the panel: its HGNC code, reference transcript and the region a test covers."""

    symbol: str
    hgnc_id: str
    transcript: str
    region: str

    def code(self) -> Code:
        """The HGNC Coding the Genomics Reporting IG wants for gene-studied (48018-6)."""
        return Code(HGNC, self.hgnc_id, self.symbol)


GENES: dict[str, Gene] = {
    "EGFR": Gene("EGFR", "HGNC:3236", "NM_005228.5", "EGFR exons 18-21"),
    "KRAS": Gene("KRAS", "HGNC:6407", "NM_004985.5", "KRAS exons 2-4"),
    "ALK": Gene("ALK", "HGNC:427", "NM_004304.5", "ALK rearrangements (introns 18-19)"),
    "TP53": Gene("TP53", "HGNC:11998", "NM_000546.6", "TP53 exons 2-11"),
    "STK11": Gene("STK11", "HGNC:11389", "NM_000455.5", "STK11 exons 1-9"),
}


@dataclass(frozen=True)
class VariantSpec:
    """One variant the generator can place: HGVS (None for the fusion), type and a short name."""

    gene: str
    c_hgvs: str | None
    p_hgvs: str | None
    change_type: Code
    label: str


_EGFR_SENSITISING = (
    VariantSpec("EGFR", "NM_005228.5:c.2573T>G", "p.Leu858Arg", SO_SNV, "L858R"),
    VariantSpec(
        "EGFR", "NM_005228.5:c.2235_2249del", "p.Glu746_Ala750del", SO_DELETION, "exon 19 deletion"
    ),
)
_EGFR_T790M = VariantSpec("EGFR", "NM_005228.5:c.2369C>T", "p.Thr790Met", SO_SNV, "T790M")
_VARIANTS: dict[str, tuple[VariantSpec, ...]] = {
    "EGFR": _EGFR_SENSITISING,
    "KRAS": (
        VariantSpec("KRAS", "NM_004985.5:c.34G>T", "p.Gly12Cys", SO_SNV, "G12C"),
        VariantSpec("KRAS", "NM_004985.5:c.35G>A", "p.Gly12Asp", SO_SNV, "G12D"),
        VariantSpec("KRAS", "NM_004985.5:c.35G>T", "p.Gly12Val", SO_SNV, "G12V"),
    ),
    "ALK": (VariantSpec("ALK", None, None, SO_GENE_FUSION, "EML4-ALK fusion"),),
    "TP53": (
        VariantSpec("TP53", "NM_000546.6:c.818G>A", "p.Arg273His", SO_SNV, "R273H"),
        VariantSpec("TP53", "NM_000546.6:c.743G>A", "p.Arg248Gln", SO_SNV, "R248Q"),
        VariantSpec("TP53", "NM_000546.6:c.524G>A", "p.Arg175His", SO_SNV, "R175H"),
    ),
    "STK11": (
        VariantSpec("STK11", "NM_000455.5:c.109C>T", "p.Gln37Ter", SO_SNV, "Q37*"),
        VariantSpec("STK11", "NM_000455.5:c.580G>T", "p.Asp194Tyr", SO_SNV, "D194Y"),
    ),
}


@dataclass(frozen=True)
class _Call:
    """A variant the patient carries, with the VAF a test reports and where it comes from."""

    spec: VariantSpec
    vaf_percent: float
    source: str  # "somatic" | "germline"


# -- what is drawn per patient -------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    index: int
    patient_id: str
    site: str  # "A" | "B"
    system: str  # FHIR identifier system
    issuer: str  # what write_ct_series takes: urn:oid:… or the URI
    decoy_value: str


@dataclass(frozen=True)
class _Demographics:
    sex: str  # FHIR administrative gender: "female" | "male"
    birth_date: datetime.date
    study_date: datetime.date
    age: int
    family: str
    given: str


@dataclass(frozen=True)
class _Genotype:
    calls: dict[str, tuple[_Call, ...]]  # every panel gene; () = wild-type
    tmb: float
    msi_high: bool

    def mutated(self, gene: str) -> bool:
        """Whether the tumour carries a variant in ``gene`` (tested or not)."""
        return bool(self.calls[gene])


@dataclass(frozen=True)
class _Imaging:
    tumour_count: int
    tumours_requested: int
    sides: tuple[str, ...]
    diameters_mm: tuple[float, ...]
    total_volume_ml: float
    primary_side: str
    phantom_seed: int

    @property
    def largest_diameter_mm(self) -> float:
        return max(self.diameters_mm)


@dataclass(frozen=True)
class _Stage:
    t: str
    n: str
    m: str
    group: str

    @property
    def number(self) -> int:
        """1..4 for stage I..IV."""
        return {"I": 1, "II": 2, "III": 3, "IV": 4}[self.group.rstrip("ABC123")]


@dataclass(frozen=True)
class _Clinical:
    smoking: str
    smoking_history: bool  # an older "daily smoker" record precedes the current one
    histology: str  # "adenocarcinoma" | "squamous"
    generic_code: bool
    ecog: int
    karnofsky: int | None
    cea: float | None
    cea_followup: float | None
    ecog_followup: int  # the value a follow-up ECOG has, when the plan writes one


@dataclass(frozen=True)
class _Plan:
    """How the patient was tested and which messiness applies (see the scenarios)."""

    scenario: int
    panel: tuple[str, ...]  # genes in the final report before the study (() = none)
    tmb_msi: bool
    preliminary: bool
    spurious_kras: bool
    error_gene: str | None
    tmb_without_effective: bool
    followup: bool
    acquired_t790m: bool
    ecog_followup: bool


@dataclass(frozen=True)
class _Dates:
    diagnosis: datetime.date
    specimen: datetime.date
    final_issued: datetime.date
    preliminary_issued: datetime.date
    stage: datetime.date
    smoking: datetime.date
    smoking_history: datetime.date
    ecog: datetime.date
    cea: datetime.date
    ecog_followup: datetime.date
    cea_followup: datetime.date
    followup_specimen: datetime.date
    followup_issued: datetime.date


@dataclass(frozen=True)
class _Outcome:
    features: dict[str, float]
    logit: float
    probability: float
    label: bool

    @property
    def risk_category(self) -> str:
        if self.probability < 0.3:
            return "low"
        return "intermediate" if self.probability < 0.6 else "high"


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
    if not isinstance(previous, dict) or previous.get("format") != _FORMAT_COHORT:
        raise ValueError(
            f"out_dir: {out} is not empty and holds no cohort.json from an earlier run; "
            "choose an empty or new directory"
        )
    return previous


# -- drawing a patient ---------------------------------------------------------------------------


def _rngs(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent streams per concern, so a change in one (e.g. a phantom retry) leaves the
    others alone."""
    names = ("identity", "clinical", "genomics", "imaging", "plan", "outcome")
    children = np.random.SeedSequence([seed, index]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children, strict=True)}


def _patient_id(seed: int, index: int) -> str:
    return f"RFC{seed}-{index + 1:04d}"


def _identity(seed: int, index: int) -> _Identity:
    site = "B" if index % 4 == 3 else "A"
    system = SITE_B_URI if site == "B" else f"urn:oid:{SITE_A_OID}"
    return _Identity(
        index=index,
        patient_id=_patient_id(seed, index),
        site=site,
        system=system,
        issuer=system,  # write_ct_series: urn:oid:… → ISO, anything else → URI
        decoy_value=_patient_id(seed, index + 1),
    )


def _pick(rng: np.random.Generator, options: tuple[str, ...], p: tuple[float, ...]) -> str:
    return options[int(rng.choice(len(options), p=np.asarray(p) / sum(p)))]


def _age_at(birth: datetime.date, day: datetime.date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _demographics(rng: np.random.Generator) -> _Demographics:
    sex = "female" if rng.random() < 0.5 else "male"
    study = _STUDY_EPOCH + datetime.timedelta(days=int(rng.integers(0, _STUDY_SPAN_DAYS)))
    age = int(np.clip(round(float(rng.normal(67.0, 9.0))), 40, 90))
    last_birthday = study - datetime.timedelta(days=int(rng.integers(0, 365)))
    day = 28 if (last_birthday.month, last_birthday.day) == (2, 29) else last_birthday.day
    birth = datetime.date(last_birthday.year - age, last_birthday.month, day)
    return _Demographics(
        sex=sex,
        birth_date=birth,
        study_date=study,
        age=_age_at(birth, study),
        family=_FAMILY[int(rng.integers(0, len(_FAMILY)))],
        given=_GIVEN[sex][int(rng.integers(0, len(_GIVEN[sex])))],
    )


def _vaf(rng: np.random.Generator, purity: float, source: str) -> float:
    if source == "germline":
        return round(float(rng.uniform(45.0, 55.0)), 1)
    return round(float(np.clip(purity * rng.uniform(0.35, 0.95), 0.03, 0.9)) * 100.0, 1)


def _genotype(rng: np.random.Generator, histology: str, smoking: str) -> _Genotype:
    """The tumour's true variants in the panel genes, TMB and MSI (rules in the docstring)."""
    key = (histology, smoking)
    purity = float(rng.uniform(0.2, 0.8))
    chosen: dict[str, VariantSpec | None] = dict.fromkeys(LUNG_PANEL)
    if rng.random() < P_EGFR[key]:
        chosen["EGFR"] = _VARIANTS["EGFR"][int(rng.integers(0, 2))]
    elif rng.random() < P_ALK[key]:
        chosen["ALK"] = _VARIANTS["ALK"][0]
    elif rng.random() < P_KRAS[key]:
        chosen["KRAS"] = _VARIANTS["KRAS"][int(rng.integers(0, 3))]
    if rng.random() < P_TP53[key]:
        chosen["TP53"] = _VARIANTS["TP53"][int(rng.integers(0, 3))]
    if rng.random() < P_STK11[chosen["KRAS"] is not None]:
        chosen["STK11"] = _VARIANTS["STK11"][int(rng.integers(0, 2))]
    calls: dict[str, tuple[_Call, ...]] = {}
    for gene in LUNG_PANEL:
        spec = chosen[gene]
        if spec is None:
            calls[gene] = ()
            continue
        source = "germline" if gene == "TP53" and rng.random() < P_GERMLINE_TP53 else "somatic"
        calls[gene] = (_Call(spec, _vaf(rng, purity, source), source),)
    msi_high = bool(rng.random() < P_MSI_HIGH)
    tmb = TMB_MEDIAN[smoking] * math.exp(float(rng.normal(0.0, 0.6))) * (3.0 if msi_high else 1.0)
    return _Genotype(calls=calls, tmb=round(tmb, 1), msi_high=msi_high)


def _imaging(phantom: Phantom, requested: int, phantom_seed: int) -> _Imaging:
    tumours = phantom.tumours
    primary = max(tumours, key=lambda t: (t.radius_mm, -t.label))
    return _Imaging(
        tumour_count=len(tumours),
        tumours_requested=requested,
        sides=tuple(t.side for t in tumours),
        diameters_mm=tuple(round(2.0 * t.radius_mm, 2) for t in tumours),
        total_volume_ml=round(sum(t.volume_mm3 for t in tumours) / 1000.0, 3),
        primary_side=primary.side,
        phantom_seed=phantom_seed,
    )


def _make_phantom(
    rng: np.random.Generator, egfr: bool, slices: int, size: int
) -> tuple[Phantom, _Imaging]:
    """A chest phantom with 1..3 tumours; on a tumour that does not fit, another phantom seed,
    then one tumour fewer.

    Raises:
        ValueError: not even one tumour fits (too few slices or too small an image).
    """
    requested = int(rng.choice(3, p=TUMOUR_COUNT_P[egfr])) + 1
    for count in range(requested, 0, -1):
        for _ in range(_PHANTOM_ATTEMPTS):
            phantom_seed = int(rng.integers(0, 2**31 - 1))
            try:
                phantom = make_phantom(
                    slices=slices,
                    rows=size,
                    columns=size,
                    seed=phantom_seed,
                    tumours=count,
                    pixel_spacing=_FIELD_OF_VIEW_MM / size,
                    slice_thickness=_SLICE_THICKNESS_MM,
                )
            except ValueError as err:
                if "tumours" not in str(err):
                    raise
                continue
            return phantom, _imaging(phantom, requested, phantom_seed)
    raise ValueError(
        f"slices: a tumour does not fit in a phantom of {slices} slices of {size}x{size}; "
        "use more slices or a larger size"
    )


def _t_category(imaging: _Imaging) -> str:
    same_lung = sum(side == imaging.primary_side for side in imaging.sides)
    if same_lung >= 2:
        return "T3"  # separate tumour nodule(s) in the same lung (lobes are not modelled)
    d = imaging.largest_diameter_mm
    for limit, t in ((10, "T1a"), (20, "T1b"), (30, "T1c"), (40, "T2a"), (50, "T2b"), (70, "T3")):
        if d <= limit:
            return t
    return "T4"


def _t_rank(t: str) -> int:
    return int(t[1])


def _stage_group(t: str, n: str, m: str) -> str:
    """AJCC 8th edition lung cancer stage group for the T, N, M categories this cohort uses."""
    if m == "M1c":
        return "IVB"
    if m in ("M1a", "M1b"):
        return "IVA"
    early = _t_rank(t) <= 2
    if n == "N0":
        return {"T1a": "IA1", "T1b": "IA2", "T1c": "IA3", "T2a": "IB", "T2b": "IIA"}.get(
            t, "IIB" if t == "T3" else "IIIA"
        )
    if n == "N1":
        return "IIB" if early else "IIIA"
    if n == "N2":
        return "IIIA" if early else "IIIB"
    return "IIIB" if early else "IIIC"


def _stage(rng: np.random.Generator, imaging: _Imaging) -> _Stage:
    t = _t_category(imaging)
    n = _pick(rng, ("N0", "N1", "N2", "N3"), N_PRIOR[_t_rank(t)])
    if len(set(imaging.sides)) == 2:
        m = "M1a"  # a tumour in the contralateral lung
    elif rng.random() < (0.16 if n in ("N2", "N3") else 0.08):
        m = "M1b" if rng.random() < 0.5 else "M1c"
    else:
        m = "M0"
    return _Stage(t=t, n=n, m=m, group=_stage_group(t, n, m))


def _karnofsky(rng: np.random.Generator, ecog: int) -> int:
    high = {0: 100, 1: 80, 2: 60, 3: 40, 4: 20}[ecog]
    return high - (10 if rng.random() < 0.5 else 0)


def _clinical(
    rng: np.random.Generator, demo: _Demographics, smoking: str, histology: str, stage: _Stage
) -> _Clinical:
    mu = 0.1 + 0.35 * stage.number + (0.3 if demo.age >= 75 else 0.0)
    ecog = int(np.clip(round(float(rng.normal(mu, 0.7))), 0, 4))
    karnofsky = _karnofsky(rng, ecog) if rng.random() < 0.35 else None
    cea = None
    cea_followup = None
    if rng.random() < 0.4:
        median = 2.0 * (1.0 + 0.6 * (stage.number - 1)) * (1.5 if smoking == "current" else 1.0)
        cea = round(median * math.exp(float(rng.normal(0.0, 0.5))), 1)
        if rng.random() < 0.5:
            cea_followup = round(cea * math.exp(float(rng.normal(0.2, 0.4))), 1)
    return _Clinical(
        smoking=smoking,
        smoking_history=smoking == "former" and bool(rng.random() < 0.6),
        histology=histology,
        generic_code=bool(rng.random() < 0.3),
        ecog=ecog,
        karnofsky=karnofsky,
        cea=cea,
        cea_followup=cea_followup,
        ecog_followup=min(4, ecog + int(rng.integers(0, 3))),
    )


def _plan(rng: np.random.Generator, scenario: int, genotype: _Genotype) -> _Plan:
    """Testing and messiness for the patient's scenario (``index % 4``) plus random extras."""
    if scenario == 1:
        panel: tuple[str, ...] = ("EGFR", "ALK") if rng.random() < 0.5 else ("EGFR", "KRAS", "ALK")
    elif scenario == 3:
        panel = ()
    else:
        panel = LUNG_PANEL
    wild_type = [g for g in panel if not genotype.mutated(g)]
    error_gene = None
    if wild_type and (scenario == 1 or rng.random() < 0.15):
        error_gene = wild_type[int(rng.integers(0, len(wild_type)))]
    full = panel == LUNG_PANEL
    preliminary = full and (scenario == 0 or rng.random() < 0.2)
    followup = scenario in (2, 3) or rng.random() < 0.25
    return _Plan(
        scenario=scenario,
        panel=panel,
        tmb_msi=full,
        preliminary=preliminary,
        spurious_kras=preliminary
        and not genotype.mutated("KRAS")
        and not genotype.mutated("EGFR")
        and bool(rng.random() < 0.5),
        error_gene=error_gene,
        tmb_without_effective=full and (scenario == 2 or rng.random() < 0.2),
        followup=followup,
        acquired_t790m=followup and genotype.mutated("EGFR") and bool(rng.random() < 0.5),
        ecog_followup=scenario == 0 or bool(rng.random() < 0.3),
    )


def _days(rng: np.random.Generator, low: int, high: int) -> datetime.timedelta:
    """A whole number of days in [low, high]."""
    return datetime.timedelta(days=int(rng.integers(low, high + 1)))


def _dates(rng: np.random.Generator, study: datetime.date) -> _Dates:
    specimen = study - _days(rng, 16, 75)
    diagnosis = specimen - _days(rng, 0, 10)
    final_issued = specimen + _days(rng, 5, 14)  # ≤ study - 2
    followup_specimen = study + _days(rng, 45, 200)
    ecog = study - _days(rng, 0, 21) if rng.random() < 0.8 else study
    return _Dates(
        diagnosis=diagnosis,
        specimen=specimen,
        final_issued=final_issued,
        preliminary_issued=specimen + _days(rng, 2, 4),
        stage=min(diagnosis + _days(rng, 1, 10), study - datetime.timedelta(days=1)),
        smoking=study - _days(rng, 0, 60),
        smoking_history=study - _days(rng, 400, 1500),
        ecog=ecog,
        cea=study - _days(rng, 1, 30),
        ecog_followup=study + _days(rng, 1, 120),
        cea_followup=study + _days(rng, 20, 150),
        followup_specimen=followup_specimen,
        followup_issued=followup_specimen + _days(rng, 7, 21),
    )


def _outcome(
    rng: np.random.Generator,
    demo: _Demographics,
    clinical: _Clinical,
    stage: _Stage,
    imaging: _Imaging,
    genotype: _Genotype,
) -> _Outcome:
    """The synthetic ``progression_12m`` label: a logistic model of the true features."""
    driver = genotype.mutated("EGFR") or genotype.mutated("ALK")
    features = {
        "stage_minus_1": float(stage.number - 1),
        "ecog": float(clinical.ecog),
        "log1p_tumour_volume_ml": round(math.log1p(imaging.total_volume_ml), 4),
        "extra_tumours": float(imaging.tumour_count - 1),
        "tp53_mutated": float(genotype.mutated("TP53")),
        "kras_stk11_comutated": float(genotype.mutated("KRAS") and genotype.mutated("STK11")),
        "targetable_driver": float(driver),
        "tmb_high_without_driver": float(genotype.tmb >= 10.0 and not driver),
        "age_decades_from_67": round((demo.age - 67) / 10.0, 4),
        "current_smoker": float(clinical.smoking == "current"),
    }
    logit = OUTCOME_INTERCEPT + sum(OUTCOME_WEIGHTS[k] * v for k, v in features.items())
    probability = 1.0 / (1.0 + math.exp(-logit))
    return _Outcome(
        features=features,
        logit=round(logit, 4),
        probability=round(probability, 4),
        label=bool(rng.random() < probability),
    )


# -- FHIR resources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One resource of the Bundle and what the ground truth says about it."""

    key: str
    resource: dict[str, Any]
    code: str | None  # system|code of the resource's main code
    date: datetime.date | None  # effective date, else the date of issued (what a filter uses)
    disregard: str | None  # why a correct client ignores it; None: it counts


def _instant(day: datetime.date, hour: int = 10) -> str:
    return f"{day.isoformat()}T{hour:02d}:30:00Z"


class _Builder:
    """Collects one patient's resources with stable ``urn:uuid`` fullUrls and key identifiers."""

    def __init__(self, patient_id: str, study_date: datetime.date) -> None:
        self.patient_id = patient_id
        self.study_date = study_date
        self.entries: list[_Entry] = []

    def url(self, key: str) -> str:
        """The ``urn:uuid`` fullUrl of the resource named ``key``."""
        return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, f'{self.patient_id}/{key}')}"

    def ref(self, key: str) -> dict[str, str]:
        return {"reference": self.url(key)}

    def key_identifier(self, key: str) -> dict[str, str]:
        return {"system": RESOURCE_KEY_SYSTEM, "value": f"{self.patient_id}/{key}"}

    def add(
        self,
        key: str,
        resource: dict[str, Any],
        *,
        code: Code | None = None,
        disregard: str | None = None,
    ) -> None:
        """Add ``resource`` (meta and key identifier are filled in here)."""
        resource = {"resourceType": resource["resourceType"], "meta": {"security": [_HTEST]}} | {
            k: v for k, v in resource.items() if k != "resourceType"
        }
        if resource["resourceType"] != "Patient":
            resource["identifier"] = [*resource.get("identifier", []), self.key_identifier(key)]
        date = _resource_date(resource)
        if disregard is None and date is not None and date > self.study_date:
            disregard = "after-study-date"
        self.entries.append(_Entry(key, resource, code.token() if code else None, date, disregard))

    def observation(
        self,
        key: str,
        code: Code,
        *,
        category: str | None,
        effective: datetime.date | None,
        issued: datetime.date | None = None,
        status: str = "final",
        disregard: str | None = None,
        **fields: Any,
    ) -> None:
        """Add an Observation about the patient."""
        resource: dict[str, Any] = {"resourceType": "Observation", "status": status}
        if category is not None:
            resource["category"] = [
                {"coding": [{"system": _OBS_CATEGORY, "code": category}]},
            ]
        resource["code"] = code.concept()
        resource["subject"] = self.ref("patient")
        if effective is not None:
            resource["effectiveDateTime"] = effective.isoformat()
        if issued is not None:
            resource["issued"] = _instant(issued)
        resource.update(fields)
        self.add(key, resource, code=code, disregard=disregard)


def _resource_date(resource: dict[str, Any]) -> datetime.date | None:
    for name in ("effectiveDateTime", "issued", "recordedDate", "started"):
        if name in resource:
            return datetime.date.fromisoformat(resource[name][:10])
    return None


def _component(code: Code, **value: Any) -> dict[str, Any]:
    return {"code": code.concept(), **value}


def _patient(b: _Builder, ident: _Identity, demo: _Demographics) -> None:
    b.add(
        "patient",
        {
            "resourceType": "Patient",
            "identifier": [
                {
                    "use": "usual",
                    "type": _MRN_TYPE.concept(),
                    "system": ident.system,
                    "value": ident.patient_id,
                },
                {"use": "secondary", "system": DECOY_SYSTEM, "value": ident.decoy_value},
            ],
            "active": True,
            "name": [{"use": "official", "family": demo.family, "given": [demo.given]}],
            "gender": demo.sex,
            "birthDate": demo.birth_date.isoformat(),
        },
    )


def _imaging_study(b: _Builder, ct: SynthStudy, header: pydicom.Dataset) -> None:
    n = len(ct.files)
    b.add(
        "imaging-study",
        {
            "resourceType": "ImagingStudy",
            "identifier": [
                {"system": "urn:dicom:uid", "value": f"urn:oid:{ct.StudyInstanceUID}"},
                {"type": _ACCESSION_TYPE.concept(), "value": str(header.AccessionNumber)},
            ],
            "status": "available",
            "modality": [DCM_CT.coding()],
            "subject": b.ref("patient"),
            "started": f"{b.study_date.isoformat()}T09:00:00Z",
            "numberOfSeries": 1,
            "numberOfInstances": n,
            "description": str(header.StudyDescription),
            "series": [
                {
                    "uid": ct.SeriesInstanceUID,
                    "number": int(header.SeriesNumber),
                    "modality": DCM_CT.coding(),
                    "description": str(header.SeriesDescription),
                    "numberOfInstances": n,
                    "bodySite": SCT_THORAX.coding(),
                }
            ],
        },
        code=DCM_CT,
    )


def _condition_code(clinical: _Clinical) -> Code:
    if clinical.generic_code:
        return SCT_NSCLC
    return SCT_LUNG_ADENOCARCINOMA if clinical.histology == "adenocarcinoma" else SCT_LUNG_SQUAMOUS


def _morphology(histology: str) -> Code:
    return (
        SCT_ADENOCARCINOMA_MORPHOLOGY if histology == "adenocarcinoma" else SCT_SQUAMOUS_MORPHOLOGY
    )


def _stage_value(stage: _Stage) -> Code:
    return Code(AJCC, _STAGE_AJCC[stage.group], stage.group)


def _primary_cancer(
    b: _Builder, clinical: _Clinical, stage: _Stage, imaging: _Imaging, dates: _Dates
) -> None:
    code = _condition_code(clinical)
    b.add(
        "primary-cancer",
        {
            "resourceType": "Condition",
            "extension": [
                {
                    "url": MCODE_HISTOLOGY_EXTENSION,
                    "valueCodeableConcept": _morphology(clinical.histology).concept(),
                }
            ],
            "clinicalStatus": Code(_CONDITION_CLINICAL, "active", "Active").concept(),
            "verificationStatus": Code(_CONDITION_VERIFICATION, "confirmed", "Confirmed").concept(),
            "category": [
                Code(_CONDITION_CATEGORY, "problem-list-item", "Problem List Item").concept()
            ],
            "code": code.concept(),
            "bodySite": [
                {
                    "extension": [
                        {
                            "url": MCODE_LATERALITY_EXTENSION,
                            "valueCodeableConcept": SCT_LATERALITY[imaging.primary_side].concept(),
                        }
                    ],
                    "coding": [SCT_LUNG.coding()],
                }
            ],
            "subject": b.ref("patient"),
            "onsetDateTime": dates.diagnosis.isoformat(),
            "recordedDate": dates.diagnosis.isoformat(),
            "stage": [
                {
                    "summary": _stage_value(stage).concept(),
                    "assessment": [b.ref("stage-group")],
                    "type": LOINC_STAGE_GROUP.concept(),
                }
            ],
        },
        code=code,
    )


def _staging(b: _Builder, stage: _Stage, dates: _Dates) -> None:
    common = {
        "category": None,
        "effective": dates.stage,
        "focus": [b.ref("primary-cancer")],
        "method": SCT_AJCC_8.concept(),
    }
    for key, code, value in (
        ("stage-t", LOINC_STAGE_T, f"c{stage.t}"),
        ("stage-n", LOINC_STAGE_N, f"c{stage.n}"),
        ("stage-m", LOINC_STAGE_M, f"c{stage.m}"),
    ):
        b.observation(key, code, valueCodeableConcept=Code(AJCC, value, value).concept(), **common)
    b.observation(
        "stage-group",
        LOINC_STAGE_GROUP,
        valueCodeableConcept=_stage_value(stage).concept(),
        hasMember=[b.ref("stage-t"), b.ref("stage-n"), b.ref("stage-m")],
        **common,
    )


def _smoking(b: _Builder, clinical: _Clinical, dates: _Dates) -> None:
    if clinical.smoking_history:
        b.observation(
            "smoking-status-earlier",
            LOINC_SMOKING,
            category="social-history",
            effective=dates.smoking_history,
            valueCodeableConcept=SCT_SMOKING["current"].concept(),
            disregard="superseded-by-later-value",
        )
    b.observation(
        "smoking-status",
        LOINC_SMOKING,
        category="social-history",
        effective=dates.smoking,
        valueCodeableConcept=SCT_SMOKING[clinical.smoking].concept(),
    )


def _performance(b: _Builder, clinical: _Clinical, plan: _Plan, dates: _Dates) -> None:
    b.observation(
        "ecog",
        LOINC_ECOG,
        category="survey",
        effective=dates.ecog,
        valueInteger=clinical.ecog,
        interpretation=[ECOG_ANSWERS[clinical.ecog].concept()],
    )
    if clinical.karnofsky is not None:
        b.observation(
            "karnofsky",
            LOINC_KARNOFSKY,
            category="survey",
            effective=dates.ecog,
            valueInteger=clinical.karnofsky,
            interpretation=[KARNOFSKY_ANSWERS[clinical.karnofsky].concept()],
        )
    if plan.ecog_followup:
        b.observation(
            "ecog-followup",
            LOINC_ECOG,
            category="survey",
            effective=dates.ecog_followup,
            valueInteger=clinical.ecog_followup,
            interpretation=[ECOG_ANSWERS[clinical.ecog_followup].concept()],
        )


def _cea(b: _Builder, value: float, effective: datetime.date, key: str) -> None:
    b.observation(
        key,
        LOINC_CEA,
        category="laboratory",
        effective=effective,
        issued=effective,
        valueQuantity={"value": value, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"},
        interpretation=[
            Code(_OBS_INTERPRETATION, "H", "High").concept()
            if value > 5.0
            else Code(_OBS_INTERPRETATION, "N", "Normal").concept()
        ],
        referenceRange=[{"high": {"value": 5.0, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"}}],
    )


@dataclass(frozen=True)
class _Report:
    """One genomic report to write: its key prefix, genes, calls, status and dates."""

    key: str
    accession: str
    genes: tuple[str, ...]
    calls: dict[str, tuple[_Call, ...]]
    status: str
    specimen: datetime.date
    issued: datetime.date
    tmb: float | None = None
    msi_high: bool | None = None
    tmb_without_effective: bool = False
    error_gene: str | None = None  # an entered-in-error variant Observation in this gene
    disregard: str | None = None


def _variant_components(call: _Call) -> list[dict[str, Any]]:
    spec = call.spec
    gene = GENES[spec.gene]
    components = [_component(LOINC_GENE_STUDIED, valueCodeableConcept=gene.code().concept())]
    if spec.c_hgvs is not None:
        components.append(
            _component(
                LOINC_C_HGVS,
                valueCodeableConcept=Code(HGVS, spec.c_hgvs, spec.c_hgvs).concept(),
            )
        )
        components.append(
            _component(
                LOINC_TRANSCRIPT,
                valueCodeableConcept=Code(REFSEQ, gene.transcript, gene.transcript).concept(),
            )
        )
    if spec.p_hgvs is not None:
        components.append(
            _component(
                LOINC_P_HGVS,
                valueCodeableConcept=Code(HGVS, spec.p_hgvs, spec.p_hgvs).concept(),
            )
        )
    source = LA_GERMLINE if call.source == "germline" else LA_SOMATIC
    components += [
        _component(LOINC_DNA_CHANGE_TYPE, valueCodeableConcept=spec.change_type.concept()),
        _component(LOINC_GENOMIC_SOURCE, valueCodeableConcept=source.concept()),
        _component(
            LOINC_VAF,
            valueQuantity={"value": call.vaf_percent, "unit": "%", "system": UCUM, "code": "%"},
        ),
    ]
    return components


def _genomic_report(b: _Builder, report: _Report) -> None:
    """Add a report's region-studied, variant, TMB and MSI Observations, then the report."""
    obs = {
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
                _component(LOINC_GENE_STUDIED, valueCodeableConcept=gene.code().concept()),
                _component(LOINC_REGION_DESCRIPTION, valueString=gene.region),
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
        spec = _VARIANTS[report.error_gene][0]
        b.observation(
            key,
            LOINC_VARIANT,
            valueCodeableConcept=LA_PRESENT.concept(),
            component=_variant_components(_Call(spec, 12.0, "somatic")),
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
            "issued": _instant(report.issued),
            "result": [b.ref(k) for k in results],
            "conclusion": _conclusion(report),
        },
        code=LOINC_GENOMIC_REPORT,
        disregard=report.disregard,
    )


def _conclusion(report: _Report) -> str:
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
    ident: _Identity, genotype: _Genotype, plan: _Plan, dates: _Dates, rng: np.random.Generator
) -> _Report:
    """The rapid EGFR/KRAS report issued before the final one (same accession)."""
    rapid = ("EGFR", "KRAS")
    calls = {
        gene: tuple(
            _Call(c.spec, round(max(1.0, c.vaf_percent + float(rng.uniform(-3, 3))), 1), c.source)
            for c in genotype.calls[gene]
        )
        for gene in rapid
    }
    if plan.spurious_kras:  # a call the final report does not confirm
        calls["KRAS"] = (_Call(_VARIANTS["KRAS"][2], 4.1, "somatic"),)
    return _Report(
        key="genomics-preliminary",
        accession=f"GX-{ident.patient_id}-1",
        genes=rapid,
        calls=calls,
        status="preliminary",
        specimen=dates.specimen,
        issued=dates.preliminary_issued,
        disregard="superseded-preliminary",
    )


def _final_report(ident: _Identity, genotype: _Genotype, plan: _Plan, dates: _Dates) -> _Report:
    """The report a client uses: the plan's panel, issued before the study date."""
    return _Report(
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
    ident: _Identity, genotype: _Genotype, plan: _Plan, dates: _Dates, rng: np.random.Generator
) -> _Report:
    """The re-biopsy after the study date: all five genes, sometimes an acquired EGFR T790M."""
    calls = dict(genotype.calls)
    if plan.acquired_t790m:
        vaf = round(max(2.0, genotype.calls["EGFR"][0].vaf_percent * 0.6), 1)
        calls["EGFR"] = (*calls["EGFR"], _Call(_EGFR_T790M, vaf, "somatic"))
    return _Report(
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


def _reports(
    ident: _Identity, genotype: _Genotype, plan: _Plan, dates: _Dates, rng: np.random.Generator
) -> list[_Report]:
    """The genomic reports the patient has: preliminary, final, follow-up (as the plan says)."""
    reports = []
    if plan.preliminary:
        reports.append(_preliminary_report(ident, genotype, plan, dates, rng))
    if plan.panel:
        reports.append(_final_report(ident, genotype, plan, dates))
    if plan.followup:
        reports.append(_followup_report(ident, genotype, plan, dates, rng))
    return reports


# -- ground truth --------------------------------------------------------------------------------


def _source(b: _Builder, key: str) -> dict[str, str]:
    return {"key": key, "fullUrl": b.url(key)}


def _call_truth(call: _Call, source: dict[str, str] | None = None) -> dict[str, Any]:
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


def _genes_context(b: _Builder, genotype: _Genotype, plan: _Plan) -> dict[str, Any]:
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


def _genomics_context(
    b: _Builder, genotype: _Genotype, plan: _Plan, dates: _Dates
) -> dict[str, Any]:
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
            "issued": _instant(dates.final_issued),
        },
        "genes": _genes_context(b, genotype, plan),
        "tmb": tmb,
        "msi": msi,
    }


def _context(
    b: _Builder,
    demo: _Demographics,
    clinical: _Clinical,
    stage: _Stage,
    imaging: _Imaging,
    genotype: _Genotype,
    plan: _Plan,
    dates: _Dates,
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
    code = _condition_code(clinical)
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
            "histology_code": _morphology(clinical.histology).token(),
            "body_site": SCT_LUNG.token(),
            "laterality": imaging.primary_side,
            "onset": dates.diagnosis.isoformat(),
            "source": _source(b, "primary-cancer"),
        },
        "stage": {
            "group": stage.group,
            "ajcc_code": _STAGE_AJCC[stage.group],
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


def _messiness(b: _Builder, clinical: _Clinical, plan: _Plan) -> list[dict[str, Any]]:
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


def _resource_rows(b: _Builder) -> list[dict[str, Any]]:
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


def _imaging_truth(imaging: _Imaging) -> dict[str, Any]:
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
        "ct_truth": "ct/truth.json",
    }


def _hidden_truth(
    genotype: _Genotype, stage: _Stage, plan: _Plan, clinical: _Clinical
) -> dict[str, Any]:
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


# -- writing ------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _bundle_json(b: _Builder) -> str:
    """The transaction Bundle, validated by ``fhir.resources.R4B`` and serialised by it.

    Raises:
        pydantic.ValidationError: a resource is not valid R4 (a bug in this module).
    """
    bundle = {
        "resourceType": "Bundle",
        "meta": {"security": [_HTEST]},
        "type": "transaction",
        "entry": [
            {
                "fullUrl": b.url(e.key),
                "resource": e.resource,
                "request": {"method": "POST", "url": e.resource["resourceType"]},
            }
            for e in b.entries
        ],
    }
    return Bundle.model_validate(bundle).model_dump_json(indent=2) + "\n"


def _write_ct(
    out: Path, ident: _Identity, demo: _Demographics, phantom: Phantom, phantom_seed: int
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
    rng = _rngs(seed, index)
    ident = _identity(seed, index)
    demo = _demographics(rng["identity"])
    smoking = _pick(rng["clinical"], ("never", "former", "current"), SMOKING_PRIOR[demo.sex])
    histology = "adenocarcinoma" if rng["clinical"].random() < P_ADENO[smoking] else "squamous"
    genotype = _genotype(rng["genomics"], histology, smoking)
    phantom, imaging = _make_phantom(rng["imaging"], genotype.mutated("EGFR"), slices, size)
    stage = _stage(rng["clinical"], imaging)
    clinical = _clinical(rng["clinical"], demo, smoking, histology, stage)
    plan = _plan(rng["plan"], index % 4, genotype)
    dates = _dates(rng["plan"], demo.study_date)
    outcome = _outcome(rng["outcome"], demo, clinical, stage, imaging, genotype)

    directory = out / ident.patient_id
    directory.mkdir(parents=True, exist_ok=True)
    ct, header = _write_ct(directory / "ct", ident, demo, phantom, imaging.phantom_seed)

    b = _Builder(ident.patient_id, demo.study_date)
    _patient(b, ident, demo)
    _imaging_study(b, ct, header)
    _primary_cancer(b, clinical, stage, imaging, dates)
    _staging(b, stage, dates)
    _smoking(b, clinical, dates)
    _performance(b, clinical, plan, dates)
    if clinical.cea is not None:
        _cea(b, clinical.cea, dates.cea, "cea")
        if clinical.cea_followup is not None:
            _cea(b, clinical.cea_followup, dates.cea_followup, "cea-followup")
    for report in _reports(ident, genotype, plan, dates, rng["plan"]):
        _genomic_report(b, report)
    bundle_path = directory / "bundle.json"
    bundle_path.write_text(_bundle_json(b))

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
        "context": _context(b, demo, clinical, stage, imaging, genotype, plan, dates),
        "imaging": _imaging_truth(imaging),
        "truth": _hidden_truth(genotype, stage, plan, clinical),
        "outcome": {
            "name": "progression_12m",
            "label": outcome.label,
            "probability": outcome.probability,
            "logit": outcome.logit,
            "risk_category": outcome.risk_category,
            "features": outcome.features,
        },
        "resources": _resource_rows(b),
        "excluded_after_study_date": [
            e.key for e in b.entries if e.disregard == "after-study-date"
        ],
        "messiness": _messiness(b, clinical, plan),
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
            "pixel_spacing_mm": _FIELD_OF_VIEW_MM / size,
            "slice_thickness_mm": _SLICE_THICKNESS_MM,
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
        },
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
