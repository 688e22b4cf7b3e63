"""The fusion model's inputs: one vector per patient from the image (radiomics of the tumours
the app found), the clinical record and the genomic results, each modality with a presence
flag, each gene with a tested flag.

Nothing is invented: a modality that is missing is all zeros with its presence flag 0, an
untested gene is 0 with its tested flag 0, a missing clinical value is 0 with its own
missing flag. The fusion model is trained with modalities dropped at random so that it works,
and says so, when one is absent. The training script (``packaging/models/lung_fusion``) and the
app build the vector with these same functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from radfusion.patient_context import Coded, PatientContext

__all__ = [
    "CLINICAL",
    "FEATURES",
    "GENES",
    "GENOMIC",
    "IMAGING",
    "MODALITIES",
    "FusionInputs",
    "clinical_features",
    "fusion_inputs",
    "genomic_features",
    "imaging_features",
    "primary_tumour",
    "stage_number",
]

GENES = ("EGFR", "KRAS", "ALK", "TP53", "STK11")

IMAGING = (
    "log1p_total_volume_ml",
    "tumour_count",  # capped at 3
    "primary_log1p_volume_ml",
    "primary_max_diameter_cm",
    "primary_sphericity",
    "primary_ground_glass_fraction",
    "primary_mean_hu_100",
    "primary_sd_hu_100",
    "primary_skewness",
    "primary_excess_kurtosis",  # clipped to [-5, 20]
    "primary_glcm_log1p_contrast",
    "primary_glcm_joint_entropy",
    "primary_glrlm_short_run_emphasis",
    "primary_glrlm_run_entropy",
)
CLINICAL = (
    "age_decades_from_67",
    "male",
    "stage_minus_1",
    "stage_missing",
    "ecog",
    "ecog_missing",
    "smoking_current",
    "smoking_former",
    "smoking_missing",
    "log1p_cea",
    "cea_missing",
)
GENOMIC = (
    *(f"{g}_mutated" for g in GENES),
    *(f"{g}_tested" for g in GENES),
    "log1p_tmb",
    "tmb_tested",
)
MODALITIES = ("imaging", "clinical", "genomic")
FEATURES = IMAGING + CLINICAL + GENOMIC
"""The vector's order: imaging, clinical, genomic."""

# Radiomics names (operators/radiomics.py) the imaging part reads.
_RADIOMICS = (
    "volume",
    "max_3d_diameter",
    "sphericity",
    "ground_glass_fraction",
    "mean",
    "sd",
    "skewness",
    "excess_kurtosis",
    "glcm_contrast",
    "glcm_joint_entr",
    "glrlm_sre",
    "glrlm_rl_entr",
)
_SMOKING = {
    "266919005": "never",  # never smoked tobacco
    "8517006": "former",  # ex-smoker
    "449868002": "current",  # smokes tobacco daily
    "428041000124106": "current",  # occasional tobacco smoker
    "77176002": "current",  # smoker
    "65568007": "current",  # cigarette smoker
    "428071000124103": "current",  # current heavy tobacco smoker
    "428061000124105": "current",  # current light tobacco smoker
    "266927001": "missing",  # tobacco smoking consumption unknown
}


@dataclass(frozen=True)
class FusionInputs:
    """A patient's vector (:data:`FEATURES` order) and which modalities are present."""

    values: np.ndarray  # float32, len(FEATURES)
    present: tuple[bool, bool, bool]  # imaging, clinical, genomic

    def __post_init__(self) -> None:
        if self.values.shape != (len(FEATURES),):
            raise ValueError(f"values: {self.values.shape} is not ({len(FEATURES)},)")
        if not np.all(np.isfinite(self.values)):
            raise ValueError("values: not all finite")

    @property
    def missing(self) -> tuple[str, ...]:
        """The modalities that are absent."""
        return tuple(m for m, p in zip(MODALITIES, self.present, strict=True) if not p)


def _usable(tumours: Sequence[Mapping[str, float]]) -> list[Mapping[str, float]]:
    """The tumours with every radiomic feature the imaging part reads."""
    return [t for t in tumours if all(math.isfinite(float(t.get(k, math.nan))) for k in _RADIOMICS)]


def primary_tumour(tumours: Sequence[Mapping[str, float]]) -> Mapping[str, float] | None:
    """The tumour the imaging part describes as the primary: the largest usable one."""
    usable = _usable(tumours)
    return max(usable, key=lambda t: float(t["volume"])) if usable else None


def imaging_features(tumours: Sequence[Mapping[str, float]]) -> np.ndarray | None:
    """The imaging part from the radiomics of each tumour (name → value, as
    ``operators/radiomics.py`` names them); the primary is the largest. None without a tumour
    with radiomics (the image then counts as missing, not as "no cancer")."""
    usable = _usable(tumours)
    primary = primary_tumour(usable)
    if primary is None:
        return None
    total_ml = sum(float(t["volume"]) for t in usable) / 1000.0
    values = [
        math.log1p(total_ml),
        float(min(len(usable), 3)),
        math.log1p(float(primary["volume"]) / 1000.0),
        float(primary["max_3d_diameter"]) / 10.0,
        float(primary["sphericity"]),
        float(primary["ground_glass_fraction"]),
        float(primary["mean"]) / 100.0,
        float(primary["sd"]) / 100.0,
        float(primary["skewness"]),
        max(-5.0, min(20.0, float(primary["excess_kurtosis"]))),
        math.log1p(max(0.0, float(primary["glcm_contrast"]))),
        float(primary["glcm_joint_entr"]),
        float(primary["glrlm_sre"]),
        float(primary["glrlm_rl_entr"]),
    ]
    return np.asarray(values, dtype=np.float32)


def stage_number(stage: Coded | None) -> int | None:
    """1..4 for a stage group (AJCC ``1A1``/``IIIB``, SNOMED "Stage 2", "Stage IV"), else
    None."""
    if stage is None:
        return None
    for text in (stage.code, stage.display):
        match = re.match(r"^\s*(?:stage\s*)?(IV|III|II|I|[1-4])(?![V\d])", text, re.IGNORECASE)
        if match:
            token = match.group(1).upper()
            return {"I": 1, "II": 2, "III": 3, "IV": 4}.get(token) or int(token)
    return None


def _smoking(coded: Coded | None) -> str:
    if coded is None:
        return "missing"
    known = _SMOKING.get(coded.code)
    if known:
        return known
    text = coded.display.lower()
    if "never" in text or "non-smoker" in text:
        return "never"
    if "former" in text or "ex-" in text:
        return "former"
    return "current" if "smok" in text else "missing"


def clinical_features(context: PatientContext) -> np.ndarray | None:
    """The clinical part; None when the record has none of age, sex, stage, ECOG or smoking."""
    age, sex = context.age_years.value, context.sex.value
    stage = stage_number(context.stage_group.value)
    ecog = context.ecog.value
    smoking = _smoking(context.smoking.value)
    if age is None and sex is None and stage is None and ecog is None and smoking == "missing":
        return None
    cea = context.tumour_markers.get("CEA")
    cea_value = cea.value if cea is not None else None
    values = [
        (age - 67) / 10.0 if age is not None else 0.0,
        1.0 if sex == "male" else 0.0,
        (stage - 1) if stage is not None else 0.0,
        0.0 if stage is not None else 1.0,
        float(ecog) if ecog is not None else 0.0,
        0.0 if ecog is not None else 1.0,
        1.0 if smoking == "current" else 0.0,
        1.0 if smoking == "former" else 0.0,
        1.0 if smoking == "missing" else 0.0,
        math.log1p(max(0.0, cea_value)) if cea_value is not None else 0.0,
        0.0 if cea_value is not None else 1.0,
    ]
    return np.asarray(values, dtype=np.float32)


def genomic_features(context: PatientContext) -> np.ndarray | None:
    """The genomic part; None when no gene was tested and no TMB is known (or genomics were
    withheld)."""
    if context.genomics_withheld:
        return None
    status = {
        g: r.status if (r := context.genes.get(g)) is not None else "not-tested" for g in GENES
    }
    done = {g: status[g] in ("present", "absent") for g in GENES}
    tmb = context.tmb.value
    if not any(done.values()) and tmb is None:
        return None
    values = [
        *(1.0 if status[g] == "present" else 0.0 for g in GENES),
        *(1.0 if done[g] else 0.0 for g in GENES),
        math.log1p(max(0.0, tmb)) if tmb is not None else 0.0,
        1.0 if tmb is not None else 0.0,
    ]
    return np.asarray(values, dtype=np.float32)


def fusion_inputs(
    tumours: Sequence[Mapping[str, float]], context: PatientContext | None
) -> FusionInputs:
    """The whole vector: :func:`imaging_features`, :func:`clinical_features` and
    :func:`genomic_features`, zeros where a modality is missing."""
    parts = (
        imaging_features(tumours),
        clinical_features(context) if context is not None else None,
        genomic_features(context) if context is not None else None,
    )
    sizes = (len(IMAGING), len(CLINICAL), len(GENOMIC))
    values = np.concatenate(
        [p if p is not None else np.zeros(n, np.float32) for p, n in zip(parts, sizes, strict=True)]
    )
    present = (parts[0] is not None, parts[1] is not None, parts[2] is not None)
    return FusionInputs(values.astype(np.float32), present)
