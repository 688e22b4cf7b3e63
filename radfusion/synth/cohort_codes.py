"""Coded concepts and identifier systems of the synthetic cohort's FHIR records.

The LOINC, SNOMED CT, HGNC, Sequence Ontology, AJCC and DICOM codes the Bundles use (the ground
truth names them as ``system|code`` tokens), and the identifier systems that tie a record to its
site and to the ground truth. Synthetic data only: see :mod:`radfusion.synth.cohort`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "AJCC",
    "DCM",
    "DCM_CT",
    "DECOY_SYSTEM",
    "ECOG_ANSWERS",
    "GENOMICS_ACCESSION_SYSTEM",
    "HGNC",
    "HGVS",
    "KARNOFSKY_ANSWERS",
    "LA_GERMLINE",
    "LA_MSI_HIGH",
    "LA_MSI_STABLE",
    "LA_PRESENT",
    "LA_SEQUENCING",
    "LA_SOMATIC",
    "LOINC",
    "LOINC_CEA",
    "LOINC_C_HGVS",
    "LOINC_DNA_CHANGE_TYPE",
    "LOINC_ECOG",
    "LOINC_GENE_STUDIED",
    "LOINC_GENOMIC_REPORT",
    "LOINC_GENOMIC_SOURCE",
    "LOINC_KARNOFSKY",
    "LOINC_MSI",
    "LOINC_P_HGVS",
    "LOINC_REGION_DESCRIPTION",
    "LOINC_REGION_STUDIED",
    "LOINC_SMOKING",
    "LOINC_STAGE_GROUP",
    "LOINC_STAGE_M",
    "LOINC_STAGE_N",
    "LOINC_STAGE_T",
    "LOINC_TMB",
    "LOINC_TRANSCRIPT",
    "LOINC_VAF",
    "LOINC_VARIANT",
    "MCODE_HISTOLOGY_EXTENSION",
    "MCODE_LATERALITY_EXTENSION",
    "REFSEQ",
    "RESOURCE_KEY_SYSTEM",
    "SCT_ADENOCARCINOMA_MORPHOLOGY",
    "SCT_AJCC_8",
    "SCT_LATERALITY",
    "SCT_LUNG",
    "SCT_LUNG_ADENOCARCINOMA",
    "SCT_LUNG_SQUAMOUS",
    "SCT_NSCLC",
    "SCT_SMOKING",
    "SCT_SQUAMOUS_MORPHOLOGY",
    "SCT_THORAX",
    "SEQUENCE_ONTOLOGY",
    "SITE_A_OID",
    "SITE_B_URI",
    "SNOMED",
    "SO_DELETION",
    "SO_GENE_FUSION",
    "SO_SNV",
    "STAGE_AJCC",
    "UCUM",
    "Code",
]

# -- identifier systems ------------------------------------------------------------------------

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

STAGE_AJCC: dict[str, str] = {
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
