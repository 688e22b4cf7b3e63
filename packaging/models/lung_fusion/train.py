"""Train and evaluate the lung fusion model on synthetic cohorts; write model.ts and metrics.

A demonstration, not for clinical use: every patient comes from ``radfusion synth cohort``
(synthetic CT, FHIR record and outcome; the rules are in ``radfusion/synth/cohort.py``).

    radfusion synth cohort --out /tmp/fusion_train --patients 600 --seed 101
    radfusion synth cohort --out /tmp/fusion_test --patients 300 --seed 202
    python packaging/models/lung_fusion/app_radiomics.py --cohort /tmp/fusion_train \\
        --out /tmp/fusion_train_app
    python packaging/models/lung_fusion/app_radiomics.py --cohort /tmp/fusion_test \\
        --out /tmp/fusion_test_app
    python packaging/models/lung_fusion/train.py --train /tmp/fusion_train \\
        --test /tmp/fusion_test --train-app-results /tmp/fusion_train_app \\
        --test-app-results /tmp/fusion_test_app --out packaging/models/lung_fusion

(the shipped model; without the two ``--*-app-results`` options, the true-mask experiment).

Imaging inputs are the radiomics of the phantoms' true tumour masks or what the lung-ct app
found (``--train-app-results DIR`` / ``--test-app-results DIR`` holding
``<PatientID>/radiomics.json``, written by ``app_radiomics.py``): the shipped model is trained
and evaluated on the app's own output, what it sees at run time.

Printed, with bootstrap 95 % intervals on the test cohort: AUC of progression within 12 months
and C-index of progression-free time for fusion, clinical-only (logistic regression),
imaging-only and the generator's true probability (the ceiling); EGFR AUC on patients not
tested for EGFR, fusion vs clinical-only; calibration (ECE, slope); subgroups by sex, by
genomic availability and by testing scenario; explanations (mean contribution per modality,
top features); sanity checks. The l2 penalty is chosen by cross-validation on the training
cohort; the test cohort is never used to choose anything.
The last line: ``fusion auc fusion/clinical/imaging/oracle: a/b/c/d``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from radfusion.fusion.dataset import FusionTable, load_table, read_cohort, save_table
from radfusion.fusion.metrics import (
    auc,
    bootstrap,
    c_index,
    calibration_slope,
    expected_calibration_error,
)
from radfusion.fusion.model import (
    OUTPUTS,
    FusionEnsemble,
    TrainSettings,
    fit_logistic,
    pack,
    train_ensemble,
)
from radfusion.operators.fusion_features import CLINICAL, FEATURES, GENOMIC, IMAGING

HERE = Path(__file__).resolve().parent
CLINICAL_COLUMNS = tuple(FEATURES.index(f) for f in CLINICAL)


def _table(cohort: Path, cache: Path, **kw: Any) -> FusionTable:
    if cache.is_file():
        return load_table(cache)
    started = time.perf_counter()
    table = read_cohort(cohort, **kw)
    save_table(table, cache)
    print(f"{cohort}: {len(table)} patients in {time.perf_counter() - started:.0f} s")
    return table


def _predict(
    model: FusionEnsemble, table: FusionTable, present: np.ndarray | None = None
) -> np.ndarray:
    with torch.no_grad():
        return model(pack(table.x, table.present if present is None else present)).numpy()


L2_GRID = (0.003, 0.01, 0.03, 0.1)


def select_l2(train: FusionTable, folds: int = 5) -> float:
    """The weight penalty with the best cross-validated AUC on the training cohort (the test
    cohort is never looked at)."""
    which = np.random.default_rng(7).permutation(len(train)) % folds
    best, best_auc = L2_GRID[0], -1.0
    for l2 in L2_GRID:
        predicted = np.zeros(len(train))
        for k in range(folds):
            fit, held = np.flatnonzero(which != k), np.flatnonzero(which == k)
            model = train_ensemble(
                train.subset(fit), members=3, seed=k, settings=TrainSettings(l2=l2)
            )
            predicted[held] = _predict(model, train.subset(held))[:, 0]
        score = auc(train.label, predicted)
        print(f"  cross-validated AUC with l2 {l2:g}: {score:.4f}")
        if score > best_auc:
            best, best_auc = l2, score
    return best


def _ci(stat: Callable[[np.ndarray], float], n: int) -> dict[str, float]:
    point, low, high = bootstrap(stat, n, rounds=1000)
    return {"value": round(point, 3), "low": round(low, 3), "high": round(high, 3)}


def _fmt(d: dict[str, float]) -> str:
    return f"{d['value']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def evaluate(
    fusion: FusionEnsemble, imaging: FusionEnsemble, test: FusionTable, train: FusionTable
) -> dict[str, Any]:
    """Every figure of the module docstring, as a dict (also printed)."""
    clinical = fit_logistic(train.x, train.label, CLINICAL_COLUMNS)
    tested = train.egfr_tested
    clinical_egfr = fit_logistic(
        train.x[tested], train.x[tested, FEATURES.index("EGFR_mutated")] > 0.5, CLINICAL_COLUMNS
    )
    out = _predict(fusion, test)
    scores = {
        "fusion": out[:, 0],
        "clinical": clinical.probability(test.x),
        "imaging": _predict(imaging, test)[:, 0],
        "oracle": test.true_probability,
    }
    risks = {
        "fusion": out[:, 2],
        "clinical": scores["clinical"],
        "imaging": _predict(imaging, test)[:, 2],
        "oracle": test.true_probability,
    }
    n = len(test)
    result: dict[str, Any] = {"patients": n, "progression_rate": round(float(test.label.mean()), 3)}
    result["auc"] = {k: _ci(lambda i, s=s: auc(test.label[i], s[i]), n) for k, s in scores.items()}
    result["c_index"] = {
        k: _ci(lambda i, r=r: c_index(test.days[i], test.event[i], r[i]), n)
        for k, r in risks.items()
    }
    untested = ~test.egfr_tested
    m = int(untested.sum())
    egfr_fusion, egfr_clinical = out[untested, 4], clinical_egfr.probability(test.x[untested])
    truth = test.egfr_true[untested]
    result["egfr_untested"] = {
        "patients": m,
        "mutated": int(truth.sum()),
        "fusion": _ci(lambda i: auc(truth[i], egfr_fusion[i]), m),
        "clinical": _ci(lambda i: auc(truth[i], egfr_clinical[i]), m),
    }
    result["calibration"] = {
        "ece": round(expected_calibration_error(test.label, out[:, 0]), 3),
        "slope": round(calibration_slope(test.label, out[:, 0]), 3),
        "reliability": _reliability(test.label, out[:, 0]),
    }
    groups = {
        "female": ~test.male,
        "male": test.male,
        "genomics present": test.present[:, 2],
        "genomics missing": ~test.present[:, 2],
        **{f"scenario {s}": test.scenario == s for s in sorted(set(test.scenario.tolist()))},
    }
    result["subgroups"] = {
        name: {"patients": int(rows.sum()), "auc": round(auc(test.label[rows], out[rows, 0]), 3)}
        for name, rows in groups.items()
    }
    # Sanity: genomics shuffled between patients should cost AUC; genomics removed should
    # widen the uncertainty.
    rng = np.random.default_rng(0)
    shuffled = FusionTable(**{**test.__dict__, "x": test.x.copy(), "present": test.present.copy()})
    start = len(IMAGING) + len(CLINICAL)
    perm = rng.permutation(n)
    shuffled.x[:, start : start + len(GENOMIC)] = test.x[perm, start : start + len(GENOMIC)]
    shuffled.present[:, 2] = test.present[perm, 2]
    without = test.present.copy()
    without[:, 2] = False
    spread_without = _predict(fusion, test, without)[:, 1]
    blank = test.present.copy()
    blank[:, 0] = False
    imaging_column = OUTPUTS.index("contribution_imaging")
    contributions = {
        name: round(float(np.abs(out[:, OUTPUTS.index(f"contribution_{name}")]).mean()), 3)
        for name in ("imaging", "clinical", "genomic")
    }
    features = np.abs(out[:, OUTPUTS.index(f"contribution_{FEATURES[0]}") :]).mean(0)
    result["explanations"] = {
        "mean_abs_logit_contribution": contributions,
        "top_features": [
            [FEATURES[i], round(float(features[i]), 3)] for i in np.argsort(-features)[:8]
        ],
    }
    result["sanity"] = {
        "mean_abs_imaging_contribution_tumour_blanked": round(
            float(np.abs(_predict(fusion, test, blank)[:, imaging_column]).mean()), 3
        ),
        "auc_genomics_shuffled": round(auc(test.label, _predict(fusion, shuffled)[:, 0]), 3),
        "mean_spread_with_genomics": round(float(out[test.present[:, 2], 1].mean()), 4),
        "mean_spread_genomics_removed": round(float(spread_without[test.present[:, 2]].mean()), 4),
    }
    return result


def _reliability(label: np.ndarray, probability: np.ndarray, bins: int = 10) -> list[list[float]]:
    which = np.minimum((probability * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append(
                [
                    round(float(probability[inside].mean()), 3),
                    round(float(label[inside].mean()), 3),
                    int(inside.sum()),
                ]
            )
    return rows


def report(result: dict[str, Any]) -> None:
    print(f"test patients: {result['patients']} (progression rate {result['progression_rate']})")
    for name in ("auc", "c_index"):
        for model, d in result[name].items():
            print(f"  {name:8s} {model:9s} {_fmt(d)}")
    e = result["egfr_untested"]
    print(
        f"  EGFR AUC, {e['patients']} untested ({e['mutated']} mutated): fusion {_fmt(e['fusion'])}"
        f", clinical-only {_fmt(e['clinical'])}"
    )
    c = result["calibration"]
    print(f"  calibration: ECE {c['ece']}, slope {c['slope']}")
    for name, g in result["subgroups"].items():
        print(f"  subgroup {name:17s} n={g['patients']:4d} AUC {g['auc']}")
    x = result["explanations"]
    print(f"  mean |contribution| to the logit by modality: {x['mean_abs_logit_contribution']}")
    print(f"  top features: {x['top_features']}")
    s = result["sanity"]
    print(
        f"  sanity: AUC with genomics shuffled {s['auc_genomics_shuffled']}; spread "
        f"{s['mean_spread_with_genomics']} with genomics, "
        f"{s['mean_spread_genomics_removed']} without"
    )
    a = result["auc"]
    print(
        "fusion auc fusion/clinical/imaging/oracle: "
        + "/".join(f"{a[k]['value']:.3f}" for k in ("fusion", "clinical", "imaging", "oracle"))
    )


VERSION = "0.3.0"


def model_yaml() -> str:
    """The model.yaml the app reads (radfusion.model_config.FusionModelConfig)."""
    header = (
        "# The reference lung fusion model: a DEMONSTRATION, NOT FOR CLINICAL USE.\n"
        "# Trained on synthetic patients only (train.py beside this file); see MODEL_CARD.md.\n"
    )
    body = {
        "name": "radfusion-lung-fusion",
        "version": VERSION,
        "model": "model.ts",
        "demonstration": True,
        # Progression probability: low below the first, high from the second.
        "risk_groups": [0.3, 0.6],
        "features": list(FEATURES),
        "outputs": list(OUTPUTS),
    }
    return header + yaml.safe_dump(body, sort_keys=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="training cohort folder")
    parser.add_argument("--test", type=Path, required=True, help="held-out cohort folder")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/radfusion-fusion-cache"))
    parser.add_argument("--test-app-results", type=Path, help="<PatientID>/radiomics.json")
    parser.add_argument(
        "--train-app-results",
        type=Path,
        help="train on what the app found too (app_radiomics.py over the training cohort)",
    )
    parser.add_argument("--members", type=int, default=5)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.train_app_results:
        train = _table(
            args.train,
            args.cache / "train_app.npz",
            imaging="app",
            app_results=args.train_app_results,
        )
    else:
        train = _table(args.train, args.cache / "train.npz")
    if args.test_app_results:
        test = _table(
            args.test, args.cache / "test_app.npz", imaging="app", app_results=args.test_app_results
        )
    else:
        test = _table(args.test, args.cache / "test.npz")
    started = time.perf_counter()
    l2 = select_l2(train)
    fusion = train_ensemble(train, members=args.members, seed=1, settings=TrainSettings(l2=l2))
    imaging = train_ensemble(
        train,
        members=args.members,
        seed=2,
        settings=TrainSettings(l2=l2, modalities=(True, False, False)),
    )
    print(f"trained {2 * args.members} members in {time.perf_counter() - started:.0f} s")
    result = evaluate(fusion, imaging, test, train)
    result["imaging_source"] = {
        "train": "app" if args.train_app_results else "truth masks",
        "test": "app" if args.test_app_results else "truth masks",
    }
    result["training_patients"] = len(train)
    result["l2"] = l2
    report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    example = torch.cat([torch.zeros(2, len(FEATURES)), torch.ones(2, 3)], dim=1)
    torch.jit.trace(fusion, example).save(str(args.out / "model.ts"))
    (args.out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "model.yaml").write_text(model_yaml())
    print(f"wrote {args.out / 'model.ts'}, model.yaml and metrics.json")
    if not math.isfinite(result["auc"]["fusion"]["value"]):
        raise SystemExit("the test cohort has one outcome class only")


if __name__ == "__main__":
    main()
