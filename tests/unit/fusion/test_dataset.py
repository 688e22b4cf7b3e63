"""A cohort folder → fusion table: inputs from the record and the image, outcomes and truth
kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from radfusion.fusion.dataset import load_table, read_cohort, save_table
from radfusion.operators.fusion_features import FEATURES, IMAGING
from radfusion.synth.cohort import synth_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    synth_cohort(root, patients=4, seed=11, slices=32, size=64)
    return root


def test_table_from_truth_masks(cohort: Path, tmp_path: Path) -> None:
    table = read_cohort(cohort)
    assert len(table) == 4 and table.x.shape == (4, len(FEATURES))
    for i, pid in enumerate(table.patient_ids):
        truth = json.loads((cohort / pid / "ground_truth.json").read_text())
        assert table.label[i] == truth["outcome"]["label"]
        assert table.days[i] == truth["outcome"]["time_to_event"]["days"]
        assert table.true_probability[i] == pytest.approx(truth["outcome"]["probability"])
        count = truth["imaging"]["tumour_count"]
        assert table.present[i, 0]
        assert 1 <= table.x[i, IMAGING.index("tumour_count")] <= count
        # Scenario 3 has no genomic test before the study date: genomics are missing.
        assert table.present[i, 2] == (truth["scenario"]["number"] != 3)
    save_table(table, tmp_path / "t.npz")
    again = load_table(tmp_path / "t.npz")
    np.testing.assert_array_equal(again.x, table.x)
    assert list(again.patient_ids) == list(table.patient_ids)


def test_table_from_the_apps_results(cohort: Path, tmp_path: Path) -> None:
    """A patient the app found nothing in has no imaging; one with radiomics has them."""
    first, second = sorted(p.name for p in cohort.iterdir() if p.is_dir())[:2]
    (tmp_path / first).mkdir()
    (tmp_path / first / "radiomics.json").write_text(
        json.dumps({"tumours": [{"values": {"volume": 900.0}, "error": "mirp failed"}]})
    )
    table = read_cohort(cohort, imaging="app", app_results=tmp_path, patients=[first, second])
    assert not table.present[:, 0].any()
    with pytest.raises(ValueError, match="app_results"):
        read_cohort(cohort, imaging="app")
