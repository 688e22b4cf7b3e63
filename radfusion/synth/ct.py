"""Synthetic chest CT phantoms with exact ground truth.

A phantom is a stack of axial slices: air outside an elliptical body (soft tissue with a fat
rim), two lungs shaped as ellipsoids that taper towards the apex and base, a spine posterior in
the midline, and 0..K spherical tumours placed wholly inside a lung. Gaussian noise is added to
the HU values, not to the labels. ``chest=False`` gives an abdomen-like body with no lungs,
to test "input out of scope".

Geometry is real DICOM geometry in LPS: ImageOrientationPatient is [1,0,0, 0,1,0], so the
column index grows towards the patient's left (+x) and the row index towards posterior (+y);
slice index k grows towards the head (+z). The right lung therefore lies at low column indices.

Everything is deterministic for the arguments given: same arguments, byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "LABELS",
    "UID_ROOT",
    "Phantom",
    "SynthStudy",
    "Tumour",
    "make_phantom",
    "synth_ct",
    "write_ct_series",
]

LABELS: dict[str, int] = {
    "background": 0,
    "body": 1,
    "bone": 2,
    "right_lung": 3,
    "left_lung": 4,
}
"""Label values of the ground truth; tumour k has label ``TUMOUR_BASE + k``."""

TUMOUR_BASE = 10
UID_ROOT = "1.2.826.0.1.3680043.10.1234.9."
"""UID root of synthetic data (below radfusion's example root, arc 9 = synthetic)."""

_HU = {"air": -1000.0, "fat": -100.0, "soft": 40.0, "lung": -850.0, "bone": 550.0}


@dataclass(frozen=True)
class Tumour:
    """A spherical tumour of the phantom."""

    label: int
    centre_mm: tuple[float, float, float]  # LPS (x, y, z)
    radius_mm: float
    hu: float
    side: str  # patient side: "left" or "right"
    volume_mm3: float  # voxels in the label map × voxel volume (the truth the model must hit)


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT volume and its label map, indexed [k, r, c] (slice, row, column)."""

    hu: np.ndarray
    labels: np.ndarray
    pixel_spacing: tuple[float, float]  # (row spacing = y, column spacing = x), mm
    slice_thickness: float  # also the spacing between slices, mm
    origin: tuple[float, float, float]  # ImagePositionPatient of slice 0, LPS mm
    tumours: tuple[Tumour, ...]

    def affine(self) -> np.ndarray:
        """4×4 matrix mapping a voxel index (c, r, k, 1) to LPS mm (x, y, z, 1)."""
        a = np.eye(4)
        a[0, 0] = self.pixel_spacing[1]
        a[1, 1] = self.pixel_spacing[0]
        a[2, 2] = self.slice_thickness
        a[:3, 3] = self.origin
        return a

    @property
    def voxel_volume_mm3(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_thickness


def _check(name: str, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {why}")


def make_phantom(
    *,
    slices: int = 120,
    rows: int = 512,
    columns: int = 512,
    seed: int = 0,
    tumours: int = 2,
    pixel_spacing: float = 0.7,
    slice_thickness: float = 2.5,
    chest: bool = True,
) -> Phantom:
    """Build a phantom in memory.

    Raises:
        ValueError: an argument is out of range (the message names it), or the tumours do not
            fit in the lungs.
    """
    _check("slices", slices >= 1, "must be at least 1")
    _check("rows", rows >= 32, "must be at least 32")
    _check("columns", columns >= 32, "must be at least 32")
    _check("tumours", tumours >= 0, "must not be negative")
    _check("tumours", chest or tumours == 0, "a non-chest phantom has no lungs for tumours")
    _check("pixel_spacing", pixel_spacing > 0, "must be positive")
    _check("slice_thickness", slice_thickness > 0, "must be positive")
    rng = np.random.default_rng(seed)
    ps = float(pixel_spacing)
    fov_x, fov_y = columns * ps, rows * ps
    fov = min(fov_x, fov_y)
    x0 = -(columns - 1) / 2 * ps
    y0 = -(rows - 1) / 2 * ps
    z0 = -300.0
    xs = (x0 + np.arange(columns, dtype=np.float32) * ps)[None, :]
    ys = (y0 + np.arange(rows, dtype=np.float32) * ps)[:, None]

    # Slight per-seed variation so phantoms are not all identical.
    body_a, body_b = fov * rng.uniform(0.40, 0.44), fov * rng.uniform(0.28, 0.32)
    lung_dx, lung_y = fov * rng.uniform(0.18, 0.20), -fov * 0.02
    lung_a, lung_b = fov * rng.uniform(0.11, 0.13), fov * rng.uniform(0.16, 0.18)
    spine_y, spine_r = body_b * 0.72, fov * 0.045
    fat = fov * 0.025

    labels = np.zeros((slices, rows, columns), dtype=np.uint8)
    hu = np.full((slices, rows, columns), _HU["air"], dtype=np.float32)
    body_e = (xs / body_a) ** 2 + (ys / body_b) ** 2
    inner_e = (xs / (body_a - fat)) ** 2 + (ys / (body_b - fat)) ** 2
    body = body_e <= 1
    spine = xs**2 + (ys - spine_y) ** 2 <= spine_r**2
    lung_e = {
        side: ((xs - sign * lung_dx) / lung_a) ** 2 + ((ys - lung_y) / lung_b) ** 2
        for side, sign in (("right", -1.0), ("left", 1.0))
    }
    for k in range(slices):
        lab = labels[k]
        img = hu[k]
        lab[body] = LABELS["body"]
        img[body] = _HU["fat"]
        img[inner_e <= 1] = _HU["soft"]
        lab[spine] = LABELS["bone"]
        img[spine] = _HU["bone"]
        if not chest:
            continue
        # Lungs occupy the middle 80 % of the stack and taper like ellipsoids.
        t = (k + 0.5) / slices
        scale2 = 1 - ((t - 0.5) / 0.4) ** 2
        if scale2 <= 0.05:
            continue
        for side, e in lung_e.items():
            m = e <= scale2
            lab[m] = LABELS[f"{side}_lung"]
            img[m] = _HU["lung"]

    placed: list[Tumour] = []
    zs = z0 + np.arange(slices) * slice_thickness
    for i in range(tumours):
        placed.append(_place_tumour(rng, labels, hu, i, xs, ys, zs, ps, slice_thickness, placed))
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * 20.0
    hu_i16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    voxel = ps * ps * slice_thickness
    final = tuple(
        Tumour(
            t.label,
            t.centre_mm,
            t.radius_mm,
            t.hu,
            t.side,
            float(np.count_nonzero(labels == t.label)) * voxel,
        )
        for t in placed
    )
    return Phantom(hu_i16, labels, (ps, ps), float(slice_thickness), (x0, y0, z0), final)


def _place_tumour(
    rng: np.random.Generator,
    labels: np.ndarray,
    hu: np.ndarray,
    index: int,
    xs: np.ndarray,
    ys: np.ndarray,
    zs: np.ndarray,
    ps: float,
    st: float,
    placed: list[Tumour],
) -> Tumour:
    label = TUMOUR_BASE + index
    for attempt in range(400):
        radius = float(rng.uniform(4.0, 15.0)) * (0.6 if attempt > 200 else 1.0)
        side = "right" if rng.random() < 0.5 else "left"
        lung_label = LABELS[f"{side}_lung"]
        kk, rr, cc = np.nonzero(labels[:, ::4, ::4] == lung_label)
        if kk.size == 0:
            break
        j = int(rng.integers(kk.size))
        centre = (float(xs[0, cc[j] * 4]), float(ys[rr[j] * 4, 0]), float(zs[kk[j]]))
        if any(
            np.linalg.norm(np.subtract(centre, t.centre_mm)) < radius + t.radius_mm + 3
            for t in placed
        ):
            continue
        # Bounding box of the sphere (plus a one-voxel margin that must also be lung).
        k_lo = int(np.floor((centre[2] - radius - st - zs[0]) / st))
        k_hi = int(np.ceil((centre[2] + radius + st - zs[0]) / st))
        r_lo = int(np.floor((centre[1] - radius - ps - ys[0, 0]) / ps))
        r_hi = int(np.ceil((centre[1] + radius + ps - ys[0, 0]) / ps))
        c_lo = int(np.floor((centre[0] - radius - ps - xs[0, 0]) / ps))
        c_hi = int(np.ceil((centre[0] + radius + ps - xs[0, 0]) / ps))
        if (
            min(k_lo, r_lo, c_lo) < 0
            or k_hi >= labels.shape[0]
            or r_hi >= labels.shape[1]
            or (c_hi >= labels.shape[2])
        ):
            continue
        box = labels[k_lo : k_hi + 1, r_lo : r_hi + 1, c_lo : c_hi + 1]
        z = zs[k_lo : k_hi + 1, None, None]
        y = ys[r_lo : r_hi + 1, :][None, :, :]
        x = xs[:, c_lo : c_hi + 1][None, :, :]
        d2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
        margin = d2 <= (radius + max(ps, st)) ** 2
        if not np.all(box[margin] == lung_label):
            continue
        sphere = d2 <= radius**2
        if not sphere.any():
            continue
        tumour_hu = float(rng.uniform(10.0, 50.0))
        box[sphere] = label
        hu[k_lo : k_hi + 1, r_lo : r_hi + 1, c_lo : c_hi + 1][sphere] = tumour_hu
        return Tumour(label, centre, radius, tumour_hu, side, 0.0)
    raise ValueError(f"tumours: could not fit tumour {index + 1} inside a lung")


@dataclass(frozen=True)
class SynthStudy:
    """Files written by ``write_ct_series``."""

    directory: Path
    files: tuple[Path, ...]  # in slice order
    StudyInstanceUID: str
    SeriesInstanceUID: str
    FrameOfReferenceUID: str
    ground_truth: Path  # labels.npz: labels [k, r, c] uint8 and affine (c, r, k) -> LPS
    truth_json: Path


def _uid(root: str, *parts: object) -> str:
    return str(generate_uid(prefix=root, entropy_srcs=[str(p) for p in parts]))


def write_ct_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    patient_id: str = "RF-0001",
    patient_name: str = "Phantom^Chest",
    issuer_of_patient_id: str | None = "urn:oid:1.2.826.0.1.3680043.10.1234.1",
    seed: int = 0,
    uid_root: str = UID_ROOT,
    study_date: str = "20260101",
    accession_number: str = "",
    body_part: str = "CHEST",
) -> SynthStudy:
    """Write ``phantom`` as a single-frame CT series plus ground truth into ``out_dir``.

    The issuer becomes the Issuer of Patient ID Qualifiers Sequence: an ``urn:oid:`` (or a
    bare OID) as Universal Entity ID type ISO, anything else as type URI.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = _uid(uid_root, patient_id, seed, "study")
    series_uid = _uid(uid_root, patient_id, seed, "series")
    for_uid = _uid(uid_root, patient_id, seed, "frame-of-reference")
    accession = accession_number or f"A{seed:07d}"

    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.SOPClassUID = CTImageStorage
    base.InstanceCreationDate = study_date
    base.InstanceCreationTime = "090000"
    base.StudyDate = base.SeriesDate = base.AcquisitionDate = base.ContentDate = study_date
    base.StudyTime = "090000"
    base.SeriesTime = base.AcquisitionTime = base.ContentTime = "090500"
    base.AccessionNumber = accession
    base.Modality = "CT"
    base.Manufacturer = "radfusion synthetic phantom"
    base.InstitutionName = "radfusion synthetic data"
    base.ReferringPhysicianName = ""
    base.StudyDescription = "CT CHEST"
    base.SeriesDescription = f"Chest {phantom.slice_thickness:g}mm (synthetic)"
    base.ManufacturerModelName = "phantom"
    base.PatientName = patient_name
    base.PatientID = patient_id
    if issuer_of_patient_id:
        base.IssuerOfPatientID = "RADFUSION"
        bare = issuer_of_patient_id.removeprefix("urn:oid:")
        item = Dataset()
        item.UniversalEntityID = bare
        is_oid = all(p.isdigit() for p in bare.split("."))
        item.UniversalEntityIDType = "ISO" if is_oid else "URI"
        base.IssuerOfPatientIDQualifiersSequence = [item]
    base.PatientBirthDate = "19600101"
    base.PatientSex = "O"
    base.BodyPartExamined = body_part
    base.SliceThickness = phantom.slice_thickness
    base.KVP = 120
    base.SoftwareVersions = "radfusion-synth-1"
    base.PatientPosition = "HFS"
    base.StudyInstanceUID = study_uid
    base.SeriesInstanceUID = series_uid
    base.StudyID = "1"
    base.SeriesNumber = 2
    base.AcquisitionNumber = 1
    base.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    base.FrameOfReferenceUID = for_uid
    base.PositionReferenceIndicator = ""
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = phantom.hu.shape[1:]
    base.PixelSpacing = [round(v, 6) for v in phantom.pixel_spacing]
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1
    base.WindowCenter = -600
    base.WindowWidth = 1500
    base.RescaleIntercept = 0
    base.RescaleSlope = 1
    base.RescaleType = "HU"

    files = []
    for k in range(phantom.hu.shape[0]):
        ds = Dataset()
        ds.update(base)
        sop_uid = _uid(uid_root, patient_id, seed, "image", k)
        z = phantom.origin[2] + k * phantom.slice_thickness
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [
            round(phantom.origin[0], 4),
            round(phantom.origin[1], 4),
            round(z, 4),
        ]
        ds.SliceLocation = round(z, 4)
        ds.PixelData = phantom.hu[k].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = uid_root + "1"
        meta.ImplementationVersionName = "RADFUSION_SYN"
        ds.file_meta = meta
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)

    gt = out_dir / "labels.npz"
    np.savez_compressed(gt, labels=phantom.labels, affine=phantom.affine())
    voxel = phantom.voxel_volume_mm3
    truth = {
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": for_uid,
        "spacing_mm": {
            "row": phantom.pixel_spacing[0],
            "column": phantom.pixel_spacing[1],
            "slice": phantom.slice_thickness,
        },
        "labels": {
            **LABELS,
            **{f"tumour_{t.label - TUMOUR_BASE + 1}": t.label for t in phantom.tumours},
        },
        "lungs": [
            {
                "side": side,
                "label": LABELS[f"{side}_lung"],
                "volume_mm3": float(np.count_nonzero(phantom.labels == LABELS[f"{side}_lung"]))
                * voxel,
            }
            for side in ("right", "left")
        ],
        "tumours": [
            {
                "label": t.label,
                "centre_mm": list(t.centre_mm),
                "radius_mm": t.radius_mm,
                "hu": t.hu,
                "side": t.side,
                "volume_mm3": t.volume_mm3,
                "volume_ml": t.volume_mm3 / 1000.0,
            }
            for t in phantom.tumours
        ],
    }
    truth_path = out_dir / "truth.json"
    truth_path.write_text(json.dumps(truth, indent=2))
    return SynthStudy(out_dir, tuple(files), study_uid, series_uid, for_uid, gt, truth_path)


def synth_ct(
    out_dir: Path,
    *,
    slices: int = 120,
    seed: int = 0,
    patient_id: str = "RF-0001",
    tumours: int = 2,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing: float | None = None,
    slice_thickness: float = 2.5,
    chest: bool = True,
) -> SynthStudy:
    """Make a phantom and write it: the one call tests and the CLI use.

    ``pixel_spacing`` defaults to a 360 mm field of view.
    """
    phantom = make_phantom(
        slices=slices,
        rows=rows,
        columns=columns,
        seed=seed,
        tumours=tumours if chest else 0,
        pixel_spacing=pixel_spacing or 360.0 / max(rows, columns),
        slice_thickness=slice_thickness,
        chest=chest,
    )
    return write_ct_series(
        phantom,
        Path(out_dir),
        patient_id=patient_id,
        seed=seed,
        body_part="CHEST" if chest else "ABDOMEN",
    )


def read_truth(directory: Path) -> dict[str, object]:
    """The truth.json of a written study."""
    return dict(json.loads((Path(directory) / "truth.json").read_text()))
