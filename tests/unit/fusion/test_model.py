"""The fusion model on a small numeric table: it learns what carries signal, uses the
modalities it is given, widens its uncertainty when one is missing, explains itself exactly,
and traces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radfusion.fusion.dataset import FusionTable
from radfusion.fusion.metrics import auc
from radfusion.fusion.model import (
    OUTPUTS,
    TrainSettings,
    fit_logistic,
    pack,
    train_ensemble,
    train_site,
)
from radfusion.operators.fusion_features import CLINICAL, FEATURES, IMAGING

N = 400
FAST = TrainSettings(epochs=150)
IMAGING_CONTRIBUTION = OUTPUTS.index("contribution_imaging")


def table(seed: int) -> FusionTable:
    """Progression driven by an imaging feature and a gene; EGFR by an imaging feature."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, len(FEATURES))).astype(np.float32)
    genomic = len(IMAGING) + len(CLINICAL)
    x[:, genomic:] = 0.0
    egfr = rng.random(N) < 1 / (
        1 + np.exp(-2.5 * x[:, FEATURES.index("primary_ground_glass_fraction")])
    )
    tested = rng.random(N) < 0.6
    tp53 = rng.random(N) < 0.4
    x[:, FEATURES.index("EGFR_mutated")] = egfr & tested
    x[:, FEATURES.index("EGFR_tested")] = tested
    x[:, FEATURES.index("TP53_mutated")] = tp53 & tested
    x[:, FEATURES.index("TP53_tested")] = tested
    logit = 1.5 * x[:, FEATURES.index("primary_sphericity")] + 1.5 * tp53 - 0.5
    p = 1 / (1 + np.exp(-logit))
    label = rng.random(N) < p
    present = np.ones((N, 3), bool)
    present[~tested, 2] = False
    days = np.where(label, rng.uniform(10, 365, N), rng.uniform(366, 900, N)).astype(np.float32)
    return FusionTable(
        patient_ids=np.array([f"P{i}" for i in range(N)]),
        x=x,
        present=present,
        label=label,
        days=days,
        event=np.ones(N, bool),
        true_probability=p.astype(np.float32),
        egfr_true=egfr,
        egfr_tested=tested,
        male=rng.random(N) < 0.5,
        scenario=rng.integers(0, 4, N),
    )


@pytest.fixture(scope="module")
def trained() -> tuple[object, FusionTable]:
    return train_ensemble(table(0), members=3, seed=0, settings=FAST), table(1)


def _run(model: object, t: FusionTable, present: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        return model(pack(t.x, t.present if present is None else present)).numpy()  # type: ignore[operator]


def test_it_learns_outcome_risk_and_egfr(trained: tuple[object, FusionTable]) -> None:
    model, test = trained
    out = _run(model, test)
    assert auc(test.label, out[:, 0]) > 0.7
    assert auc(test.label, out[:, 2]) > 0.7  # the risk score orders the same way
    untested = ~test.egfr_tested
    assert auc(test.egfr_true[untested], out[untested, 4]) > 0.7  # from the image alone
    assert np.all((out[:, [0, 4]] >= 0) & (out[:, [0, 4]] <= 1))


def test_shuffled_genomics_lower_the_auc(trained: tuple[object, FusionTable]) -> None:
    model, test = trained
    genomic = len(IMAGING) + len(CLINICAL)
    shuffled = test.x.copy()
    shuffled[:, genomic:] = test.x[np.random.default_rng(2).permutation(N), genomic:]
    bad = FusionTable(**{**test.__dict__, "x": shuffled})
    assert auc(test.label, _run(model, bad)[:, 0]) < auc(test.label, _run(model, test)[:, 0]) - 0.03


def test_missing_genomics_widen_the_uncertainty(trained: tuple[object, FusionTable]) -> None:
    model, test = trained
    rows = test.present[:, 2]
    without = test.present.copy()
    without[:, 2] = False
    assert _run(model, test, without)[rows, 1].mean() > _run(model, test)[rows, 1].mean()


def test_blanking_the_tumour_changes_the_imaging_contribution(
    trained: tuple[object, FusionTable],
) -> None:
    model, test = trained
    blank = test.present.copy()
    blank[:, 0] = False
    before, after = _run(model, test), _run(model, test, blank)
    assert np.abs(after[:, 0] - before[:, 0]).mean() > 0.05
    # Without an image every patient gets the same imaging term (the absence's effect).
    assert np.std(before[:, IMAGING_CONTRIBUTION]) > 0.3
    assert np.std(after[:, IMAGING_CONTRIBUTION]) < 1e-5


def test_the_contributions_add_up_to_the_logit(trained: tuple[object, FusionTable]) -> None:
    model, test = trained
    out = _run(model, test)
    logit = np.log(out[:, 0] / (1 - out[:, 0]))
    modalities = out[:, OUTPUTS.index("contribution_imaging") : IMAGING_CONTRIBUTION + 3]
    np.testing.assert_allclose(out[:, 6] + modalities.sum(1), logit, atol=1e-4)
    features = out[:, OUTPUTS.index(f"contribution_{FEATURES[0]}") :]
    top = np.argsort(-np.abs(features).mean(0))[:2]
    assert {FEATURES[i] for i in top} == {"primary_sphericity", "TP53_mutated"}


def test_the_egfr_head_never_sees_the_egfr_result(trained: tuple[object, FusionTable]) -> None:
    model, test = trained
    flipped = test.x.copy()
    flipped[:, FEATURES.index("EGFR_mutated")] = 1 - flipped[:, FEATURES.index("EGFR_mutated")]
    changed = FusionTable(**{**test.__dict__, "x": flipped})
    np.testing.assert_allclose(_run(model, changed)[:, 4], _run(model, test)[:, 4], atol=1e-6)


def test_the_ensemble_traces_to_torchscript(trained: tuple[object, FusionTable], tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, test = trained
    example = pack(np.zeros((2, len(FEATURES))), np.ones((2, 3)))
    torch.jit.trace(model, example).save(str(tmp_path / "m.ts"))
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    np.testing.assert_allclose(_run(loaded, test), _run(model, test), atol=1e-5)


def test_a_site_can_continue_from_a_global_state() -> None:
    site = table(3)
    first = train_site(site, 0, FAST)
    again = train_site(site, 1, TrainSettings(epochs=0), state=first.state_dict())
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_clinical_baseline_fits_a_logistic_regression() -> None:
    t = table(4)
    column = FEATURES.index("age_decades_from_67")
    y = t.x[:, column] + np.random.default_rng(0).normal(size=N) * 0.5 > 0
    model = fit_logistic(t.x, y, (column,))
    assert model.weights[1] > 1 and auc(y, model.probability(t.x)) > 0.9
