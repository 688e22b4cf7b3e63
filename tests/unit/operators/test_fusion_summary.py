"""The fusion summary image: a valid Secondary Capture (dciodvfy) in its own series, in the
study, whose text is the fusion result's values, the record's EGFR test when there is one,
what is missing and why, and no patient identifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from radfusion.operators.fusion_summary import SERIES_NUMBER, summary_lines, write_fusion_summary
from radfusion.patient_context import ContextOutcome, GeneResult, Source
from tests.unit.operators.test_fusion_features import context
from tests.unit.operators.test_fusion_sr import UIDS, _result, sources  # noqa: F401
from tests.unit.operators.test_sr_writer import dciodvfy_errors


def test_the_summary_is_a_valid_image_of_the_results_values(
    sources: list[Dataset],  # noqa: F811
    tmp_path: Path,
) -> None:
    result = _result(ContextOutcome("available", context(genes={})))
    path = write_fusion_summary(sources, result, path=tmp_path / "s.dcm", **UIDS)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.SeriesNumber == SERIES_NUMBER
    assert "not for clinical use" in ds.SeriesDescription
    assert ds.BurnedInAnnotation == "NO"
    pixels = ds.pixel_array
    assert pixels.shape[-1] == 3 and np.count_nonzero(pixels) > 1000  # text drawn
    lines = summary_lines(result)
    text = "\n".join(lines)
    assert f"{100 * result.progression_probability:.0f} % " in text
    assert f"{result.risk_group} risk" in text
    assert result.egfr.probability is not None
    assert f"EGFR mutation (not tested): {100 * result.egfr.probability:.0f} %" in text
    for identifier in (sources[0].PatientName, sources[0].PatientID, sources[0].PatientBirthDate):
        assert str(identifier) not in text


def test_a_tested_egfr_and_missing_genomics_are_said(
    sources: list[Dataset],  # noqa: F811
) -> None:
    src = (Source("Observation/egfr", "2"),)
    tested = context(genes={"EGFR": GeneResult("EGFR", "absent", sources=src)})
    text = "\n".join(summary_lines(_result(ContextOutcome("available", tested))))
    assert "EGFR: absent (tested; from the patient record, not the model)" in text
    assert "EGFR mutation" not in text
    alone = _result(None)  # no patient context: the image alone
    lines = summary_lines(alone)
    assert "Inputs used: imaging" in lines
    assert any(line.startswith("Missing: clinical: ") for line in lines)
