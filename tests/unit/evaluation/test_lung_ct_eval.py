"""Scoring the lung-ct app against references: matching rules, metrics, the whole evaluation
with a stand-in app (so the evaluator, not the model, is under test), JSON and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from radfusion.cli import main
from radfusion.config import RadfusionConfig, parse_config
from radfusion.evaluation.grid import CtGrid, Mask, find_ct_series, make_reference_nodule
from radfusion.evaluation.lidc import parse_lidc_xml, reference_nodules
from radfusion.evaluation.lung_ct import (
    CaseResult,
    UnmatchedReferenceError,
    evaluate_lung_ct,
    format_report,
    match_detections,
    score_case,
)
from tests.unit.evaluation.support import LIDC_DICOM, LIDC_XML, require_lidc, write_seg

CONFIG = parse_config({})
GRID = CtGrid(
    StudyInstanceUID="1.2",
    SeriesInstanceUID="1.2.3",
    files=(),
    sop_uids=tuple(f"1.2.3.{k}" for k in range(20)),
    positions_mm=tuple(2.0 * k for k in range(20)),
    z_mm=tuple(2.0 * k for k in range(20)),
    rows=40,
    columns=40,
    pixel_spacing=(1.0, 1.0),
    slice_spacing_mm=2.0,
    SliceThickness=2.0,
    ConvolutionKernel="B30f",
)


def box(k: slice, r: slice, c: slice) -> np.ndarray:
    full = np.zeros(GRID.shape, dtype=bool)
    full[k, r, c] = True
    return full


def ref(full: np.ndarray, readers: int | None = 3):
    return make_reference_nodule("R", readers, full, full, GRID)


def test_matching_rules() -> None:
    big = ref(box(slice(2, 8), slice(5, 17), slice(5, 17)))  # 11 mm: counts
    small = ref(box(slice(10, 12), slice(30, 33), slice(30, 33)))  # 2 mm: does not count
    missed = ref(box(slice(14, 18), slice(5, 17), slice(20, 32)))
    detections = [
        Mask.from_full(box(slice(3, 7), slice(8, 14), slice(8, 14))),  # inside big: hit
        Mask.from_full(box(slice(4, 6), slice(6, 8), slice(6, 8))),  # big again: FP
        Mask.from_full(box(slice(10, 12), slice(30, 33), slice(30, 33))),  # small: ignored
        Mask.from_full(box(slice(0, 2), slice(35, 38), slice(0, 3))),  # nowhere: FP
    ]
    counted = [r.counts(min_readers=2, min_diameter_mm=10) for r in (big, small, missed)]
    assert counted == [True, False, True]
    m = match_detections(detections, [big, small, missed], counted, GRID.spacing_mm)
    assert m.hits == ((0, 0),) and m.false_positives == (1, 3)
    assert m.ignored == (2,) and m.missed == (2,)


def test_hit_within_the_equivalent_radius_outside_the_mask() -> None:
    shell = box(slice(4, 10), slice(10, 20), slice(10, 20))
    shell[5:9, 12:18, 12:18] = False  # hollow: its centre is not in the mask
    detection = Mask.from_full(box(slice(6, 8), slice(14, 16), slice(14, 16)))
    m = match_detections([detection], [ref(shell)], [True], GRID.spacing_mm)
    assert m.hits == ((0, 0),)
    far = Mask.from_full(box(slice(6, 8), slice(30, 32), slice(30, 32)))
    assert match_detections([far], [ref(shell)], [True], GRID.spacing_mm).missed == (0,)


def test_score_case_metrics_and_lungs() -> None:
    nodule = box(slice(2, 8), slice(5, 17), slice(5, 17))
    found = box(slice(2, 8), slice(5, 17), slice(5, 14))  # 3 of 12 columns missing
    lungs = {
        "right": Mask.from_full(box(slice(0, 20), slice(0, 40), slice(0, 24))),
        "left": Mask.from_full(box(slice(0, 20), slice(0, 40), slice(24, 40))),
    }
    case = CaseResult("c", "lidc-xml", "u:x", "soft", "B30f", 2.0, 20)
    score_case(
        case,
        GRID,
        [ref(nodule)],
        [("Tumour 1", Mask.from_full(found))],
        lungs,
        min_readers=2,
        min_diameter_mm=10,
        reference_lungs={"right": lungs["right"]},
    )
    assert (case.found, case.reference_nodules, case.false_positives) == (1, 1, 0)
    [n] = case.nodules
    assert n.detection == "Tumour 1"
    assert n.dice == pytest.approx(2 * 9 / 21)
    assert n.volume_error_pct == pytest.approx(-25.0)
    assert case.lungs.right_l == pytest.approx(20 * 40 * 24 * GRID.voxel_ml / 1000)
    assert case.lungs.ratio == pytest.approx(24 / 16)
    assert case.lung_dice == {"right": 1.0}


# -- the whole evaluation on the real case, with stand-in apps -----------------------------------


@pytest.fixture(scope="module")
def real() -> tuple[CtGrid, np.ndarray]:
    require_lidc()
    read = parse_lidc_xml(LIDC_XML)
    grid = find_ct_series(LIDC_DICOM)[read.SeriesInstanceUID or ""]
    [nodule] = reference_nodules(read, grid)
    return grid, nodule.consensus.full()


def app_writing(grid: CtGrid, segments: list[tuple[str, np.ndarray]]) -> Callable:
    def run(input_dir: Path, output_dir: Path, config: RadfusionConfig) -> list[Path]:
        assert len(list(input_dir.iterdir())) == len(grid.files)  # the series alone
        output_dir.mkdir(parents=True)
        if not segments:
            return []  # nothing found: no SEG (the SR alone is not read)
        return [write_seg(output_dir / "seg.dcm", grid, segments)]

    return run


def lungs(grid: CtGrid) -> list[tuple[str, np.ndarray]]:
    right = np.zeros(grid.shape, dtype=bool)
    right[40:120, 150:350, 80:240] = True
    left = np.zeros(grid.shape, dtype=bool)
    left[40:120, 150:350, 272:400] = True
    return [("Right lung", right), ("Left lung", left)]


def test_perfect_detection_scores_one_hit_no_fp(real: tuple[CtGrid, np.ndarray]) -> None:
    grid, consensus = real
    run = app_writing(grid, [*lungs(grid), ("Tumour 1", consensus)])
    evaluation = evaluate_lung_ct(LIDC_DICOM, LIDC_XML, CONFIG, run=run)
    [case] = evaluation.cases
    assert case.error is None
    assert (case.found, case.reference_nodules, case.false_positives) == (1, 1, 0)
    assert case.nodules[0].dice == pytest.approx(1.0)
    assert case.nodules[0].volume_error_pct == pytest.approx(0.0)
    assert case.kernel == "soft" and case.slice_thickness_mm == pytest.approx(2.5)
    assert case.lungs.ratio == pytest.approx(160 / 128)
    data = evaluation.to_json()
    assert data["overall"]["sensitivity"] == 1.0 and data["overall"]["mean_dice"] == 1.0
    assert list(data["by_kernel"]) == ["soft"]
    json.dumps(data)  # JSON-ready
    text = format_report(evaluation)
    assert "nodules found 1/1, false positives 0" in text
    assert "right/left 1.25" in text


def test_shifted_detection_is_a_miss_and_a_false_positive(
    real: tuple[CtGrid, np.ndarray],
) -> None:
    grid, consensus = real
    shifted = np.roll(consensus, -150, axis=2)  # 10 cm towards the patient's right
    run = app_writing(grid, [("Tumour 1", shifted)])
    [case] = evaluate_lung_ct(LIDC_DICOM, LIDC_XML, CONFIG, run=run).cases
    assert (case.found, case.reference_nodules, case.false_positives) == (0, 1, 1)
    assert case.nodules[0].detection is None and case.nodules[0].dice is None
    assert "MISSED" in format_report(evaluate_lung_ct(LIDC_DICOM, LIDC_XML, CONFIG, run=run))


def test_no_seg_written_is_a_miss_without_false_positives(
    real: tuple[CtGrid, np.ndarray],
) -> None:
    grid, _ = real
    [case] = evaluate_lung_ct(LIDC_DICOM, LIDC_XML, CONFIG, run=app_writing(grid, [])).cases
    assert (case.found, case.reference_nodules, case.false_positives) == (0, 1, 0)
    assert case.lungs.right_l is None and case.lungs.ratio is None


def test_raised_min_diameter_leaves_nothing_to_find(real: tuple[CtGrid, np.ndarray]) -> None:
    grid, consensus = real
    run = app_writing(grid, [("Tumour 1", consensus)])
    [case] = evaluate_lung_ct(LIDC_DICOM, LIDC_XML, CONFIG, run=run, min_diameter_mm=50).cases
    assert (case.found, case.reference_nodules, case.false_positives, case.ignored) == (0, 0, 0, 1)
    [case] = evaluate_lung_ct(LIDC_DICOM, LIDC_XML, CONFIG, run=run, min_readers=5).cases
    assert (case.reference_nodules, case.ignored) == (0, 1)


def test_app_failure_is_the_case_error(real: tuple[CtGrid, np.ndarray]) -> None:
    def failing(input_dir: Path, output_dir: Path, config: RadfusionConfig) -> list[Path]:
        raise RuntimeError("model exploded")

    [case] = evaluate_lung_ct(LIDC_DICOM, LIDC_XML, CONFIG, run=failing).cases
    assert case.error == "RuntimeError: model exploded"
    assert "ERROR: RuntimeError: model exploded" in format_report(
        evaluate_lung_ct(LIDC_DICOM, LIDC_XML, CONFIG, run=failing)
    )


def test_seg_reference_with_lungs(real: tuple[CtGrid, np.ndarray], tmp_path: Path) -> None:
    grid, consensus = real
    reference = write_seg(tmp_path / "ref.dcm", grid, [*lungs(grid), ("Nodule", consensus)])
    run = app_writing(grid, [*lungs(grid), ("Tumour 1", consensus)])
    [case] = evaluate_lung_ct(LIDC_DICOM, reference, CONFIG, run=run).cases
    assert case.reference_kind == "dicom-seg"
    assert (case.found, case.reference_nodules, case.false_positives) == (1, 1, 0)
    assert case.nodules[0].readers is None and case.nodules[0].dice == pytest.approx(1.0)
    assert case.lung_dice == {"left": 1.0, "right": 1.0}


def test_unmatched_reference_is_an_error(tmp_path: Path) -> None:
    require_lidc()
    text = LIDC_XML.read_text().replace("6279.6001.179049", "6279.6001.999999")
    text = text.replace("6279.6001.298806", "6279.6001.999998")
    (tmp_path / "other.xml").write_text(text)
    with pytest.raises(UnmatchedReferenceError, match=r"other\.xml"):
        evaluate_lung_ct(LIDC_DICOM, tmp_path, CONFIG, run=None)
    result = CliRunner().invoke(
        main, ["eval", "lung-ct", "--input", str(LIDC_DICOM), "--reference", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "match no CT series or study" in result.output and "other.xml" in result.output
    (tmp_path / "other.xml").unlink()
    result = CliRunner().invoke(
        main, ["eval", "lung-ct", "--input", str(LIDC_DICOM), "--reference", str(tmp_path)]
    )
    assert result.exit_code == 1 and "no LIDC XML or DICOM SEG reference" in result.output


def test_cli_writes_report_and_json(
    real: tuple[CtGrid, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import radfusion.apps.lung_ct.app as app

    grid, consensus = real
    monkeypatch.setattr(app, "run_folder", app_writing(grid, [("Tumour 1", consensus)]))
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "lung-ct",
            "--input",
            str(LIDC_DICOM),
            "--reference",
            str(LIDC_XML),
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "069.xml [lidc-xml]" in result.output and "found 1/1" in result.output
    data = json.loads(out.read_text())
    assert set(data) == {"settings", "overall", "by_kernel", "cases", "errors"}
    assert data["cases"][0]["nodules"][0]["readers"] == 4
