"""The fusion operator's logic with the shipped reference model: outputs read by name, the
contributions add up, nothing invented for a missing modality, a tested EGFR reported as the
test, a model trained on other inputs refused."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from radfusion.model_config import FusionModelConfig, ModelConfigError, default_fusion_config_path
from radfusion.operators.fusion import check_model, predict
from radfusion.operators.fusion_features import FEATURES
from radfusion.operators.segmentation_model import load_torchscript
from radfusion.patient_context import ContextOutcome, GeneResult, Source
from tests.unit.operators.test_fusion_features import TUMOUR, context


@pytest.fixture(scope="module")
def reference() -> tuple[object, FusionModelConfig]:
    config = FusionModelConfig.from_yaml(default_fusion_config_path())
    return load_torchscript(config.model_path), config


def _run(
    reference: tuple[object, FusionModelConfig], outcome: ContextOutcome | None, tumours=(TUMOUR,)
):  # type: ignore[no-untyped-def]
    model, config = reference
    return predict(model, config, list(tumours), None, outcome)  # type: ignore[arg-type]


def test_the_reference_model_takes_this_versions_inputs() -> None:
    config = FusionModelConfig.from_yaml(default_fusion_config_path())
    check_model(config)
    assert config.demonstration and config.features == FEATURES


def test_a_model_trained_on_other_inputs_is_refused() -> None:
    config = FusionModelConfig.from_yaml(default_fusion_config_path())
    with pytest.raises(ModelConfigError, match="other inputs"):
        check_model(dataclasses.replace(config, features=config.features[::-1]))
    with pytest.raises(ModelConfigError, match="outputs lack"):
        check_model(dataclasses.replace(config, outputs=config.outputs[:3]))


def test_all_modalities_give_a_result_whose_contributions_add_up(reference) -> None:  # type: ignore[no-untyped-def]
    result = _run(reference, ContextOutcome("available", context()))
    assert result is not None
    assert result.present == {"imaging": True, "clinical": True, "genomic": True}
    assert result.missing == {}
    p = result.progression_probability
    logit = result.baseline_log_odds + sum(c.log_odds for c in result.modalities)
    assert math.isclose(logit, math.log(p / (1 - p)), abs_tol=1e-4)
    assert 0 < result.progression_sd < 0.5 and result.risk_sd >= 0
    assert result.risk_group == ("low" if p < 0.3 else "intermediate" if p < 0.6 else "high")
    assert result.top_features and all(
        abs(a.log_odds) >= abs(b.log_odds)
        for a, b in zip(result.top_features, result.top_features[1:], strict=False)
    )
    assert "Patient/1" in result.sources and "Observation/1" in result.sources


def test_a_tested_egfr_is_reported_as_the_test_not_the_model(reference) -> None:  # type: ignore[no-untyped-def]
    src = (Source("Observation/egfr", "3"),)
    tested = context(genes={"EGFR": GeneResult("EGFR", "present", sources=src)})
    result = _run(reference, ContextOutcome("available", tested))
    assert result is not None and result.egfr.tested
    assert result.egfr.status == "present" and result.egfr.probability is None
    assert result.egfr.sources == ("Observation/egfr/_history/3",)
    untested = _run(reference, ContextOutcome("available", context(genes={})))
    assert untested is not None and not untested.egfr.tested
    assert untested.egfr.probability is not None and 0 <= untested.egfr.probability <= 1


def test_missing_genomics_are_said_and_widen_the_uncertainty(reference) -> None:  # type: ignore[no-untyped-def]
    with_genes = _run(reference, ContextOutcome("available", context()))
    without = _run(reference, ContextOutcome("available", context(genes={})))
    assert with_genes is not None and without is not None
    assert without.present["genomic"] is False
    assert without.missing["genomic"] == "no gene tested and no TMB as of the study date"
    assert without.progression_sd > with_genes.progression_sd


def test_fhir_down_leaves_imaging_only_and_says_why(reference) -> None:  # type: ignore[no-untyped-def]
    down = ContextOutcome("unavailable", reason="FHIR server unreachable: ConnectError")
    result = _run(reference, down)
    assert result is not None and result.used == ("imaging",)
    assert "could not be reached" in result.missing["clinical"]
    assert result.missing["genomic"] == result.missing["clinical"]
    assert result.sources == ()
    nothing = _run(reference, None, tumours=())
    assert nothing is None  # no modality at all: nothing to fuse, nothing invented


def test_no_tumour_is_missing_imaging_not_a_healthy_lung(reference) -> None:  # type: ignore[no-untyped-def]
    result = _run(reference, ContextOutcome("available", context()), tumours=())
    assert result is not None and result.present["imaging"] is False
    assert result.missing["imaging"] == "radiomics are off"  # predict() was given no Radiomics


def test_a_malformed_output_is_refused(reference) -> None:  # type: ignore[no-untyped-def]
    _, config = reference

    def short(batch: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, 3)

    with pytest.raises(ValueError, match="not one finite row"):
        predict(short, config, [TUMOUR], None, None)
