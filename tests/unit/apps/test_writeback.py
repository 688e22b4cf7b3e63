"""The write-back's resources for a fusion result: what each says, the identifiers that make a
rerun an update, the references filled in order, nothing written without a patient."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from radfusion.apps.lung_ct.writeback import IDENTIFIER_SYSTEM, _fill, fusion_resources
from radfusion.model_config import FusionModelConfig, default_fusion_config_path
from radfusion.operators.fusion import FusionResult, predict
from radfusion.operators.segmentation_model import load_torchscript
from radfusion.patient_context import ContextOutcome, GeneResult
from tests.unit.operators.test_fusion_features import TUMOUR, context

STUDY, SR = "1.2.3.4", "1.2.3.4.5"


def _fusion(**changes: object) -> FusionResult:
    config = FusionModelConfig.from_yaml(default_fusion_config_path())
    outcome = ContextOutcome("available", context(**changes))
    result = predict(load_torchscript(config.model_path), config, [TUMOUR], None, outcome)
    assert result is not None
    return result


def test_an_untested_egfr_gets_a_predicted_observation_and_all_cite_the_sr() -> None:
    planned = fusion_resources(
        _fusion(genes={}), study_uid=STUDY, sr_uid=SR, study_date=dt.date(2024, 5, 1)
    )
    assert [kind for kind, _ in planned] == ["egfr", "volume", "diameter", "report", "risk"]
    for kind, resource in planned:
        ours, dicom = resource["identifier"]
        assert ours == {
            "system": IDENTIFIER_SYSTEM,
            "value": f"{STUDY}:radfusion-lung-fusion:{kind}",
        }
        assert dicom == {"system": "urn:dicom:uid", "value": f"urn:oid:{SR}"}
        assert resource["subject"] == {"reference": "Patient/1"}
        assert resource["status"] == "preliminary"
    egfr = dict(planned)["egfr"]
    assert 0 <= egfr["valueQuantity"]["value"] <= 1
    assert "not a test result" in egfr["code"]["text"]
    volume = dict(planned)["volume"]
    assert volume["valueQuantity"] == pytest.approx(
        {"value": 4.0, "unit": "mL", "system": "http://unitsofmeasure.org", "code": "mL"}
    )
    risk = dict(planned)["risk"]
    prediction = risk["prediction"][0]
    assert prediction["qualitativeRisk"]["coding"][0]["code"] in ("low", "moderate", "high")
    assert "not for clinical use" in risk["note"][0]["text"]
    report = dict(planned)["report"]
    assert report["result"] == [
        {"reference": "{egfr}"},
        {"reference": "{volume}"},
        {"reference": "{diameter}"},
    ]
    assert report["effectiveDateTime"] == "2024-05-01"


def test_a_tested_egfr_is_not_predicted_again() -> None:
    tested = _fusion(genes={"EGFR": GeneResult("EGFR", "absent")})
    kinds = [k for k, _ in fusion_resources(tested, study_uid=STUDY, sr_uid=SR, study_date=None)]
    assert "egfr" not in kinds


def test_references_are_filled_with_the_servers_ids() -> None:
    planned = dict(fusion_resources(_fusion(), study_uid=STUDY, sr_uid=SR, study_date=None))
    refs = {"imaging": "ImagingStudy/9", "volume": "Observation/1", "diameter": "Observation/2",
            "report": "DiagnosticReport/3"}  # fmt: skip
    risk = _fill(planned["risk"], refs)
    assert risk["parent"] == {"reference": "DiagnosticReport/3"}
    assert [b["reference"] for b in risk["basis"]] == [
        "ImagingStudy/9", "Observation/1", "Observation/2"
    ]  # fmt: skip


def test_nothing_is_written_without_a_patient() -> None:
    anonymous = dataclasses.replace(_fusion(), patient=None)
    with pytest.raises(ValueError, match="no patient record"):
        fusion_resources(anonymous, study_uid=STUDY, sr_uid=SR, study_date=None)
