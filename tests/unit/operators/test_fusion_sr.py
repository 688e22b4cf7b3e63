"""The fusion SR: valid DICOM (dciodvfy), its own series, the private coding scheme declared,
the fusion outputs as coded NUM/CODE/TEXT items with the values of the result, a tested EGFR
as the test's result, and the lung-ct SR as evidence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from radfusion.model_config import FusionModelConfig, default_fusion_config_path
from radfusion.operators.fusion import FusionResult, predict
from radfusion.operators.fusion_sr import CODES, SCHEME, SERIES_NUMBER, write_fusion_sr
from radfusion.operators.segmentation_model import load_torchscript
from radfusion.patient_context import ContextOutcome, GeneResult, Source
from radfusion.synth.ct_series import synth_ct
from tests.conftest import evidence_uids
from tests.unit.operators.test_fusion_features import TUMOUR, context
from tests.unit.operators.test_sr_writer import dciodvfy_errors

UIDS = {
    "series_instance_uid": "1.2.826.0.1.3680043.10.1234.9.97",
    "sop_instance_uid": "1.2.826.0.1.3680043.10.1234.9.98",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    out = tmp_path_factory.mktemp("ct")
    synth_ct(out, slices=6, rows=64, columns=64, tumours=0)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(out.glob("*.dcm"))]


def _result(outcome: ContextOutcome | None) -> FusionResult:
    config = FusionModelConfig.from_yaml(default_fusion_config_path())
    result = predict(load_torchscript(config.model_path), config, [TUMOUR], None, outcome)
    assert result is not None
    return result


def _items(ds: Dataset) -> list[Dataset]:
    """Every content item, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        found.append(item)
        found.extend(_items(item))
    return found


def _named(ds: Dataset, concept: str) -> list[Dataset]:
    code = CODES[concept]
    return [
        i
        for i in _items(ds)
        if i.ConceptNameCodeSequence[0].CodeValue == code.value
        and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == code.scheme_designator
    ]


def _number(ds: Dataset, concept: str) -> float:
    (item,) = _named(ds, concept)
    return float(item.MeasuredValueSequence[0].NumericValue)


def test_a_full_result_is_valid_and_holds_the_results_values(
    sources: list[Dataset], tmp_path: Path
) -> None:
    result = _result(ContextOutcome("available", context(genes={})))
    path = write_fusion_sr(sources, result, measurement_sr=None, path=tmp_path / "f.dcm", **UIDS)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SeriesNumber == SERIES_NUMBER and ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert "not for clinical use" in ds.SeriesDescription
    assert SCHEME in {s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence}
    assert _number(ds, "progression_probability") == pytest.approx(
        result.progression_probability, abs=1e-6
    )
    assert _number(ds, "egfr_probability") == pytest.approx(result.egfr.probability, abs=1e-6)
    for c in result.modalities:
        assert _number(ds, f"contribution_{c.name}") == pytest.approx(c.log_odds, abs=1e-6)
    (group,) = _named(ds, "risk_group")
    assert group.ConceptCodeSequence[0].CodeValue == CODES[result.risk_group].value
    missing = [i.ConceptCodeSequence[0].CodeValue for i in _named(ds, "modality_missing")]
    assert missing == [CODES["genomic"].value]
    (why,) = _named(ds, "missing_reason")
    assert why.TextValue == f"genomic: {result.missing['genomic']}"
    (top,) = _named(ds, "top_contributions")
    assert result.top_features[0].label in top.TextValue
    (fhir,) = _named(ds, "fhir_sources")
    assert "Patient/1" in fhir.TextValue


def test_a_tested_egfr_is_the_records_result_not_a_probability(
    sources: list[Dataset], tmp_path: Path
) -> None:
    src = (Source("Observation/egfr", "2"),)
    tested = context(genes={"EGFR": GeneResult("EGFR", "absent", sources=src)})
    result = _result(ContextOutcome("available", tested))
    path = write_fusion_sr(sources, result, measurement_sr=None, path=tmp_path / "f.dcm", **UIDS)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert _named(ds, "egfr_probability") == []
    (status,) = _named(ds, "egfr_tested")
    assert status.ConceptCodeSequence[0].CodeValue == "2667000"  # SNOMED CT Absent
    (where,) = _named(ds, "egfr_sources")
    assert where.TextValue == "Observation/egfr/_history/2"


def test_the_measurement_sr_is_evidence(sources: list[Dataset], tmp_path: Path) -> None:
    measurement = Dataset()
    measurement.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    measurement.SOPInstanceUID = "1.2.826.0.1.3680043.10.1234.9.55"
    measurement.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1234.9.54"
    measurement.StudyInstanceUID = sources[0].StudyInstanceUID
    result = _result(None)
    path = write_fusion_sr(
        sources, result, measurement_sr=measurement, path=tmp_path / "f.dcm", **UIDS
    )
    ds = pydicom.dcmread(path)
    referenced = evidence_uids(ds)
    assert measurement.SOPInstanceUID in referenced
    assert sources[0].SOPInstanceUID in referenced
    assert dciodvfy_errors(path) == []


def test_the_fusion_srs_uid_follows_its_content() -> None:
    from radfusion.operators.results_writer import _fusion_digest

    result = _result(ContextOutcome("available", context()))
    assert _fusion_digest(result) == _fusion_digest(_result(ContextOutcome("available", context())))
    others = [
        dataclasses.replace(result, served_by="lung_fusion/1 on Triton 2.51.0"),
        dataclasses.replace(result, progression_probability=result.progression_probability + 1e-4),
        _result(ContextOutcome("available", context(genes={}))),
    ]
    assert len({_fusion_digest(r) for r in others} | {_fusion_digest(result)}) == 4
