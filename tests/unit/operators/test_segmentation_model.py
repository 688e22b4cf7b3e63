"""The reference model and its processing: config checks, exact resampling, held-out accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from radfusion.operators.segmentation_model import (
    ClassMap,
    ModelConfigError,
    SegmentationModelConfig,
    default_model_config_path,
    load_torchscript,
    probabilities_to_classes,
    segment,
)
from radfusion.synth.ct import LABELS, TUMOUR_LABEL_BASE, make_phantom

MODEL_CARD = default_model_config_path().parent / "MODEL_CARD.md"


@pytest.fixture(scope="module")
def reference() -> tuple[SegmentationModelConfig, object]:
    config = SegmentationModelConfig.from_yaml(default_model_config_path())
    return config, load_torchscript(config.model_path)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_reference_model_is_small_and_labelled_a_demonstration() -> None:
    config = SegmentationModelConfig.from_yaml(default_model_config_path())
    assert config.model_path.stat().st_size <= 20 * 1024 * 1024
    assert config.labels == {1: "lung", 2: "tumour"}
    assert "not for clinical use" in MODEL_CARD.read_text().lower()
    assert "not for clinical use" in default_model_config_path().read_text().lower()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\n", "missing key"),
        ("- just a list\n", "mapping"),
        (
            "name: x\nversion: 1\nmodel: model.ts\nspacing_mm: [1, 1]\n"
            "intensity: {hu_min: 0, hu_max: 1}\nlabels: {1: lung}\n",
            "spacing_mm",
        ),
        (
            "name: x\nversion: 1\nmodel: model.ts\nspacing_mm: [1, 1, 1]\n"
            "intensity: {hu_min: 5, hu_max: 1}\nlabels: {1: lung}\n",
            "hu_max",
        ),
        (
            "name: x\nversion: 1\nmodel: missing.ts\nspacing_mm: [1, 1, 1]\n"
            "intensity: {hu_min: 0, hu_max: 1}\nlabels: {1: lung}\n",
            "does not exist",
        ),
    ],
)
def test_bad_model_yaml_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "model.ts").write_bytes(b"")
    path = tmp_path / "model.yaml"
    path.write_text(text)
    with pytest.raises(ModelConfigError, match=message) as err:
        SegmentationModelConfig.from_yaml(path)
    assert str(path) in str(err.value)


def test_not_a_torchscript_file_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "model.ts"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ModelConfigError, match="TorchScript"):
        load_torchscript(bogus)


@pytest.mark.parametrize("shape", [(47, 71, 64), (20, 30, 30), (9, 100, 13)])
def test_boundary_only_resolution_equals_full_trilinear_interpolation(
    shape: tuple[int, int, int],
) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    logits = F.avg_pool3d(torch.randn(1, 3, 20, 30, 30, generator=generator) * 8, 3, 1, 1)[0]
    probabilities = torch.softmax(logits, 0)
    expected = F.interpolate(
        probabilities[None], size=shape, mode="trilinear", align_corners=False
    )[0].argmax(0)
    np.testing.assert_array_equal(probabilities_to_classes(probabilities, shape), expected)


@pytest.mark.parametrize("shape", [(47, 71, 64), (9, 100, 13)])
def test_the_classes_of_a_region_equal_that_part_of_the_whole_map(
    shape: tuple[int, int, int],
) -> None:
    """The detector resolves its candidates' voxels only: each must have exactly the class
    the full map gives it."""
    generator = torch.Generator().manual_seed(sum(shape))
    logits = F.avg_pool3d(torch.randn(1, 3, 20, 30, 30, generator=generator) * 8, 3, 1, 1)[0]
    classes = ClassMap.from_probabilities(torch.softmax(logits, 0), shape)
    full = classes.full()
    rng = np.random.default_rng(0)
    for _ in range(25):
        box = []
        for n in shape:
            a, b = sorted(int(v) for v in rng.integers(0, n + 1, size=2))
            box.append(slice(a, max(b, a + 1)))
        part = full[tuple(box)]
        where = rng.random(part.shape) < 0.4
        np.testing.assert_array_equal(classes.at(tuple(box), where), part[where])
    whole = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    np.testing.assert_array_equal(classes.at(whole, np.ones(shape, dtype=bool)), full.ravel())
    assert classes.at(whole, np.zeros(shape, dtype=bool)).shape == (0,)


@pytest.mark.parametrize(
    "geometry",
    [
        # Held-out seeds (training used 1000..1159): the default acquisition, and thin slices
        # with small pixels, each through the full-resolution pipeline the app runs.
        {"seed": 5100, "slices": 120, "slice_thickness": 2.5, "pixel_spacing": 0.7},
        {"seed": 5101, "slices": 240, "slice_thickness": 1.25, "pixel_spacing": 0.6},
    ],
)
def test_held_out_phantoms_meet_the_accuracy_targets(
    reference: tuple[SegmentationModelConfig, object], geometry: dict[str, float]
) -> None:
    config, predictor = reference
    phantom = make_phantom(tumours=4, **geometry)  # type: ignore[arg-type]
    spacing = (phantom.slice_thickness, *phantom.pixel_spacing)
    classes = segment(phantom.hu, spacing, predictor, config)  # type: ignore[arg-type]
    lungs = np.isin(phantom.labels, [LABELS["right_lung"], LABELS["left_lung"]])
    assert dice(classes == config.class_index("lung"), lungs) >= 0.95
    tumour_class = classes == config.class_index("tumour")
    checked = 0
    for tumour in phantom.tumours:
        if 2 * tumour.radius_mm < 10:
            continue
        truth = phantom.labels == tumour.label
        near = truth.copy()
        for _ in range(3):  # the prediction around this tumour, not its neighbours
            near |= np.roll(near, 1, 0) | np.roll(near, -1, 0) | np.roll(near, 1, 1)
            near |= np.roll(near, -1, 1) | np.roll(near, 1, 2) | np.roll(near, -1, 2)
        found = tumour_class & near
        if 2 * tumour.radius_mm >= 20:
            # The app takes these findings' extent from the model (detection.refine_by_model).
            assert dice(found, truth) >= 0.85, tumour
            assert abs(found.sum() - truth.sum()) / truth.sum() <= 0.15, tumour
        else:
            # The app measures these with the detector's own masks, held to Dice >= 0.85 and
            # a volume within 15 % by tests/unit/apps/test_lung_ct.py; here the model's class
            # is evidence for the false-positive stage (0.2.0: Dice 0.82-0.96, volumes up to
            # 37 % too large on 10-15 mm spheres; 0.1.0: 0.94-0.97, within 5 %; model card).
            assert dice(found, truth) >= 0.8, tumour
        checked += 1
    assert checked >= 2
    assert phantom.labels.max() >= TUMOUR_LABEL_BASE


# Held-out phantoms of train.py's realistic evaluation (never trained on), one mass each among
# vessels, airways, heart and fissures: a 52 mm hilar mass on 8 mm slices with a sharp kernel
# (the model's weak spot: Dice 0.44 in 0.2.0) and a 59 mm mediastinal one on 5 mm slices with a
# soft kernel (0.91). Model 0.1.0, trained on simple phantoms only: 0.11 and 0.15, and as much
# tumour again as the masses' volume on vessels and heart.
REALISTIC_MASSES = (
    {"seed": 7404, "kernel": "sharp", "slices": 32, "slice_thickness": 8.0, "pixel_spacing": 0.633},
    {"seed": 7408, "kernel": "soft", "slices": 57, "slice_thickness": 5.0, "pixel_spacing": 0.872},
)


def test_realistic_masses_are_tumour_and_the_anatomy_around_them_is_not(
    reference: tuple[SegmentationModelConfig, object],
) -> None:
    config, predictor = reference
    dices = []
    for geometry in REALISTIC_MASSES:
        phantom = make_phantom(
            style="realistic",
            tumours=1,
            tumour_types=["mass"],
            **geometry,  # type: ignore[arg-type]
        )
        spacing = (phantom.slice_thickness, *phantom.pixel_spacing)
        classes = segment(phantom.hu, spacing, predictor, config)  # type: ignore[arg-type]
        lungs = np.isin(phantom.labels, [LABELS["right_lung"], LABELS["left_lung"]])
        assert dice(classes == config.class_index("lung"), lungs) >= 0.95, geometry
        truth = phantom.labels >= TUMOUR_LABEL_BASE
        tumour = classes == config.class_index("tumour")
        dices.append(dice(tumour, truth))
        # Vessels, airway walls and heart called tumour: at most a fifth of the mass's volume.
        near = ndimage.binary_dilation(truth, iterations=3)
        assert (tumour & ~near).sum() <= 0.2 * truth.sum(), geometry
    assert np.mean(dices) >= 0.6, dices


def test_abdomen_has_no_lung(reference: tuple[SegmentationModelConfig, object]) -> None:
    config, predictor = reference
    phantom = make_phantom(seed=5102, slices=60, slice_thickness=5.0, chest=False)
    classes = segment(phantom.hu, (5.0, 0.7, 0.7), predictor, config)  # type: ignore[arg-type]
    lung_ml = (classes == config.class_index("lung")).sum() * phantom.voxel_volume_mm3 / 1000
    assert lung_ml < 50  # the measurement step's "no lungs: out of scope" threshold


def test_wrong_dimensionality_is_refused(reference: tuple[SegmentationModelConfig, object]) -> None:
    config, predictor = reference
    with pytest.raises(ValueError, match="3-D"):
        segment(np.zeros((4, 4)), (1.0, 1.0, 1.0), predictor, config)  # type: ignore[arg-type]


def test_the_callers_volume_is_left_unchanged(
    reference: tuple[SegmentationModelConfig, object],
) -> None:
    config, predictor = reference
    hu = np.full((32, 64, 64), 2000.0, dtype=np.float32)  # bone-like, above the HU window
    hu[:, :8] = -1024.0  # air below it
    before = hu.copy()
    segment(hu, (2.0, 1.5, 1.5), predictor, config)  # type: ignore[arg-type]
    np.testing.assert_array_equal(hu, before)
