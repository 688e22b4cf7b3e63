"""The code sets the patient context recognises, each with its source.

Matched on code (with its system), as mCODE asks, never on display text or profile URL.
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = [
    "HGNC_SYMBOLS",
    "LUNG_CANCER_SNOMED",
    "LUNG_CANCER_STAGE",
    "STAGE_GROUP_LOINC",
    "STAGE_GROUP_SNOMED",
    "STAGE_VALUES",
]

LUNG_CANCER_SNOMED = MappingProxyType(
    {
        # mCODE PrimaryOrUncertainBehaviorCancerDisorderVS (SNOMED CT disorders of the lung);
        # the concepts lung cancer records use most.
        "363358000": "Malignant tumor of lung",
        "93880001": "Primary malignant neoplasm of lung",
        "187875007": "Malignant neoplasm of bronchus and lung",
        "254637007": "Non-small cell lung cancer",
        "254626006": "Adenocarcinoma of lung",
        "254634000": "Squamous cell carcinoma of lung",
        "254632001": "Small cell carcinoma of lung",
        # Synthea's lung_cancer module (synthetichealth/synthea,
        # src/main/resources/modules/lung_cancer.json): the stage is part of the concept.
        "424132000": "Non-small cell carcinoma of lung, TNM stage 1",
        "425048006": "Non-small cell carcinoma of lung, TNM stage 2",
        "422968005": "Non-small cell carcinoma of lung, TNM stage 3",
        "423121009": "Non-small cell carcinoma of lung, TNM stage 4",
        "67811000119102": "Primary small cell malignant neoplasm of lung, TNM stage 1",
        "67821000119109": "Primary small cell malignant neoplasm of lung, TNM stage 2",
        "67831000119107": "Primary small cell malignant neoplasm of lung, TNM stage 3",
        "67841000119103": "Primary small cell malignant neoplasm of lung, TNM stage 4",
    }
)
"""Primary lung cancer, SNOMED CT (ICD-10 C34.x is matched by prefix)."""

STAGE_VALUES = MappingProxyType(
    {1: ("258215001", "Stage 1"), 2: ("258219007", "Stage 2"),
     3: ("258224005", "Stage 3"), 4: ("258228008", "Stage 4")}
)  # fmt: skip
"""SNOMED CT stage qualifier values, by stage group number."""

LUNG_CANCER_STAGE = MappingProxyType(
    {
        "424132000": 1,
        "425048006": 2,
        "422968005": 3,
        "423121009": 4,
        "67811000119102": 1,
        "67821000119109": 2,
        "67831000119107": 3,
        "67841000119103": 4,
    }
)
"""The stage group a lung cancer concept carries in itself (Synthea's; see above)."""

STAGE_GROUP_LOINC = frozenset({"21908-9", "21902-2", "21914-7"})
"""LOINC stage group codes: clinical, pathologic, other (Stage group.clinical Cancer …)."""

STAGE_GROUP_SNOMED = frozenset(
    {
        "399537006",  # clinical TNM stage grouping (mCODE's TNMClinicalStageGroup code)
        "399588009",  # pathologic TNM stage grouping (mCODE's TNMPathologicalStageGroup code)
        "1222593009",  # American Joint Committee on Cancer clinical stage group
        "1222592004",  # American Joint Committee on Cancer pathological stage group
        "385356007",  # tumor stage finding
    }
)
"""SNOMED CT codes of stage group Observations (mCODE STU2+)."""

HGNC_SYMBOLS = MappingProxyType(
    {
        "HGNC:3236": "EGFR",
        "HGNC:6407": "KRAS",
        "HGNC:427": "ALK",
        "HGNC:11998": "TP53",
        "HGNC:11389": "STK11",
        "HGNC:1097": "BRAF",
        "HGNC:10261": "ROS1",
        "HGNC:7029": "MET",
        "HGNC:9967": "RET",
        "HGNC:3430": "ERBB2",
        "HGNC:8975": "PIK3CA",
    }
)
"""HGNC identifiers of the lung panel and common NSCLC drivers, for gene codings that carry
the identifier without the symbol as display (genenames.org)."""
