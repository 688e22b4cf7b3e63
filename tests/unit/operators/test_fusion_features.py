"""Fusion inputs: the same vector from the app and from training, nothing invented."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from radfusion.operators.fusion_features import (
    CLINICAL,
    FEATURES,
    GENES,
    GENOMIC,
    IMAGING,
    fusion_inputs,
    stage_number,
)
from radfusion.patient_context import Coded, Fact, GeneResult, PatientContext, Source

TUMOUR = {
    "volume": 4000.0,
    "max_3d_diameter": 22.0,
    "sphericity": 0.8,
    "ground_glass_fraction": 0.4,
    "mean": -200.0,
    "sd": 150.0,
    "skewness": 0.3,
    "excess_kurtosis": 40.0,
    "glcm_contrast": 12.0,
    "glcm_joint_entr": 6.0,
    "glrlm_sre": 0.8,
    "glrlm_rl_entr": 4.0,
}


def context(**changes: object) -> PatientContext:
    src = (Source("Observation/1"),)
    base: dict[str, object] = {
        "patient": Source("Patient/1"),
        "study_date": dt.date(2024, 5, 1),
        "age_years": Fact(77, src),
        "sex": Fact("male", src),
        "genes": {
            "EGFR": GeneResult("EGFR", "present"),
            "KRAS": GeneResult("KRAS", "absent"),
            "TP53": GeneResult("TP53", "not-tested"),
        },
        "tmb": Fact.unknown("no TMB"),
        "msi": Fact.unknown("no MSI"),
        "cancer": Fact.unknown("none"),
        "stage_group": Fact(Coded("http://cancerstaging.org", "3B", "IIIB"), src),
        "ecog": Fact(1, src),
        "karnofsky": Fact.unknown("none"),
        "smoking": Fact(Coded("http://snomed.info/sct", "8517006", "Ex-smoker"), src),
        "tumour_markers": {"CEA": Fact(4.0, src)},
    }
    base.update(changes)
    return PatientContext(**base)  # type: ignore[arg-type]


def value(inputs: object, name: str) -> float:
    return float(inputs.values[FEATURES.index(name)])  # type: ignore[attr-defined]


def test_every_modality_present() -> None:
    small = {**TUMOUR, "volume": 500.0}
    inputs = fusion_inputs([small, TUMOUR], context())
    assert inputs.present == (True, True, True) and inputs.missing == ()
    assert value(inputs, "tumour_count") == 2
    assert value(inputs, "primary_log1p_volume_ml") == pytest.approx(np.log1p(4.0))
    assert value(inputs, "primary_excess_kurtosis") == 20.0  # clipped
    assert value(inputs, "age_decades_from_67") == pytest.approx(1.0)
    assert value(inputs, "stage_minus_1") == 2 and value(inputs, "stage_missing") == 0
    assert value(inputs, "smoking_former") == 1 and value(inputs, "smoking_current") == 0
    assert value(inputs, "EGFR_mutated") == 1 and value(inputs, "EGFR_tested") == 1
    assert value(inputs, "KRAS_mutated") == 0 and value(inputs, "KRAS_tested") == 1
    assert value(inputs, "TP53_tested") == 0 and value(inputs, "ALK_tested") == 0
    assert value(inputs, "tmb_tested") == 0
    assert len(FEATURES) == len(IMAGING) + len(CLINICAL) + len(GENOMIC)


def test_missing_modalities_are_zero_and_flagged_never_invented() -> None:
    untested = context(genes={g: GeneResult(g, "not-tested") for g in GENES})
    inputs = fusion_inputs([], untested)
    assert inputs.present == (False, True, False)
    assert inputs.missing == ("imaging", "genomic")
    assert not inputs.values[: len(IMAGING)].any()
    assert not inputs.values[len(IMAGING) + len(CLINICAL) :].any()
    none = fusion_inputs([TUMOUR], None)
    assert none.present == (True, False, False)


def test_withheld_genomics_count_as_missing() -> None:
    inputs = fusion_inputs([TUMOUR], context(genomics_withheld="consent denies it"))
    assert inputs.present == (True, True, False)


def test_a_missing_clinical_value_has_its_own_flag() -> None:
    inputs = fusion_inputs([TUMOUR], context(ecog=Fact.unknown("x"), stage_group=Fact.unknown("y")))
    assert value(inputs, "ecog_missing") == 1 and value(inputs, "ecog") == 0
    assert value(inputs, "stage_missing") == 1


def test_a_tumour_without_radiomics_is_not_imaging() -> None:
    inputs = fusion_inputs([{**TUMOUR, "sphericity": float("nan")}], context())
    assert inputs.present[0] is False


@pytest.mark.parametrize(
    ("code", "display", "expected"),
    [
        ("1A1", "IA1", 1),
        ("IIIB", "IIIB", 3),
        ("258219007", "Stage 2 (qualifier value)", 2),
        ("x", "Stage IV", 4),
        ("4", "", 4),
        ("?", "unknown", None),
    ],
)
def test_stage_number(code: str, display: str, expected: int | None) -> None:
    assert stage_number(Coded("s", code, display)) == expected
