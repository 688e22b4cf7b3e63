"""lung-ct on series shaped like other scanners': vendors' headers, thick slices, sharp kernels.

Realistic phantoms (vessels, airways, heart, ribs; partial volume; kernel noise) written with
each vendor's header style (transfer syntax, rescale, padding, kernel names) go through the
whole app. What must hold on every one: analysed (not refused), plausible lungs on the
patient's correct sides, the SR says which series was analysed and, for thick slices, what
they cannot resolve; a large tumour is found and segmented as one.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pydicom
import pytest

from radfusion.apps.lung_ct.app import run_folder
from radfusion.config import parse_config
from radfusion.evaluation import seg_label_volume
from radfusion.synth.ct import LABELS
from radfusion.synth.ct_series import synth_ct
from tests.conftest import sr_texts

CONFIG = parse_config({})

CASES = {
    # vendor, slice thickness (mm), slices, kernel
    "siemens-8mm-sharp": ("siemens", 8.0, 36, "sharp"),
    "philips-5mm-soft": ("philips", 5.0, 60, "soft"),
    "ge-2.5mm-soft": ("ge", 2.5, 120, "soft"),
    "canon-1mm-sharp": ("canon", 1.0, 300, "sharp"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def analysed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    vendor, thickness, slices, kernel = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    study = synth_ct(
        root / "in",
        seed=7100,
        style="realistic",
        vendor=vendor,
        kernel=kernel,
        rows=256,
        columns=256,
        pixel_spacing=1.4,
        slice_thickness=thickness,
        slices=slices,
        tumours=1,
        tumour_types=["mass"],
    )
    written = run_folder(root / "in", root / "out", CONFIG)
    return request.param, study, written


def test_the_series_is_analysed_with_plausible_lungs_on_the_right_sides(analysed: Any) -> None:
    name, study, written = analysed
    # A fusion SR and its image only when a tumour was found (no FHIR here: the image is the
    # only input).
    assert [p.name for p in written][:2] == ["seg.dcm", "sr.dcm"], name
    assert [p.name for p in written][2:] in ([], ["fusion_sr.dcm", "fusion_summary.dcm"]), name
    labels, names = seg_label_volume(written[0], study.files)
    truth = np.load(study.ground_truth)["labels"]
    meta = json.loads(study.truth_json.read_text())
    voxel_l = np.prod([meta["spacing_mm"][k] for k in ("row", "column", "slice")]) / 1e6
    for side in ("right", "left"):
        number = next(n for n, label in names.items() if label == f"{side.capitalize()} lung")
        ours = labels == number
        reference = truth == LABELS[f"{side}_lung"]
        dice = 2 * (ours & reference).sum() / (ours.sum() + reference.sum())
        assert dice >= 0.9, (name, side, dice)
        assert 0.5 <= ours.sum() * voxel_l <= 6.0, (name, side)


def test_the_sr_says_which_series_and_what_the_slices_cannot_resolve(analysed: Any) -> None:
    name, _, written = analysed
    text = "\n".join(sr_texts(pydicom.dcmread(written[1])))
    assert "Series analysed: series" in text, name
    thickness = CASES[name][1]
    if 2 * thickness > 4.0:
        assert f"twice the {thickness:g} mm slice thickness" in text, name


# A known gap, kept visible: this phantom's 28 mm mass sits at the left hilum, against the
# mediastinum. On the 5 mm series the grown region leaks into the mediastinum (same density),
# loses its round shape, and the false-positive stage scores it out. (Found on the 1 mm sharp
# series since segmentation model 0.2.0 and the stage refitted on it.)
MISSED_HILAR_MASS = {"philips-5mm-soft"}


def test_a_large_tumour_is_found_as_one_segment(
    analysed: Any, request: pytest.FixtureRequest
) -> None:
    name, study, written = analysed
    if name in MISSED_HILAR_MASS:
        request.applymarker(
            pytest.mark.xfail(reason="hilar mass against the mediastinum: known gap", strict=True)
        )
    labels, names = seg_label_volume(written[0], study.files)
    truth = np.load(study.ground_truth)["labels"]
    tumour = truth >= 10
    hits = {n for n in np.unique(labels[tumour]) if n and names[n].startswith("Tumour")}
    assert len(hits) == 1, (name, [names[n] for n in hits])
    ours = labels == hits.pop()
    dice = 2 * (ours & tumour).sum() / (ours.sum() + tumour.sum())
    assert dice >= 0.7, (name, dice)
