"""One site's fusion training data: a ``radfusion synth cohort`` folder → a table of fusion
inputs (:mod:`radfusion.operators.fusion_features`) and outcomes.

Imaging: the radiomics of each tumour, either of the phantom's true tumour masks
(``imaging="truth"``) or of what the lung-ct app found and wrote to ``radiomics.json``
(``imaging="app"``: the real pipeline, segmentation → detection → radiomics). Clinical and
genomic: the context a correct FHIR client derives as of the study date (the cohort's ground
truth; ``tests/integration/test_patient_context_fhir.py`` checks that the real client derives
exactly that). Outcomes and the generator's truth (probability, true EGFR status) come from
the ground truth; the truth is kept for evaluation only and never enters the inputs.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from radfusion.operators.fusion_features import FEATURES, fusion_inputs
from radfusion.operators.radiomics import RadiomicsError, RadiomicsSettings, tumour_features
from radfusion.patient_context import Coded, Fact, GeneResult, PatientContext, Source

__all__ = ["FusionTable", "context_from_truth", "load_table", "read_cohort", "save_table"]

_STATUS = {"positive": "present", "wild-type": "absent", "untested": "not-tested"}


@dataclass(frozen=True, eq=False)
class FusionTable:
    """Fusion inputs and outcomes of N patients (arrays of length N, ``x`` N × features)."""

    patient_ids: np.ndarray  # str
    x: np.ndarray  # float32 [N, len(FEATURES)]
    present: np.ndarray  # bool [N, 3]: imaging, clinical, genomic
    label: np.ndarray  # bool: progression within 12 months
    days: np.ndarray  # observed progression-free days
    event: np.ndarray  # bool: progression seen before follow-up ended
    true_probability: np.ndarray  # the generator's probability: the ceiling
    egfr_true: np.ndarray  # bool: the tumour's true EGFR status (tested or not)
    egfr_tested: np.ndarray  # bool: EGFR tested as of the study date
    male: np.ndarray  # bool
    scenario: np.ndarray  # int: the cohort's testing scenario

    def __len__(self) -> int:
        return len(self.patient_ids)

    def subset(self, index: np.ndarray) -> FusionTable:
        return FusionTable(**{k: v[index] for k, v in self.__dict__.items()})


def context_from_truth(context: Mapping[str, Any]) -> PatientContext:
    """The :class:`PatientContext` that the ground truth's ``context`` describes."""
    src = (Source("ground-truth"),)

    def fact(value: Any) -> Fact[Any]:
        return Fact(value, src) if value is not None else Fact.unknown("not in the record")

    smoking = context.get("smoking_status") or {}
    stage = context.get("stage") or {}
    genomics = context.get("genomics") or {}
    genes = {
        gene: GeneResult(gene, _STATUS.get(str(result.get("status")), "not-tested"))
        for gene, result in (genomics.get("genes") or {}).items()
    }
    markers = {
        str(m["name"]): Fact(float(m["value"]), src)
        for m in context.get("tumour_markers") or []
        if m.get("value") is not None
    }
    tmb = genomics.get("tmb") or {}
    system, _, code = str(smoking.get("code") or "|").partition("|")
    return PatientContext(
        patient=Source("Patient/ground-truth"),
        study_date=dt.date.fromisoformat(str(context["as_of"])),
        age_years=fact(context.get("age_at_study_years")),
        sex=fact(context.get("sex")),
        genes=genes,
        tmb=fact(tmb.get("value")),
        msi=Fact.unknown("not used"),
        cancer=Fact.unknown("not used"),
        stage_group=fact(
            Coded("http://cancerstaging.org", str(stage["group"]), str(stage["group"]))
            if stage.get("group")
            else None
        ),
        ecog=fact((context.get("ecog") or {}).get("value")),
        karnofsky=Fact.unknown("not used"),
        smoking=fact(Coded(system, code, str(smoking.get("category", ""))) if code else None),
        tumour_markers=markers,
    )


def _truth_tumours(ct: Path, settings: RadiomicsSettings) -> list[dict[str, float]]:
    """Radiomics of the phantom's true tumours (labels.npz and the CT series beside it)."""
    from radfusion.operators.volume import assemble_volume, read_series
    from radfusion.synth.ct import TUMOUR_LABEL_BASE

    volume = assemble_volume(read_series(sorted(ct.glob("*.dcm"))))
    labels = np.load(ct / "labels.npz")["labels"]
    tumours = []
    for value in np.unique(labels[labels >= TUMOUR_LABEL_BASE]):
        try:
            tumours.append(tumour_features(volume.hu, volume.spacing_mm, labels == value, settings))
        except RadiomicsError:
            continue  # a tumour too small to measure counts as not seen
    return tumours


def _app_tumours(results: Path) -> list[dict[str, float]]:
    """Radiomics the lung-ct app wrote (``radiomics.json``); none when it wrote none."""
    record = results / "radiomics.json"
    if not record.is_file():
        return []
    data = json.loads(record.read_text())
    return [
        {k: (float(v) if v is not None else float("nan")) for k, v in t["values"].items()}
        for t in data["tumours"]
        if not t.get("error")
    ]


def read_cohort(
    cohort: Path,
    *,
    imaging: Literal["truth", "app"] = "truth",
    app_results: Path | None = None,
    settings: RadiomicsSettings | None = None,
    patients: Iterable[str] | None = None,
) -> FusionTable:
    """The table of a cohort folder (``cohort.json`` and one folder per patient).

    ``imaging="app"`` reads ``app_results/<PatientID>/radiomics.json`` (the app's output per
    patient). ``patients`` limits it to those PatientIDs.

    Raises:
        ValueError: not a cohort folder, or ``imaging="app"`` without ``app_results``.
    """
    index = json.loads((cohort / "cohort.json").read_text())
    if "patients" not in index:
        raise ValueError(f"{cohort}: cohort.json lists no patients")
    if imaging == "app" and app_results is None:
        raise ValueError("imaging='app' needs app_results")
    wanted = set(patients) if patients is not None else None
    settings = settings or RadiomicsSettings()
    rows: dict[str, list[Any]] = {k: [] for k in FusionTable.__dataclass_fields__}
    for row in index["patients"]:
        pid = str(row["patient_id"])
        if wanted is not None and pid not in wanted:
            continue
        folder = cohort / str(row["directory"])
        truth = json.loads((folder / "ground_truth.json").read_text())
        if imaging == "truth":
            tumours = _truth_tumours(folder / "ct", settings)
        else:
            assert app_results is not None
            tumours = _app_tumours(app_results / pid)
        inputs = fusion_inputs(tumours, context_from_truth(truth["context"]))
        outcome = truth["outcome"]
        tte = outcome["time_to_event"]
        egfr = truth["context"]["genomics"]["genes"].get("EGFR", {}).get("status", "untested")
        rows["patient_ids"].append(pid)
        rows["x"].append(inputs.values)
        rows["present"].append(inputs.present)
        rows["label"].append(bool(outcome["label"]))
        rows["days"].append(float(tte["days"]))
        rows["event"].append(bool(tte["event"]))
        rows["true_probability"].append(float(outcome["probability"]))
        rows["egfr_true"].append(truth["truth"]["genotype"]["EGFR"]["status"] == "positive")
        rows["egfr_tested"].append(egfr in ("positive", "wild-type"))
        rows["male"].append(truth["context"]["sex"] == "male")
        rows["scenario"].append(int(truth["scenario"]["number"]))
    return FusionTable(
        patient_ids=np.asarray(rows["patient_ids"], dtype=str),
        x=np.asarray(rows["x"], dtype=np.float32).reshape(-1, len(FEATURES)),
        present=np.asarray(rows["present"], dtype=bool).reshape(-1, 3),
        label=np.asarray(rows["label"], dtype=bool),
        days=np.asarray(rows["days"], dtype=np.float32),
        event=np.asarray(rows["event"], dtype=bool),
        true_probability=np.asarray(rows["true_probability"], dtype=np.float32),
        egfr_true=np.asarray(rows["egfr_true"], dtype=bool),
        egfr_tested=np.asarray(rows["egfr_tested"], dtype=bool),
        male=np.asarray(rows["male"], dtype=bool),
        scenario=np.asarray(rows["scenario"], dtype=np.int64),
    )


def save_table(table: FusionTable, path: Path) -> None:
    """The table as ``.npz`` (with the feature names)."""
    np.savez_compressed(path, features=np.asarray(FEATURES), **table.__dict__)


def load_table(path: Path) -> FusionTable:
    """A table written by :func:`save_table`.

    Raises:
        ValueError: its features are not :data:`FEATURES`.
    """
    with np.load(path) as data:
        if tuple(str(f) for f in data["features"]) != FEATURES:
            raise ValueError(f"{path}: written for other fusion features")
        return FusionTable(**{k: data[k] for k in FusionTable.__dataclass_fields__})
