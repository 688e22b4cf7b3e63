"""`radfusion eval lung-ct` with the real app on the real LIDC case (about 20-40 s).

The report must be well formed, and the goals set for the real case must hold: every
reference nodule (>= 10 mm, >= 2 readers) found, at most 2 false positives, plausible lungs.
Nothing was fitted or tuned on this case (see packaging/models/lung_nodule_fp/MODEL_CARD.md);
these assertions guard against regressions, they are not evidence of performance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from radfusion.cli import main
from tests.unit.evaluation.support import LIDC_DICOM, LIDC_XML, require_lidc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    require_lidc()
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "lung-ct",
            "--input",
            str(LIDC_DICOM),
            "--reference",
            str(LIDC_XML.parent),
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    return result.output, json.loads(Path(out).read_text())


def test_report_is_well_formed(evaluated: tuple[str, dict]) -> None:
    text, data = evaluated
    [case] = data["cases"]
    assert case["error"] is None and case["case"] == "069.xml"
    assert case["reference_nodules"] == 1
    assert case["kernel"] == "soft" and case["slice_thickness_mm"] == 2.5
    assert 0 <= case["found"] <= 1
    assert case["false_positives"] + case["found"] + case["ignored"] == case["detections"]
    assert data["overall"]["cases"] == 1 and set(data["by_kernel"]) == {"soft"}
    assert "069.xml [lidc-xml]" in text and "overall:" in text
    assert "LIDC-IDRI" not in text  # cases are named by file and UID hash, not by patient


def test_lung_volumes_are_reported(evaluated: tuple[str, dict]) -> None:
    text, data = evaluated
    lungs = data["cases"][0]["lungs"]
    for side in ("right_l", "left_l"):
        assert lungs[side] is not None and 0.5 < lungs[side] < 5.0
    assert lungs["right_left_ratio"] == pytest.approx(lungs["right_l"] / lungs["left_l"])
    assert "lungs: right " in text


def test_the_goals_for_the_real_case_hold(evaluated: tuple[str, dict]) -> None:
    _, data = evaluated
    [case] = data["cases"]
    assert case["found"] == case["reference_nodules"] == 1
    assert case["false_positives"] <= 2
    lungs = case["lungs"]
    assert 0.8 <= lungs["right_l"] <= 4.5 and 0.8 <= lungs["left_l"] <= 4.5
    assert 0.7 <= lungs["right_left_ratio"] <= 1.6
    [nodule] = case["nodules"]
    assert nodule["detection"] is not None and nodule["dice"] >= 0.6
