"""Radiomics: per-tumour shape, intensity and texture features, computed by an IBSI-compliant
library, for the fusion model and for research export.

The library is mirp (Zwanenburg et al., maintained, IBSI chapter 1 compliant, pure Python).
pyradiomics, the other common choice, does not build on this Python (3.11) and its releases
have stalled. mirp is installed without its ``itk`` meta-package (about 1.5 GB): it imports
``itk`` only to read image files, which radfusion never asks of it, and ``itk-core`` satisfies
that import. ``tests/unit/operators/test_radiomics.py`` checks its values on the IBSI digital
phantom against the IBSI reference values.

What is computed, per tumour finding (see :data:`FEATURES`): intensity (mean, SD, skewness,
excess kurtosis, percentiles) and texture (every GLCM and GLRLM feature, 3D, averaged over
directions) by mirp; shape (volume, surface area, sphericity, maximum 3D diameter, elongation,
flatness) by radfusion from scikit-image's mesh, because mirp's shape family is slow (see
:func:`shape_features`); and the share of voxels in the ground-glass range. Every feature with
an IBSI identifier is checked against the phantom's reference value.
The resampling, re-segmentation range and discretisation come from :class:`RadiomicsSettings`
(``apps.lung_ct.radiomics``) and are recorded with every result.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Literal

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from scipy import ndimage

from radfusion.errors import RadfusionError
from radfusion.operators.measurement import Measured
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.volume import Volume

__all__ = [
    "FEATURES",
    "LIBRARY",
    "SHAPE",
    "Feature",
    "Radiomics",
    "RadiomicsError",
    "RadiomicsOperator",
    "RadiomicsSettings",
    "TumourRadiomics",
    "compute_radiomics",
    "shape_features",
    "tumour_features",
]

log = logging.getLogger("radfusion.operators.radiomics")


class RadiomicsError(RadfusionError):
    """The radiomics library is missing or could not compute a region's features."""


@dataclass(frozen=True)
class Feature:
    """One reported feature: radfusion's name, the library's, the IBSI identifier (empty when
    IBSI defines none) and the unit."""

    name: str
    mirp: str  # mirp's column, before its settings suffix (e.g. "_fbs_w25.0"); "" not mirp's
    ibsi: str
    unit: str = ""


_GLCM = (
    ("joint_max", "GYBY"),
    ("joint_avg", "60VM"),
    ("joint_var", "UR99"),
    ("joint_entr", "TU9B"),
    ("diff_avg", "TF7R"),
    ("diff_var", "D3YU"),
    ("diff_entr", "NTRS"),
    ("sum_avg", "ZGXS"),
    ("sum_var", "OEEB"),
    ("sum_entr", "P6QZ"),
    ("energy", "8ZQL"),
    ("contrast", "ACUI"),
    ("dissimilarity", "8S9J"),
    ("inv_diff", "IB1Z"),
    ("inv_diff_norm", "NDRX"),
    ("inv_diff_mom", "WF0Z"),
    ("inv_diff_mom_norm", "1QCO"),
    ("inv_var", "E8JP"),
    ("corr", "NI2N"),
    ("auto_corr", "QWB0"),
    ("clust_tend", "DG8W"),
    ("clust_shade", "7NFM"),
    ("clust_prom", "AE86"),
    ("info_corr1", "R8DG"),
    ("info_corr2", "JN9H"),
)
_GLRLM = (
    ("sre", "22OV"),
    ("lre", "W4KF"),
    ("lgre", "V3SW"),
    ("hgre", "G3QZ"),
    ("srlge", "HTZT"),
    ("srhge", "GD3A"),
    ("lrlge", "IVPO"),
    ("lrhge", "3KUM"),
    ("glnu", "R5YN"),
    ("glnu_norm", "OVBL"),
    ("rlnu", "W92Y"),
    ("rlnu_norm", "IC23"),
    ("r_perc", "9ZK5"),
    ("gl_var", "8CE5"),
    ("rl_var", "SXLW"),
    ("rl_entr", "HJ9O"),
)

SHAPE: tuple[Feature, ...] = (
    Feature("volume", "", "RNU0", "mm3"),
    Feature("surface_area", "", "C0JK", "mm2"),
    Feature("sphericity", "", "QCFX"),
    Feature("max_3d_diameter", "", "L0JK", "mm"),
    Feature("elongation", "", "Q3CK"),
    Feature("flatness", "", "N17B"),
)
"""Shape, computed by radfusion from scikit-image's marching-cubes mesh and the voxels'
principal axes, as the IBSI defines them (see :func:`shape_features`)."""

LIBRARY: tuple[Feature, ...] = (
    Feature("mean", "stat_mean", "Q4LE", "HU"),
    Feature("variance", "stat_var", "ECT3", "HU2"),
    Feature("skewness", "stat_skew", "KE2A"),
    Feature("excess_kurtosis", "stat_kurt", "IPH6"),
    Feature("minimum", "stat_min", "1GSF", "HU"),
    Feature("percentile_10", "stat_p10", "QG58", "HU"),
    Feature("median", "stat_median", "Y12H", "HU"),
    Feature("percentile_90", "stat_p90", "8DWT", "HU"),
    Feature("maximum", "stat_max", "84IY", "HU"),
    Feature("interquartile_range", "stat_iqr", "SALO", "HU"),
    *(Feature(f"glcm_{stem}", f"cm_{stem}_d1_3d_avg", ibsi) for stem, ibsi in _GLCM),
    *(Feature(f"glrlm_{stem}", f"rlm_{stem}_3d_avg", ibsi) for stem, ibsi in _GLRLM),
)
"""The library's features radfusion reports (GLCM at distance 1; texture 3D, averaged)."""

FEATURES: tuple[Feature, ...] = SHAPE + LIBRARY
"""Every feature with an IBSI identifier that radfusion reports."""

GROUND_GLASS = "ground_glass_fraction"
SD = "sd"
"""Computed by radfusion: the share of the region's voxels in the ground-glass range, and the
SD (the square root of the IBSI variance)."""

_FAMILIES = ["statistics", "glcm", "glrlm"]


@dataclass(frozen=True)
class RadiomicsSettings:
    """How features are computed (``apps.lung_ct.radiomics``); recorded with every result.

    ``resampling_mm``: isotropic voxel size the region is resampled to first (None: as
    acquired; texture then depends on the slice spacing). ``interpolation_order``: spline order
    of that resampling (1: trilinear). ``intensity_range_hu``: voxels outside are dropped from
    the region before intensity and texture features (re-segmentation; its lower end is also
    the first bin's edge). ``discretisation``: ``fixed_bin_size`` (``bin_width_hu`` wide, the
    IBSI recommendation for CT) or ``none`` (the intensities are grey levels already, as on the
    IBSI phantom). ``ground_glass_hu``: the range counted as ground glass.

    Raises:
        ValueError: a value out of range.
    """

    resampling_mm: float | None = 1.0
    interpolation_order: int = 1
    intensity_range_hu: tuple[float, float] | None = (-1000.0, 400.0)
    discretisation: Literal["fixed_bin_size", "none"] = "fixed_bin_size"
    bin_width_hu: float = 25.0
    ground_glass_hu: tuple[float, float] = (-700.0, -300.0)
    margin_mm: float = field(default=5.0, repr=False)  # context cropped around a region

    def __post_init__(self) -> None:
        if self.resampling_mm is not None and not self.resampling_mm > 0:
            raise ValueError(f"resampling_mm: {self.resampling_mm} must be > 0")
        if self.interpolation_order not in (0, 1, 3):
            raise ValueError(f"interpolation_order: {self.interpolation_order} is not 0, 1 or 3")
        for name in ("intensity_range_hu", "ground_glass_hu"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: {bounds} is not an increasing pair")
        if self.discretisation not in ("fixed_bin_size", "none"):
            raise ValueError(f"discretisation: {self.discretisation!r} is not known")
        if not self.bin_width_hu > 0:
            raise ValueError(f"bin_width_hu: {self.bin_width_hu} must be > 0")

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, for the record."""
        return {k: v for k, v in asdict(self).items() if k != "margin_mm"}


@dataclass(frozen=True)
class TumourRadiomics:
    """One tumour's features (name → value; see :data:`FEATURES`), or why there are none."""

    segment_number: int
    tracking_id: str
    tracking_uid: str
    values: Mapping[str, float]
    error: str | None = None


@dataclass(frozen=True)
class Radiomics:
    """The radiomics of one analysed series: per tumour, and how they were computed."""

    library: str  # e.g. "mirp 2.7.0"
    settings: RadiomicsSettings
    tumours: tuple[TumourRadiomics, ...]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record: library, settings, the features' IBSI identifiers and units,
        and each tumour's values."""
        return {
            "library": self.library,
            "settings": self.settings.describe(),
            "features": {f.name: {"ibsi": f.ibsi, "unit": f.unit} for f in FEATURES}
            | {SD: {"ibsi": "ECT3 (square root)", "unit": "HU"}, GROUND_GLASS: {"ibsi": ""}},
            "tumours": [asdict(t) | {"values": dict(t.values)} for t in self.tumours],
        }


def library_version() -> str:
    """``mirp <version>``.

    Raises:
        RadiomicsError: mirp is not installed.
    """
    try:
        return f"mirp {metadata.version('mirp')}"
    except metadata.PackageNotFoundError:
        raise RadiomicsError(
            "the radiomics library is not installed: pip install --no-deps mirp==2.7.0 "
            "(radfusion's dependencies already hold what it needs)"
        ) from None


def tumour_features(
    image: np.ndarray,
    spacing_mm: tuple[float, float, float],
    mask: np.ndarray,
    settings: RadiomicsSettings,
) -> dict[str, float]:
    """The features of the region ``mask`` of ``image`` (both ``[k, r, c]``; spacing in mm
    in the same order), name → value.

    Raises:
        RadiomicsError: the region is empty, or the library is missing or fails on it.
    """
    if image.shape != mask.shape:
        raise RadiomicsError(f"mask shape {mask.shape} != image shape {image.shape}")
    if not mask.any():
        raise RadiomicsError("the region is empty")
    library_version()
    box = _crop(mask, spacing_mm, settings.margin_mm)
    region, pixels = mask[box], image[box].astype(np.float64)
    options: dict[str, Any] = {
        "base_discretisation_method": settings.discretisation,
        "glcm_spatial_method": "3d_average",
        "glrlm_spatial_method": "3d_average",
    }
    if settings.discretisation == "fixed_bin_size":
        options["base_discretisation_bin_width"] = settings.bin_width_hu
    if settings.resampling_mm is not None:
        options["new_spacing"] = settings.resampling_mm
        options["spline_order"] = settings.interpolation_order
    if settings.intensity_range_hu is not None:
        options["resegmentation_intensity_range"] = list(settings.intensity_range_hu)
    from mirp import extract_features  # heavy (pandas, scikit-image): only when used

    # mirp calls logging.basicConfig (a stdout handler on the root logger, when it has none)
    # and logs each call at INFO on the root logger itself. For the call, the root logger gets
    # a handler (basicConfig then does nothing) and a filter for records logged on it
    # directly; named loggers' records (other threads') pass through untouched.
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    root.addFilter(_warnings_only)
    try:
        image_file, mask_file = _mirp_inputs(pixels, region, spacing_mm)
        tables = extract_features(
            image=image_file, mask=mask_file, base_feature_families=_FAMILIES, **options
        )
    except Exception as err:  # the library's own errors have no common base
        raise RadiomicsError(f"mirp failed on the region: {type(err).__name__}: {err}") from err
    finally:
        root.removeFilter(_warnings_only)
        root.removeHandler(guard)
    if not tables or len(tables[0]) != 1:
        raise RadiomicsError("mirp returned no features for the region")
    row = tables[0].iloc[0]
    try:
        values = shape_features(mask[box], spacing_mm)
    except (ValueError, ArithmeticError, RuntimeError) as err:  # a mesh scikit-image refuses
        raise RadiomicsError(f"no shape for the region: {type(err).__name__}: {err}") from err
    values |= {f.name: _column(row, f.mirp) for f in LIBRARY}
    variance = values["variance"]
    values[SD] = math.sqrt(variance) if variance >= 0 else math.nan
    low, high = settings.ground_glass_hu
    inside = pixels[region]
    values[GROUND_GLASS] = float(((inside >= low) & (inside <= high)).mean())
    return values


def shape_features(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> dict[str, float]:
    """The :data:`SHAPE` features of ``mask`` (``[k, r, c]``, spacing in mm in that order), as
    the IBSI defines them: volume and area of the marching-cubes mesh at the 0.5 iso-level,
    sphericity from those, maximum 3D diameter between mesh vertices, elongation and flatness
    from the principal axes of the voxel centres.

    mirp computes these too, but its morphology family cannot be asked for without Moran's I
    and Geary's C, which it computes in a Python loop: 0.5-4 s per tumour, measured (the
    budget for radiomics and fusion together is 1.5 s per study). The IBSI phantom test holds
    these to the same reference values as the library's.

    Raises:
        RadiomicsError: the mask is empty.
    """
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist
    from skimage.measure import marching_cubes

    if not mask.any():
        raise RadiomicsError("the region is empty")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    padded = np.pad(mask, 1).astype(np.float32)  # a closed surface where the mask meets the edge
    vertices, faces, _, _ = marching_cubes(padded, level=0.5, spacing=tuple(spacing))
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    volume = abs(float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum())) / 6.0
    area = float(np.linalg.norm(np.cross(b - a, c - a), axis=1).sum()) / 2.0
    try:
        hull = vertices[ConvexHull(vertices).vertices]
    except QhullError:  # flat: every vertex is on the hull's plane
        hull = vertices
    diameter = float(pdist(hull).max()) if len(hull) > 1 else 0.0
    points = np.argwhere(mask) * spacing
    # The principal axes' variances, major first (a single voxel has none).
    axes = np.sort(np.linalg.eigvalsh(np.cov(points.T)))[::-1] if len(points) > 1 else np.zeros(3)
    axes = np.clip(axes, 0.0, None)  # a flat region's least variance comes out as -1e-17
    return {
        "volume": volume,
        "surface_area": area,
        "sphericity": (36.0 * math.pi * volume**2) ** (1.0 / 3.0) / area if area > 0 else math.nan,
        "max_3d_diameter": diameter,
        "elongation": math.sqrt(axes[1] / axes[0]) if axes[0] > 0 else math.nan,
        "flatness": math.sqrt(axes[2] / axes[0]) if axes[0] > 0 else math.nan,
    }


def _mirp_inputs(
    pixels: np.ndarray, region: np.ndarray, spacing_mm: tuple[float, float, float]
) -> tuple[Any, Any]:
    """mirp's image and mask objects for arrays with their voxel spacing.

    mirp 2.7's public array input assumes 1 mm voxels (its ``image_voxel_spacing`` keyword is
    silently ignored), so the spacing is set on the objects its array input makes: private
    classes, hence mirp is pinned (``==2.7.0``), and the IBSI phantom test (2 mm voxels; volume
    556 mm³, not 69.5) fails if a release changes them.
    """
    from mirp._data_import.numpy_file import ImageNumpyFile, MaskNumpyFile

    spacing = tuple(float(s) for s in spacing_mm)
    image = ImageNumpyFile(image_data=pixels, image_spacing=spacing, image_modality="CT")
    mask = MaskNumpyFile(image_data=region, image_spacing=spacing, image_modality="generic_mask")
    image.image_metadata, mask.image_metadata = pixels, region  # what its array input sets
    return image, mask


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _column(row: Any, stem: str) -> float:
    """The value of the one column named ``stem`` or ``stem_<settings>``."""
    names = [c for c in row.index if c == stem or c.startswith(stem + "_")]
    if len(names) != 1:
        raise RadiomicsError(f"mirp gave {len(names)} columns for {stem}")
    return float(row[names[0]])


def _crop(
    mask: np.ndarray, spacing_mm: tuple[float, float, float], margin_mm: float
) -> tuple[slice, ...]:
    nonzero = np.nonzero(mask)
    box = []
    for axis, (index, spacing) in enumerate(zip(nonzero, spacing_mm, strict=True)):
        margin = math.ceil(margin_mm / spacing)
        box.append(
            slice(
                max(0, int(index.min()) - margin),
                min(mask.shape[axis], int(index.max()) + 1 + margin),
            )
        )
    return tuple(box)


def compute_radiomics(
    measured: Measured, volume: Volume, settings: RadiomicsSettings
) -> Radiomics | None:
    """The features of every tumour finding of ``measured`` (None when nothing was measured).
    A tumour the library cannot handle gets its error instead of values; the others go on.

    Raises:
        RadiomicsError: the library is not installed.
    """
    result = measured.result
    if result is None:
        return None
    library = library_version()
    # Each segment's box from one pass over the label map (comparing and searching the whole
    # volume per tumour cost 0.1 s each on a 512² × 133 CT), widened by the crop's margin.
    boxes = ndimage.find_objects(result.labels)
    margins = [math.ceil(settings.margin_mm / s) for s in volume.spacing_mm]
    tumours = []
    for finding in result.findings:
        if finding.kind != "tumour":
            continue
        number = finding.segment_number
        found = boxes[number - 1] if 0 < number <= len(boxes) else None
        box = (
            tuple(
                slice(max(0, s.start - m), s.stop + m) for s, m in zip(found, margins, strict=True)
            )
            if found is not None
            else (slice(0, 0),) * 3
        )
        try:
            values = tumour_features(
                volume.hu[box], volume.spacing_mm, result.labels[box] == number, settings
            )
            error = None
        except RadiomicsError as err:
            log.warning("%s: no radiomics (%s)", finding.tracking_id, err)
            values, error = {}, str(err)
        tumours.append(
            TumourRadiomics(
                finding.segment_number, finding.tracking_id, finding.tracking_uid, values, error
            )
        )
    return Radiomics(library, settings, tuple(tumours))


class RadiomicsOperator(Operator):
    """Inputs ``volume`` (:class:`Volume`) and ``measured`` (:class:`Measured`) → output
    ``radiomics`` (:class:`Radiomics`, or None when nothing was measured or ``settings`` is
    None: radiomics off).

    Raises:
        RadiomicsError: on, and the library is not installed (at start, not per study).
    """

    def __init__(
        self, fragment: Fragment, *args: object, settings: RadiomicsSettings | None, **kw: object
    ) -> None:
        if settings is not None:
            library_version()
        self.settings = settings
        self.timings: dict[str, float] = {}  # this operator's stage seconds, read after a run
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("measured")
        spec.output("radiomics")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        volume = op_input.receive("volume")
        measured = op_input.receive("measured")
        radiomics = None
        self.timings.clear()
        if (
            self.settings is not None
            and isinstance(volume, Volume)
            and isinstance(measured, Measured)
        ):
            started = time.perf_counter()
            radiomics = compute_radiomics(measured, volume, self.settings)
            self.timings["radiomics"] = time.perf_counter() - started
        op_output.emit(radiomics, "radiomics")
