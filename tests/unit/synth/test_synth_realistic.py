"""The realistic synthetic chest CT: anatomy and tumour truth, partial volume, determinism, and
vendor-style files that decode to the same HU through pydicom and the volume stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from scipy import ndimage

from radfusion.operators.volume import assemble_volume, read_series
from radfusion.synth import acquisition
from radfusion.synth.ct import (
    LABELS,
    STRUCTURES,
    TUMOUR_LABEL_BASE,
    TUMOUR_TYPES,
    VENDORS,
    Phantom,
    make_phantom,
)
from radfusion.synth.ct_series import synth_ct, write_ct_series

# 2 mm slices at 2.2 mm pixels: small enough for a unit test, fine enough to measure tumours.
ARGS: dict[str, Any] = {
    "slices": 140,
    "rows": 160,
    "columns": 160,
    "pixel_spacing": 2.2,
    "slice_thickness": 2.0,
    "seed": 11,
    "tumours": 6,
    "style": "realistic",
    "kernel": "soft",
    "tumour_types": TUMOUR_TYPES[:6],  # one each; spiculated: test_a_spiculated_nodule_...
}
SMALL: dict[str, Any] = {
    "slices": 50,
    "rows": 96,
    "columns": 96,
    "pixel_spacing": 3.6,
    "slice_thickness": 5.0,
    "seed": 4,
    "tumours": 2,
    "style": "realistic",
}


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(**ARGS)


@pytest.fixture(scope="module")
def small() -> Phantom:
    return make_phantom(**SMALL, kernel="sharp")


def _lps(p: Phantom, k: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (p.affine() @ np.stack([c, r, k, np.ones_like(k)]).astype(float))[:3].T


def test_tumour_types_and_geometry_match_the_label_map(phantom: Phantom) -> None:
    assert [t.type for t in phantom.tumours] == list(TUMOUR_TYPES[:6])
    spacing = np.array([phantom.pixel_spacing[1], phantom.pixel_spacing[0], phantom.spacing_z])
    for i, t in enumerate(phantom.tumours):
        assert t.label == TUMOUR_LABEL_BASE + i
        k, r, c = np.nonzero(phantom.labels == t.label)
        assert len(k) > 0, t
        assert t.volume_mm3 == pytest.approx(len(k) * phantom.voxel_volume_mm3)
        extents = (np.array([np.ptp(c), np.ptp(r), np.ptp(k)]) + 1) * spacing
        # The largest extent on the label grid is the truth's diameter within a voxel or two.
        assert abs(extents.max() - t.diameter_mm) <= 2 * spacing.max() + 1e-6, (t, extents)
        centroid = _lps(phantom, k, r, c).mean(axis=0)
        assert np.all(np.abs(centroid - t.centre_mm) <= 1.5 * spacing), (t, centroid)
        if t.type == "mass":
            assert 30 <= t.diameter_mm <= 100 + 2 * spacing.max()
            assert t.core_hu is not None and t.core_hu < t.hu
        else:
            assert 4 - 2 * spacing.max() <= t.diameter_mm <= 30 + 2 * spacing.max()
        if t.density == "ground_glass":
            assert -700 <= t.hu <= -500
        elif t.density == "part_solid":
            assert -600 <= t.hu <= -400 and t.core_hu is not None and 0 <= t.core_hu <= 60
        else:
            assert 0 <= t.hu <= 60


def test_tumours_are_disjoint_from_lungs_and_touch_what_their_type_says(phantom: Phantom) -> None:
    labels, structures = phantom.labels, phantom.structures
    assert structures is not None
    lung = np.isin(labels, [LABELS["right_lung"], LABELS["left_lung"]])
    tumour = labels >= TUMOUR_LABEL_BASE
    assert not np.any(lung & tumour)
    assert np.array_equal(tumour, structures == STRUCTURES["tumour"])
    ball = ndimage.generate_binary_structure(3, 1)
    for t in phantom.tumours:
        mask = labels == t.label
        rim = ndimage.binary_dilation(mask, ball) & ~mask
        assert not np.any((labels[rim] >= TUMOUR_LABEL_BASE) & (labels[rim] != t.label))
        if t.type == "juxta_pleural":
            assert np.any(labels[rim] == LABELS["body"]) or np.any(labels[rim] == LABELS["bone"])
        if t.type == "juxta_vascular":
            near = ndimage.binary_dilation(mask, ball, iterations=2)
            assert np.any(structures[near] == STRUCTURES["vessel"]), t
        if t.type in ("solid", "part_solid", "ground_glass"):
            assert set(np.unique(labels[rim])) <= {LABELS[f"{t.side}_lung"]}, t


def test_vessels_are_lung_with_the_density_of_nodules(phantom: Phantom) -> None:
    structures = phantom.structures
    assert structures is not None
    vessels = structures == STRUCTURES["vessel"]
    assert vessels.sum() > 500
    assert set(np.unique(phantom.labels[vessels])) <= {LABELS["right_lung"], LABELS["left_lung"]}
    interior = ndimage.binary_erosion(vessels, ndimage.generate_binary_structure(3, 1))
    assert interior.sum() > 20
    hu_vessel = float(phantom.anatomy["vessel_hu"])  # type: ignore[arg-type]
    assert 30 <= hu_vessel <= 60
    assert abs(float(phantom.hu[interior].mean()) - hu_vessel) < 40
    assert (structures == STRUCTURES["airway_wall"]).any()
    assert (structures == STRUCTURES["fissure"]).any()
    assert (structures == STRUCTURES["bone"]).any()


def test_lungs_are_adult_sized_and_roughly_symmetric(phantom: Phantom) -> None:
    right = (phantom.labels == LABELS["right_lung"]).sum() * phantom.voxel_volume_mm3 / 1e6
    left = (phantom.labels == LABELS["left_lung"]).sum() * phantom.voxel_volume_mm3 / 1e6
    assert 0.8 <= right <= 4.5 and 0.8 <= left <= 4.5, (right, left)
    assert 0.6 < right / left < 1.6
    hu = phantom.hu[phantom.labels == LABELS["right_lung"]].astype(float)
    assert -900 < np.median(hu) < -750
    with_lung = [bool(np.isin(s, (3, 4)).any()) for s in phantom.labels]
    assert not with_lung[0] and not with_lung[-1]


def test_variants_emphysema_and_effusion(small: Phantom) -> None:
    p = make_phantom(**{**SMALL, "tumours": 1}, emphysema=True, effusion=True)
    assert p.structures is not None
    emph = p.structures == STRUCTURES["emphysema"]
    eff = p.structures == STRUCTURES["effusion"]
    assert emph.any() and eff.any()
    assert set(np.unique(p.labels[eff])) == {LABELS["body"]}  # effusion is not lung
    assert p.hu[emph].mean() < p.hu[p.labels == LABELS["right_lung"]].mean()
    assert p.anatomy["emphysema"] is True and p.anatomy["effusion"] is True


def test_thick_slice_is_the_mean_of_its_fine_planes() -> None:
    sampling = acquisition.plan_sampling(0.0, 3, 5.0, 5.0)
    assert sampling.step == 5 and list(sampling.offsets) == [-2, -1, 0, 1, 2]
    tissue = np.zeros((len(sampling.zs), 32, 32), dtype=np.uint8)
    centre = sampling.first + sampling.step  # slice 1
    tissue[centre - 1 : centre + 1, 8:24, 8:24] = 1  # a 2 mm thick nodule in a 5 mm slice
    lut = np.zeros(256, dtype=np.float32)
    lut[0], lut[1] = -860.0, 40.0
    hu = acquisition.render_slices(
        np.random.default_rng(0),
        tissue,
        sampling,
        3,
        lut,
        np.zeros(256, dtype=np.float32),
        np.zeros((32, 32), dtype=np.float32),
        "soft",
        10.0,
        1.0,
        np.zeros((32, 32), dtype=bool),
    )
    expected = -860.0 * 0.6 + 40.0 * 0.4
    assert abs(float(hu[1, 12:20, 12:20].mean()) - expected) < 10
    assert abs(float(hu[0, 12:20, 12:20].mean()) + 860.0) < 10


def test_thick_slices_of_small_nodules_have_intermediate_hu() -> None:
    p = make_phantom(
        **{**SMALL, "seed": 5, "tumours": 3, "slice_thickness": 5.0, "kernel": "soft"},
        tumour_types=["solid"],
    )
    for t in p.tumours:
        if t.diameter_mm <= 12:
            values = p.hu[p.labels == t.label].astype(float)
            # Lung at -860 shares each 5 mm slice with the nodule: neither value survives.
            assert values.min() > -800 and values.min() < t.hu - 100, (t, values)
            break
    else:
        pytest.fail("no small nodule")


def test_overlapping_reconstruction_headers_and_geometry(tmp_path: Path) -> None:
    p = make_phantom(**{**SMALL, "tumours": 1}, slice_spacing=2.5)
    assert p.slice_thickness == 5.0 and p.spacing_z == 2.5
    study = write_ct_series(p, tmp_path, vendor="ge")
    ds = [pydicom.dcmread(f) for f in study.files[:2]]
    assert float(ds[0].SliceThickness) == 5.0 and float(ds[0].SpacingBetweenSlices) == 2.5
    assert float(ds[1].ImagePositionPatient[2]) - float(ds[0].ImagePositionPatient[2]) == 2.5
    volume = assemble_volume(read_series(study.files))
    assert volume.spacing_mm[0] == pytest.approx(2.5)
    truth = json.loads(study.truth_json.read_text())
    assert truth["spacing_mm"]["slice"] == 2.5 and truth["slice_thickness_mm"] == 5.0


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    args = {**SMALL, "vendor": "siemens", "kernel": "sharp", "emphysema": True}
    del args["pixel_spacing"]
    a = synth_ct(tmp_path / "a", **args)
    b = synth_ct(tmp_path / "b", **args)
    names = sorted(p.name for p in a.directory.iterdir())
    assert names == sorted(p.name for p in b.directory.iterdir())
    for name in names:
        assert (a.directory / name).read_bytes() == (b.directory / name).read_bytes(), name
    other = synth_ct(tmp_path / "c", **{**args, "seed": 5})
    assert other.files[25].read_bytes() != a.files[25].read_bytes()


@pytest.fixture(scope="module")
def vendor_studies(small: Phantom, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vendors")
    return {v: write_ct_series(small, root / v, vendor=v, seed=1) for v in VENDORS}


@pytest.mark.parametrize("vendor", VENDORS)
def test_each_vendor_decodes_to_the_same_hu(
    small: Phantom, vendor_studies: dict[str, Any], vendor: str
) -> None:
    study = vendor_studies[vendor]
    first = pydicom.dcmread(study.files[0])
    implicit = vendor in ("siemens", "canon")
    assert first.file_meta.TransferSyntaxUID == (
        pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
    )
    assert float(first.SliceThickness) == small.slice_thickness
    assert first.ConvolutionKernel
    volume = assemble_volume(read_series(study.files))
    assert volume.shape == small.hu.shape
    assert np.allclose(volume.affine, small.affine())
    assert small.scan_diameter_mm is not None
    outside = acquisition.outside_scan_circle(
        small.hu.shape[1], small.hu.shape[2], small.pixel_spacing, small.scan_diameter_mm
    )
    inside = np.broadcast_to(~outside, small.hu.shape)
    assert outside.any()
    np.testing.assert_array_equal(volume.hu[inside], small.hu[inside].astype(np.float32))
    truth = json.loads(study.truth_json.read_text())
    assert truth["acquisition"]["vendor"] == vendor
    assert truth["acquisition"]["Manufacturer"] == first.Manufacturer


def test_vendor_header_styles(vendor_studies: dict[str, Any]) -> None:
    ds = {v: pydicom.dcmread(s.files[0]) for v, s in vendor_studies.items()}
    assert ds["ge"].Manufacturer == "GE MEDICAL SYSTEMS"
    assert ds["ge"].ConvolutionKernel in ("LUNG", "BONE")  # the small phantom is sharp
    assert (ds["ge"].PixelRepresentation, ds["ge"].RescaleIntercept) == (1, -1024)
    assert ds["ge"].PixelPaddingValue == -2000
    assert ds["siemens"].Manufacturer == "SIEMENS" and ds["siemens"].BitsStored == 12
    assert (ds["siemens"].PixelRepresentation, ds["siemens"].RescaleIntercept) == (0, -1024)
    assert "PixelPaddingValue" not in ds["siemens"]
    assert ds["philips"].PixelPaddingValue == 0xF830 and ds["philips"].PixelRepresentation == 0
    assert ds["canon"].ConvolutionKernel in ("FC52", "FC86")
    assert (ds["canon"].RescaleIntercept, ds["canon"].PixelPaddingValue) == (0, -3024)
    padded = pydicom.dcmread(vendor_studies["ge"].files[0]).pixel_array
    assert padded[0, 0] == -2000  # the corner is outside the scan circle
    slopes = {
        float(pydicom.dcmread(write_ct_series_probe(vendor_studies, s)).RescaleSlope)
        for s in (0, 1)
    }
    assert slopes == {1.0, 0.5}


def write_ct_series_probe(vendor_studies: dict[str, Any], seed: int) -> Path:
    """A Philips file written with ``seed`` (the slope variant depends on it)."""
    src = vendor_studies["philips"].directory
    p = make_phantom(**{**SMALL, "tumours": 0, "slices": 4})
    return write_ct_series(p, src.parent / f"philips-{seed}", vendor="philips", seed=seed).files[0]


@pytest.mark.parametrize("vendor", ["ge", "philips", "canon"])
def test_volume_stage_turns_padding_into_air(
    small: Phantom, vendor_studies: dict[str, Any], vendor: str
) -> None:
    volume = assemble_volume(read_series(vendor_studies[vendor].files))
    assert small.scan_diameter_mm is not None
    outside = acquisition.outside_scan_circle(
        small.hu.shape[1], small.hu.shape[2], small.pixel_spacing, small.scan_diameter_mm
    )
    padded = volume.hu[:, outside]
    assert padded.min() >= -1100 and padded.max() <= -1000, (padded.min(), padded.max())


def test_simple_style_rejects_realistic_only_arguments() -> None:
    for kwargs in ({"kernel": "sharp"}, {"slice_spacing": 1.0}, {"emphysema": True}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            make_phantom(slices=10, rows=64, columns=64, pixel_spacing=5.6, **kwargs)
    with pytest.raises(ValueError, match="style"):
        make_phantom(slices=10, rows=64, columns=64, style="fancy")
    with pytest.raises(ValueError, match="tumour_types"):
        make_phantom(**{**SMALL, "tumour_types": ["cyst"]})
    with pytest.raises(ValueError, match="vendor"):
        write_ct_series(
            make_phantom(slices=2, rows=32, columns=32, tumours=0), "/nonexistent", vendor="x"
        )


def test_cli_defaults_to_realistic(tmp_path: Path) -> None:
    from radfusion.cli import main

    result = CliRunner().invoke(
        main,
        [
            "synth",
            "ct",
            "--out",
            str(tmp_path),
            "--slices",
            "40",
            "--size",
            "64",
            "--tumours",
            "1",
            "--vendor",
            "canon",
            "--slice-thickness",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["style"] == "realistic" and truth["acquisition"]["vendor"] == "canon"
    assert len(truth["tumours"]) == 1 and truth["tumours"][0]["type"] in TUMOUR_TYPES


def test_a_spiculated_nodule_is_solid_with_a_rougher_outline_than_a_solid_one() -> None:
    """On a 1 mm grid, surface (voxel faces) per volume^(2/3): a voxelised sphere gives about
    1.5 in these units, a spiculated nodule far more."""
    fine = {**SMALL, "slices": 60, "rows": 256, "columns": 256, "pixel_spacing": 1.0}
    fine |= {"slice_thickness": 1.0, "seed": 5, "tumours": 1, "kernel": "soft"}

    def roughness(kind: str) -> tuple[Any, float]:
        phantom = make_phantom(**fine, tumour_types=(kind,))
        (tumour,) = phantom.tumours
        mask = phantom.labels == tumour.label
        faces = sum(int(np.count_nonzero(np.diff(mask, axis=a))) for a in range(3))
        return tumour, faces / (4.836 * float(mask.sum()) ** (2 / 3))

    spiculated, rough = roughness("spiculated")
    solid, smooth = roughness("solid")
    assert (spiculated.density, spiculated.shape) == ("solid", "spiculated")
    assert spiculated.diameter_mm >= 10 and solid.shape != "spiculated"
    assert rough > 1.15 * smooth
