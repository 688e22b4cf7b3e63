"""Detection, through measurement, on simple phantoms with the shipped segmentation model and
false-positive stage, as the app runs them: the lungs as the truth has them, every tumour of
10 mm or more reported and measured close to its truth, nothing reported that is not a tumour;
the operating point (score, number of findings, smallest diameter the slices resolve) applied
as configured and said in statements.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from pydicom.dataset import Dataset

from radfusion.operators.detection import (
    Anatomy,
    DetectionSettings,
    detect,
    merge_touching,
    refine_by_model,
    slice_thickness_mm,
)
from radfusion.operators.measurement import Measured, measure
from radfusion.operators.nodules import NoduleCandidate, NoduleScorer, default_scorer_path
from radfusion.operators.results import SegmentationResult
from radfusion.operators.segmentation_model import (
    ClassMap,
    SegmentationModelConfig,
    default_model_config_path,
    load_torchscript,
    segment_map,
)
from radfusion.operators.volume import Volume
from radfusion.synth.ct import LABELS, TUMOUR_LABEL_BASE, Phantom, make_phantom

UID_ROOT = "1.2.826.0.1.3680043.10.1234.9."
SEEDS = (0, 1, 2)
REPORTABLE_MM = 10.0  # tumours at least this large must be found and measured well
MIN_DICE, MAX_VOLUME_ERROR = 0.85, 0.15
MIN_LUNG_DICE = 0.95
SAID_MAX_FINDINGS = (
    r"(\d+) nodule candidates reached the detection score 0\.5; the 1 highest are reported\."
)


@pytest.fixture(scope="module")
def scorer() -> NoduleScorer:
    path = default_scorer_path()
    if not path.is_file():
        pytest.fail(f"the shipped nodule scorer is missing: {path}")
    return NoduleScorer.from_json(path)


def phantom_volume(phantom: Phantom, *, stated_thickness: object = None) -> Volume:
    """The phantom as the app's volume step gives it (one header per slice)."""
    header = Dataset()
    header.SeriesInstanceUID = UID_ROOT + "5150"
    header.SliceThickness = (
        phantom.slice_thickness if stated_thickness is None else stated_thickness
    )
    slices = phantom.hu.shape[0]
    return Volume(
        hu=phantom.hu.astype(np.float32),
        spacing_mm=(phantom.spacing_z, *phantom.pixel_spacing),
        affine=phantom.affine(),
        FrameOfReferenceUID=UID_ROOT + "5151",
        source_images=(header,) * slices,
        frame_numbers=(1,) * slices,
    )


def simple_chest(seed: int, *, slices: int = 120, slice_thickness: float = 2.5) -> Phantom:
    """256² at 1.4 mm, 30 cm of chest, four tumours of 8-30 mm."""
    return make_phantom(
        rows=256,
        columns=256,
        pixel_spacing=1.4,
        slices=slices,
        slice_thickness=slice_thickness,
        tumours=4,
        seed=seed,
    )


@dataclasses.dataclass(frozen=True)
class Case:
    phantom: Phantom
    volume: Volume
    classes: ClassMap
    anatomy: Anatomy
    measured: Measured

    @property
    def result(self) -> SegmentationResult:
        assert self.measured.result is not None, self.measured.out_of_scope_reason
        return self.measured.result


@pytest.fixture(scope="module")
def cases(scorer: NoduleScorer) -> dict[int, Case]:
    config = SegmentationModelConfig.from_yaml(default_model_config_path())
    predictor = load_torchscript(config.model_path)
    out = {}
    for seed in SEEDS:
        phantom = simple_chest(seed)
        volume = phantom_volume(phantom)
        classes = segment_map(volume.hu, volume.spacing_mm, predictor, config)
        # The model's opinion matters: without it (its tumour share read as 0.5) the stage
        # scores a 6 mm structure of these phantoms at 0.58 (stage card).
        anatomy = detect(volume, classes, DetectionSettings(), scorer)
        out[seed] = Case(
            phantom, volume, classes, anatomy, measure(anatomy, volume, uid_root=UID_ROOT)
        )
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


def best_match(case: Case, truth: np.ndarray) -> tuple[float, int | None]:
    """The Dice of the tumour finding that overlaps ``truth`` most, and its segment number."""
    labels = case.result.labels
    best: tuple[float, int | None] = (0.0, None)
    for finding in case.result.findings:
        if finding.kind == "tumour":
            score = dice(labels == finding.segment_number, truth)
            if score > best[0]:
                best = (score, finding.segment_number)
    return best


# -- what is found -----------------------------------------------------------------------------


def painted(c: NoduleCandidate, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[c.box] = c.mask
    return out


def the_one_hit(anatomy: Anatomy, truth: np.ndarray) -> NoduleCandidate:
    """The one reported nodule on ``truth`` (fails when none or several are)."""
    hits = [n for n in anatomy.nodules if (truth[n.box] & n.mask).any()]
    assert len(hits) == 1, [f"{n.diameter_mm:.0f} mm score {n.score:.2f}" for n in hits]
    return hits[0]


def test_lungs_match_the_truth(cases: dict[int, Case]) -> None:
    for seed, case in cases.items():
        assert case.anatomy.fields.problems == (), seed
        right, left = case.result.findings[:2]
        assert (right.side, left.side) == ("right", "left")
        labels, truth = case.result.labels, case.phantom.labels
        for number, name in ((1, "right_lung"), (2, "left_lung")):
            score = dice(labels == number, truth == LABELS[name])
            assert score >= MIN_LUNG_DICE, f"seed {seed} {name}: Dice {score:.3f}"


def test_every_tumour_of_10_mm_or_more_is_reported(cases: dict[int, Case]) -> None:
    missed = []
    for seed, case in cases.items():
        for tumour in case.phantom.tumours:
            if tumour.diameter_mm >= REPORTABLE_MM:
                score, number = best_match(case, case.phantom.labels == tumour.label)
                if number is None or score < 0.5:
                    missed.append(f"seed {seed}: {tumour.diameter_mm} mm (Dice {score:.2f})")
    assert not missed, missed


def test_nothing_but_tumours_is_reported(cases: dict[int, Case]) -> None:
    false = []
    for seed, case in cases.items():
        labels, truth = case.result.labels, case.phantom.labels
        for finding in case.result.findings:
            if finding.kind == "tumour":
                mask = labels == finding.segment_number
                in_tumours = float(np.count_nonzero(truth[mask] >= TUMOUR_LABEL_BASE)) / mask.sum()
                if in_tumours < 0.5:
                    false.append(
                        f"seed {seed}: {finding.tracking_id} {finding.volume_mm3:.0f} mm3 "
                        f"score {finding.detection_score:.2f}, {in_tumours:.0%} in a tumour"
                    )
    assert not false, false


def test_tumours_of_10_mm_or_more_are_measured_close_to_the_truth(
    cases: dict[int, Case],
) -> None:
    bad = []
    for seed, case in cases.items():
        by_number = {f.segment_number: f for f in case.result.findings}
        for tumour in case.phantom.tumours:
            if tumour.diameter_mm < REPORTABLE_MM:
                continue
            score, number = best_match(case, case.phantom.labels == tumour.label)
            if number is None:
                bad.append(f"seed {seed}: {tumour.diameter_mm} mm not reported")
                continue
            error = by_number[number].volume_mm3 / tumour.volume_mm3 - 1.0
            if score < MIN_DICE or abs(error) > MAX_VOLUME_ERROR:
                bad.append(
                    f"seed {seed}: {tumour.diameter_mm} mm Dice {score:.3f} volume {error:+.1%}"
                )
    assert not bad, bad


def test_reported_nodules_are_best_first_above_the_operating_point(
    cases: dict[int, Case],
) -> None:
    settings = DetectionSettings()
    for case in cases.values():
        nodules = case.anatomy.nodules
        assert 1 <= len(nodules) <= settings.max_findings
        assert case.anatomy.candidates >= len(nodules)
        scores = [n.score for n in nodules]
        assert scores == sorted(scores, reverse=True)
        assert all(settings.min_score <= s <= 1.0 for s in scores)
        assert all(n.diameter_mm >= 5.0 for n in nodules)  # twice the 2.5 mm slices
        tumours = [f for f in case.result.findings if f.kind == "tumour"]
        assert [f.detection_score for f in tumours] == scores


# -- the operating point -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_score", -0.01),
        ("min_score", 1.01),
        ("max_findings", -1),
        ("max_findings", 251),
        ("min_diameter_mm", -0.5),
    ],
)
def test_settings_out_of_range_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DetectionSettings(**{field: value})  # type: ignore[arg-type]


def test_settings_at_their_bounds_are_accepted() -> None:
    DetectionSettings(min_score=0.0, max_findings=0, min_diameter_mm=0.0)
    DetectionSettings(min_score=1.0, max_findings=250, min_diameter_mm=30.0)
    assert DetectionSettings() == DetectionSettings(
        min_score=0.5, max_findings=10, min_diameter_mm=4.0
    )


def test_a_score_no_candidate_reaches_reports_no_nodule(
    cases: dict[int, Case], scorer: NoduleScorer
) -> None:
    case = cases[SEEDS[0]]
    anatomy = detect(case.volume, case.classes, DetectionSettings(min_score=1.0), scorer)
    assert anatomy.nodules == ()
    assert anatomy.candidates == case.anatomy.candidates
    assert any(s.startswith("No nodule found") for s in anatomy.statements), anatomy.statements
    measured = measure(anatomy, case.volume, uid_root=UID_ROOT)
    assert measured.result is not None  # the lungs are still reported
    assert [f.kind for f in measured.result.findings] == ["lung", "lung"]
    assert measured.statements == anatomy.statements


def test_at_most_max_findings_are_reported_and_that_is_said(
    cases: dict[int, Case], scorer: NoduleScorer
) -> None:
    case = cases[SEEDS[0]]
    assert len(case.anatomy.nodules) >= 2
    anatomy = detect(case.volume, case.classes, DetectionSettings(max_findings=1), scorer)
    assert len(anatomy.nodules) == 1
    best = case.anatomy.nodules[0]
    assert anatomy.nodules[0].score == best.score
    np.testing.assert_array_equal(anatomy.nodules[0].mask, best.mask)
    said = [
        m for m in map(re.compile(SAID_MAX_FINDINGS).fullmatch, anatomy.statements) if m is not None
    ]
    assert len(said) == 1, anatomy.statements
    reached = int(said[0].group(1))
    assert reached >= len(case.anatomy.nodules)
    if len(case.anatomy.nodules) < DetectionSettings().max_findings:  # all reported by default
        assert reached == len(case.anatomy.nodules)


def test_thick_slices_raise_the_smallest_reported_diameter(scorer: NoduleScorer) -> None:
    phantom = simple_chest(SEEDS[0], slices=60, slice_thickness=5.0)
    volume = phantom_volume(phantom)
    assert slice_thickness_mm(volume) == 5.0
    anatomy = detect(volume, None, DetectionSettings(), scorer)
    assert anatomy.nodules, anatomy.statements
    assert all(n.diameter_mm >= 10.0 for n in anatomy.nodules)
    (said,) = [s for s in anatomy.statements if "slice thickness" in s]
    assert said.startswith("Nodules under 10 mm (twice the 5 mm slice thickness) cannot be")


def test_no_slice_statement_when_the_slices_resolve_the_smallest_diameter(
    cases: dict[int, Case], scorer: NoduleScorer
) -> None:
    case = cases[SEEDS[0]]
    # 2.5 mm slices resolve 5 mm: the default 4 mm is raised (and said), 10 mm is not.
    assert any("twice the 2.5 mm slice thickness" in s for s in case.anatomy.statements)
    anatomy = detect(case.volume, case.classes, DetectionSettings(min_diameter_mm=10.0), scorer)
    assert not any("slice thickness" in s for s in anatomy.statements), anatomy.statements
    assert all(n.diameter_mm >= 10.0 for n in anatomy.nodules)


def test_slice_thickness_is_the_stated_or_the_spacing_whichever_is_thicker() -> None:
    phantom = make_phantom(
        rows=64, columns=64, pixel_spacing=5.0, slices=24, slice_thickness=2.5, tumours=0
    )
    assert slice_thickness_mm(phantom_volume(phantom)) == 2.5
    assert slice_thickness_mm(phantom_volume(phantom, stated_thickness=5.0)) == 5.0
    assert slice_thickness_mm(phantom_volume(phantom, stated_thickness=1.0)) == 2.5  # overlap
    assert slice_thickness_mm(phantom_volume(phantom, stated_thickness="")) == 2.5
    volume = phantom_volume(phantom)
    bare = dataclasses.replace(volume, source_images=(Dataset(),) * 24)
    assert slice_thickness_mm(bare) == 2.5


MAX_FALSE_POSITIVES = 2  # per scan: the goal on real CT (the LUNA16 FROC's range is 1-8)


@pytest.mark.parametrize("seed", (7001, 7002, 7003))
def test_a_coarse_realistic_chest_without_tumours_gives_few_false_nodules(
    scorer: NoduleScorer, seed: int
) -> None:
    """128² at 2.8 mm (low-dose attenuation CT, down-sampled series, the test cohort): vessels
    one or two pixels wide and their branchings are not read as nodules, with or without the
    segmentation model's opinion. (A stage fitted on 512² phantoms only reported ten here,
    scored up to 0.99.)"""
    phantom = make_phantom(
        style="realistic",
        rows=128,
        columns=128,
        pixel_spacing=2.8125,
        slices=60,
        slice_thickness=2.5,
        tumours=0,
        seed=seed,
    )
    volume = phantom_volume(phantom)
    no_tumour = np.zeros(volume.hu.shape, dtype=np.uint8)
    for classes in (None, no_tumour):
        anatomy = detect(volume, classes, DetectionSettings(), scorer)
        assert anatomy.fields.problems == (), seed
        reported = [f"{n.diameter_mm:.1f} mm score {n.score:.2f}" for n in anatomy.nodules]
        assert len(reported) <= MAX_FALSE_POSITIVES, (seed, classes is not None, reported)


def test_a_mass_wider_than_the_lung_beside_it_is_reported_as_one_tumour(
    scorer: NoduleScorer,
) -> None:
    """An 8 cm mass against the chest wall: in its middle slices the lung lies on its medial
    side only, so no in-plane closing wraps it; the mass search's envelope closes across
    slices too. Without that it came back as two tumours (Dice 0.66 and 0.33)."""
    phantom = make_phantom(
        style="realistic",
        rows=256,
        columns=256,
        pixel_spacing=1.4,
        slices=120,
        slice_thickness=2.5,
        tumours=1,
        tumour_types=["mass"],
        seed=7344,
    )
    (tumour,) = phantom.tumours
    assert tumour.location == "pleural" and tumour.diameter_mm >= 75  # the case it stands for
    anatomy = detect(phantom_volume(phantom), None, DetectionSettings(), scorer)
    truth = phantom.labels == tumour.label
    ours = painted(the_one_hit(anatomy, truth), truth.shape)
    assert dice(ours, truth) >= 0.85


def candidate(
    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]], score: float
) -> NoduleCandidate:
    """A candidate filling its whole box (start, stop per axis)."""
    slices = tuple(slice(a, b) for a, b in box)
    mask = np.ones([b - a for a, b in box], dtype=bool)
    return NoduleCandidate(slices, mask, score, 0.0, 40.0, "solid", (score,))  # type: ignore[arg-type]


def test_touching_candidates_are_one_lesion_with_the_best_ones_score() -> None:
    spacing = (2.0, 1.0, 1.0)
    best = candidate(((0, 4), (0, 4), (0, 4)), 0.9)
    beside = candidate(((0, 4), (0, 4), (4, 6)), 0.8)  # shares a face with ``best``
    apart = candidate(((0, 4), (0, 4), (7, 9)), 0.7)  # a column of voxels between
    merged = merge_touching([best, beside, apart], spacing)
    assert [c.score for c in merged] == [0.9, 0.7]
    whole = painted(merged[0], (4, 4, 10))
    assert np.array_equal(whole, painted(best, (4, 4, 10)) | painted(beside, (4, 4, 10)))
    assert merged[0].features == best.features and merged[0].texture == best.texture
    volume = 4 * 4 * 6 * 2.0
    assert merged[0].diameter_mm == pytest.approx((6 * volume / np.pi) ** (1 / 3))
    assert merged[1] is apart


def test_a_candidate_joining_two_lesions_makes_them_one() -> None:
    a = candidate(((0, 2), (0, 2), (0, 2)), 0.9)
    b = candidate(((0, 2), (0, 2), (5, 7)), 0.8)
    bridge = candidate(((0, 1), (0, 1), (2, 5)), 0.6)  # touches both
    diagonal = candidate(((2, 3), (2, 3), (7, 8)), 0.5)  # meets ``b`` at a corner only
    merged = merge_touching([a, b, bridge, diagonal], (1.0, 1.0, 1.0))
    assert [c.score for c in merged] == [0.9, 0.5]
    assert int(np.count_nonzero(merged[0].mask)) == 8 + 8 + 3


def _sphere(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in shape)]
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


def _finding(mask: np.ndarray, score: float = 0.9) -> NoduleCandidate:
    """A candidate of ``mask``'s voxels (1 mm voxels), boxed."""
    k, r, c = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    box = (slice(k[0], k[-1] + 1), slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1))
    diameter = float((6.0 * np.count_nonzero(mask) / np.pi) ** (1 / 3))
    return NoduleCandidate(box, mask[box].copy(), score, diameter, 40.0, "solid", (score,))


def test_a_mass_the_model_follows_takes_the_models_extent() -> None:
    # A 30 mm mass whose far 11 mm lie in the mediastinum (same density): the detector's
    # region stops at the lung's outline and leaks along a 6 mm band of mediastinum; the
    # model's tumour is the mass.
    shape = (64, 64, 64)
    mass = _sphere(shape, (32, 32, 32), 15.0)
    hu = np.where(mass, 40.0, -850.0).astype(np.float32)
    hu[:, :, 36:] = 40.0  # mediastinum beyond x = 36
    band = np.zeros(shape, dtype=bool)
    band[16:48, 16:48, 36:42] = True
    grown = (mass & (np.arange(64) < 36)[None, None, :]) | band
    refined = refine_by_model(_finding(grown), lambda box: mass[box], hu, (1.0, 1.0, 1.0))
    ours = painted(refined, shape)
    dice = 2 * (ours & mass).sum() / (ours.sum() + mass.sum())
    before = 2 * (grown & mass).sum() / (grown.sum() + mass.sum())
    assert before < 0.87 and dice > 0.94  # what stays: the band within 3 mm of the mass
    assert refined.score == 0.9 and refined.features == (0.9,)
    assert refined.diameter_mm == pytest.approx((6 * ours.sum() / np.pi) ** (1 / 3))


def test_a_finding_the_model_mostly_misses_or_a_small_one_is_left_as_it_is() -> None:
    shape = (64, 64, 64)
    mass = _sphere(shape, (32, 32, 32), 15.0)
    hu = np.where(mass, 40.0, -850.0).astype(np.float32)
    finding = _finding(mass)
    part = _sphere(shape, (32, 32, 20), 6.0)  # the model sees a 12 mm piece of a 30 mm mass
    assert refine_by_model(finding, lambda box: part[box], hu, (1.0, 1.0, 1.0)) is finding
    nodule = _finding(_sphere(shape, (32, 32, 32), 7.0))  # 14 mm: the detector's own extent
    assert refine_by_model(nodule, lambda box: mass[box], hu, (1.0, 1.0, 1.0)) is nodule


# A 53 mm hilar mass on 5 mm slices with a sharp kernel (seed 7243 of the false-positive
# stage's mass evaluation). The nodule search grows three nodule-sized pieces inside it besides
# the mass search's region; each scores 0.95-0.99.
MASS_CASE = {
    "style": "realistic",
    "rows": 512,
    "columns": 512,
    "pixel_spacing": 0.7514895752106717,
    "slices": 52,
    "slice_thickness": 5.0,
    "tumours": 1,
    "tumour_types": ["mass"],
    "kernel": "sharp",
    "seed": 7243,
}


def test_a_mass_grown_in_pieces_is_reported_as_one_tumour(scorer: NoduleScorer) -> None:
    """Before touching candidates were merged this mass was four tumours in the SEG (three
    false positives; the largest piece Dice 0.76)."""
    phantom = make_phantom(**MASS_CASE)
    (tumour,) = phantom.tumours
    assert tumour.location == "hilar" and tumour.diameter_mm >= 50  # the case it stands for
    anatomy = detect(phantom_volume(phantom), None, DetectionSettings(), scorer)
    truth = phantom.labels == tumour.label
    assert dice(painted(the_one_hit(anatomy, truth), truth.shape), truth) >= 0.7
    reported = list(anatomy.nodules)
    assert merge_touching(reported, (1.0, 1.0, 1.0)) == reported  # no two findings touch


# -- out of scope and refusals -----------------------------------------------------------------


def test_an_abdomen_gives_no_nodules_and_is_out_of_scope(scorer: NoduleScorer) -> None:
    phantom = make_phantom(
        rows=128, columns=128, pixel_spacing=2.8, slices=40, slice_thickness=5.0, chest=False
    )
    volume = phantom_volume(phantom)
    anatomy = detect(volume, None, DetectionSettings(), scorer)
    assert not anatomy.fields.found and anatomy.fields.problems
    assert anatomy.nodules == () and anatomy.candidates == 0
    measured = measure(anatomy, volume, uid_root=UID_ROOT)
    assert measured.result is None
    assert (measured.out_of_scope_reason or "").startswith("no lungs found")


def test_a_class_map_of_another_shape_is_refused(
    cases: dict[int, Case], scorer: NoduleScorer
) -> None:
    volume = cases[SEEDS[0]].volume
    classes = np.zeros((*volume.shape[:2], volume.shape[2] - 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        detect(volume, classes, DetectionSettings(), scorer)


def test_closed_form_extreme_eigenvalues_match_lapack() -> None:
    from radfusion.operators.nodules import _extreme_eigenvalues

    rng = np.random.default_rng(3)
    for _ in range(200):
        x = rng.normal(size=(3, 3)) * rng.uniform(0.1, 30.0)
        a = x @ x.T + np.eye(3) * rng.uniform(0.0, 2.0)
        expected = np.linalg.eigvalsh(a)
        assert _extreme_eigenvalues(a) == pytest.approx(
            (expected[0], expected[-1]), rel=1e-9, abs=1e-9
        )
    assert _extreme_eigenvalues(np.eye(3) * 4.0) == (4.0, 4.0)
