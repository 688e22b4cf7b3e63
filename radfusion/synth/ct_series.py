"""Synthetic CT phantoms written as DICOM: a CT series with its ground truth.

:func:`write_ct_series` writes a :class:`~radfusion.synth.ct.Phantom` as a CT series (one file
per slice, generic or GE, Siemens, Philips or Canon style headers and pixel encodings, see
:mod:`radfusion.synth.vendors`), ``labels.npz`` (the label map and its affine) and
``truth.json`` (UIDs, geometry, label names, tumours and lungs); :func:`synth_ct` makes the
phantom (:func:`~radfusion.synth.ct.make_phantom`) and writes it. Nothing here comes from a
real patient. The same arguments give byte-identical files.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, generate_uid

from radfusion.synth import acquisition, vendors
from radfusion.synth.ct import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    LABELS,
    NOISE_SIGMA_HU,
    STRUCTURES,
    TUMOUR_LABEL_BASE,
    UID_ROOT,
    Phantom,
    _ds,
    _int_arg,
    make_phantom,
)

__all__ = ["SynthStudy", "synth_ct", "write_ct_series"]


@dataclass(frozen=True)
class SynthStudy:
    """What :func:`write_ct_series` wrote: the CT files, their UIDs and the ground truth."""

    directory: Path
    files: tuple[Path, ...]  # the CT files, in slice (= InstanceNumber) order
    StudyInstanceUID: str
    SeriesInstanceUID: str
    FrameOfReferenceUID: str
    ground_truth: Path  # labels.npz: ``labels`` uint8 [k, r, c], ``affine`` (c, r, k) -> LPS mm
    truth_json: Path  # truth.json: UIDs, geometry, label names, tumours and lungs


_OID = re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))+")
_UID_ROOT = re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*\.")
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")


def _text_arg(name: str, value: object, max_len: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: must be a str, not {type(value).__name__}")
    if (not value and not empty) or len(value) > max_len:
        raise ValueError(f"{name}: must be 1..{max_len} characters, got {value!r}")
    if "\\" in value or any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{name}: must not contain a backslash or control characters")
    return value


def _uid(root: str, *parts: object) -> str:
    # JSON keeps the parts apart: generate_uid joins entropy sources with no separator, so
    # ("RF-1", 23) and ("RF-12", 3) would otherwise give the same UID.
    return str(generate_uid(prefix=root, entropy_srcs=[json.dumps([str(p) for p in parts])]))


def _fingerprint(phantom: Phantom) -> str:
    """Digest of what the DICOM files hold (pixels and geometry), so different images never
    share SOP Instance UIDs. Labels are left out: they are not in the files."""
    h = hashlib.blake2b(digest_size=16)
    geometry = (phantom.hu.shape, phantom.pixel_spacing, phantom.slice_thickness, phantom.origin)
    h.update(repr(geometry).encode())
    h.update(np.ascontiguousarray(phantom.hu).data)
    return h.hexdigest()


def _issuer_item(issuer: str) -> Dataset:
    item = Dataset()
    bare = issuer.removeprefix("urn:oid:")
    if _OID.fullmatch(bare):
        item.UniversalEntityID = bare
        item.UniversalEntityIDType = "ISO"
    elif issuer.startswith("urn:oid:"):
        raise ValueError(f"issuer_of_patient_id: {issuer!r} is not a valid urn:oid:")
    else:
        item.UniversalEntityID = issuer
        item.UniversalEntityIDType = "URI"
    return item


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so the file is
    byte-identical across runs (numpy stamps entries with the current time)."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def write_ct_series(
    phantom: Phantom,
    out_dir: Path | str,
    *,
    patient_id: str = "RF-0001",
    patient_name: str = "Phantom^Chest",
    issuer_of_patient_id: str | None = "urn:oid:1.2.826.0.1.3680043.10.1234.1",
    seed: int = 0,
    uid_root: str = UID_ROOT,
    study_date: str = "20260101",
    accession_number: str | None = None,
    body_part: str = "CHEST",
    vendor: str = "generic",
) -> SynthStudy:
    """Write ``phantom`` as a single-frame CT Image series plus ground truth into ``out_dir``.

    ``vendor`` ("generic", "ge", "siemens", "philips", "canon") sets the header style, transfer
    syntax, rescale and padding (see :mod:`radfusion.synth.vendors`); "generic" is the layout
    described below. Pixels outside a phantom's scan circle get the vendor's PixelPaddingValue.

    Files are ``CT0001.dcm``… (InstanceNumber k + 1 for slice k, Explicit VR Little Endian,
    signed pixels with RescaleIntercept 0), ``labels.npz`` and ``truth.json``. Higher-numbered
    ``CT####.dcm`` left from an earlier, longer series are removed so the folder holds one
    series. UIDs are derived from ``uid_root``, ``patient_id``, ``seed`` and a digest of the
    phantom: the same call writes byte-identical files, and a different phantom never reuses a
    UID. ``issuer_of_patient_id`` fills the Issuer of Patient ID Qualifiers Sequence: an OID
    (bare or ``urn:oid:``) as UniversalEntityIDType ISO, anything else as URI; ``None`` omits the
    issuer. ``accession_number`` defaults to one derived from the study UID.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is invalid for its DICOM attribute (the message names it).
    """
    if not isinstance(phantom, Phantom):
        raise TypeError(f"phantom: must be a Phantom, not {type(phantom).__name__}")
    patient_id = _text_arg("patient_id", patient_id, 64)
    patient_name = _text_arg("patient_name", patient_name, 64)
    seed = _int_arg("seed", seed, 0)
    style = vendors.vendor_style(vendor, phantom.kernel, phantom.slice_thickness, seed)
    if not isinstance(uid_root, str) or not _UID_ROOT.fullmatch(uid_root) or len(uid_root) > 40:
        raise ValueError(
            f"uid_root: must be a dotted numeric prefix ending in '.', at most 40 "
            f"characters, got {uid_root!r}"
        )
    try:
        day = datetime.datetime.strptime(study_date, "%Y%m%d").date()
    except (TypeError, ValueError):
        day = None
    if day is None or day.year < 1900:  # the birth date is 60 years earlier
        raise ValueError(f"study_date: must be a YYYYMMDD date from 1900 on, got {study_date!r}")
    if not isinstance(body_part, str) or not _CS.fullmatch(body_part):
        raise ValueError(f"body_part: must be 1..16 of A-Z 0-9 _ space, got {body_part!r}")
    if issuer_of_patient_id is not None:
        issuer_of_patient_id = _text_arg("issuer_of_patient_id", issuer_of_patient_id, 1024)
        issuer_item = _issuer_item(issuer_of_patient_id)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_slices, n_rows, n_cols = phantom.hu.shape
    digest = _fingerprint(phantom)
    study_uid = _uid(uid_root, patient_id, seed, digest, "study")
    series_uid = _uid(uid_root, patient_id, seed, digest, "series")
    for_uid = _uid(uid_root, patient_id, seed, digest, "frame-of-reference")
    if accession_number is None:
        accession_number = "RF" + study_uid[-14:]
    accession_number = _text_arg("accession_number", accession_number, 16, empty=True)
    study_time, series_time = "090000", "090312"
    description = body_part.replace("_", " ").title()
    ps_row, ps_col = phantom.pixel_spacing

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = series_time
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "radfusion synthetic phantom"
    ds.InstitutionName = "radfusion synthetic data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"CT {body_part.replace('_', ' ')}"
    ds.SeriesDescription = f"{description} {phantom.slice_thickness:g}mm"
    ds.ManufacturerModelName = "radfusion.synth.ct"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    if issuer_of_patient_id is not None:
        ds.IssuerOfPatientID = "RADFUSION"
        ds.IssuerOfPatientIDQualifiersSequence = [issuer_item]
    ds.PatientBirthDate = f"{day.year - 60:04d}0101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.SliceThickness = _ds(phantom.slice_thickness)
    if phantom.slice_spacing is not None:
        ds.SpacingBetweenSlices = _ds(phantom.spacing_z)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = "radfusion synth 1"
    ds.ReconstructionDiameter = _ds(
        phantom.scan_diameter_mm or max(n_rows * ps_row, n_cols * ps_col)
    )
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ConvolutionKernel = style.kernel[0]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = n_rows
    ds.Columns = n_cols
    ds.PixelSpacing = [_ds(ps_row), _ds(ps_col)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.WindowCenterWidthExplanation = "LUNG"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if vendor != "generic":
        vendors.apply_headers(ds, style)
        if phantom.kernel == "soft":
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            ds.WindowCenterWidthExplanation = "MEDIASTINUM"
    outside = None
    if phantom.scan_diameter_mm is not None:
        outside = acquisition.outside_scan_circle(
            n_rows, n_cols, phantom.pixel_spacing, phantom.scan_diameter_mm
        )

    files: list[Path] = []
    instances: list[dict[str, object]] = []
    for k in range(n_slices):
        sop_uid = _uid(uid_root, patient_id, seed, digest, "image", k)
        z = _ds(phantom.origin[2] + k * phantom.spacing_z)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(phantom.origin[0]), _ds(phantom.origin[1]), z]
        ds.SliceLocation = z
        ds.PixelData = vendors.encode_slice(phantom.hu[k], style, outside)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = style.transfer_syntax
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
        path = out / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        instances.append(
            {"InstanceNumber": k + 1, "SOPInstanceUID": sop_uid, "file": path.name, "z_mm": z}
        )
    for stale in out.glob("CT*.dcm"):
        m = re.fullmatch(r"CT(\d{4,})\.dcm", stale.name)
        if m and int(m.group(1)) > n_slices:
            stale.unlink()

    affine = phantom.affine()
    gt = out / "labels.npz"
    arrays = {"labels": phantom.labels, "affine": affine}
    if phantom.structures is not None:
        arrays["structures"] = phantom.structures
    _write_npz(gt, arrays)
    truth_path = out / "truth.json"
    truth_path.write_text(
        json.dumps(
            _truth(
                phantom, study_uid, series_uid, for_uid, patient_id, body_part, instances, style
            ),
            indent=2,
        )
        + "\n"
    )
    return SynthStudy(
        directory=out,
        files=tuple(files),
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        FrameOfReferenceUID=for_uid,
        ground_truth=gt,
        truth_json=truth_path,
    )


def _truth(
    phantom: Phantom,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    patient_id: str,
    body_part: str,
    instances: list[dict[str, object]],
    style: vendors.VendorStyle,
) -> dict[str, object]:
    voxel = phantom.voxel_volume_mm3
    # Slice by slice: bincount casts to int64, and a whole-volume cast is ~8x the volume.
    counts = np.zeros(256, dtype=np.int64)
    for label_slice in phantom.labels:
        counts += np.bincount(label_slice.ravel(), minlength=256)
    lungs = []
    for side in ("right", "left"):
        label = LABELS[f"{side}_lung"]
        if counts[label] == 0:
            continue
        inside = sum(int(counts[t.label]) for t in phantom.tumours if t.side == side)
        lungs.append(
            {
                "name": f"{side}_lung",
                "side": side,
                "label": label,
                "voxels": int(counts[label]),
                "volume_mm3": int(counts[label]) * voxel,  # the lung label alone
                "volume_with_tumours_mm3": (int(counts[label]) + inside) * voxel,
            }
        )
    return {
        "format": "radfusion.synth.ct/1",
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": for_uid,
        "PatientID": patient_id,
        "BodyPartExamined": body_part,
        "shape": list(phantom.labels.shape),
        "index_order": "labels[k, r, c]; affine maps (c, r, k, 1) to LPS (x, y, z, 1) mm",
        "spacing_mm": {
            "row": phantom.pixel_spacing[0],
            "column": phantom.pixel_spacing[1],
            "slice": phantom.spacing_z,
        },
        "slice_thickness_mm": phantom.slice_thickness,
        "style": phantom.style,
        "acquisition": {
            "kernel": phantom.kernel,
            "ConvolutionKernel": style.kernel,
            "vendor": style.name,
            "Manufacturer": style.manufacturer,
            "ManufacturerModelName": style.model,
            "TransferSyntaxUID": str(style.transfer_syntax),
            "PixelRepresentation": style.pixel_representation,
            "BitsStored": style.bits_stored,
            "RescaleIntercept": style.intercept,
            "RescaleSlope": style.slope,
            "PixelPaddingValue": style.padding if phantom.scan_diameter_mm else None,
            "scan_diameter_mm": phantom.scan_diameter_mm,
        },
        "anatomy": dict(phantom.anatomy),
        "origin_mm": list(phantom.origin),
        "affine": phantom.affine().tolist(),
        "voxel_volume_mm3": voxel,
        "noise_sigma_hu": NOISE_SIGMA_HU,
        "labels": {
            **LABELS,
            **{f"tumour_{t.label - TUMOUR_LABEL_BASE}": t.label for t in phantom.tumours},
        },
        "lungs": lungs,
        "structures": _structures_truth(phantom, voxel),
        "tumours": [
            {
                "name": f"tumour_{t.label - TUMOUR_LABEL_BASE}",
                "label": t.label,
                "centre_mm": list(t.centre_mm),
                "radius_mm": t.radius_mm,
                "diameter_mm": t.diameter_mm,
                "type": t.type,
                "density": t.density,
                "shape": t.shape,
                "location": t.location,
                "hu": t.hu,
                "core_hu": t.core_hu,
                "core_diameter_mm": t.core_diameter_mm,
                "side": t.side,
                "voxels": int(counts[t.label]),
                "volume_mm3": t.volume_mm3,
                "volume_ml": t.volume_mm3 / 1000.0,
            }
            for t in phantom.tumours
        ],
        "instances": instances,
    }


def _structures_truth(phantom: Phantom, voxel: float) -> dict[str, object] | None:
    """Legend and voxel counts of the ``structures`` array of labels.npz (None without one)."""
    if phantom.structures is None:
        return None
    counts = np.zeros(256, dtype=np.int64)
    for s in phantom.structures:
        counts += np.bincount(s.ravel(), minlength=256)
    return {
        "codes": dict(STRUCTURES),
        "volume_mm3": {
            name: int(counts[code]) * voxel for name, code in STRUCTURES.items() if name != "none"
        },
    }


def synth_ct(
    out_dir: Path | str,
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
    style: str = "simple",
    vendor: str = "generic",
    kernel: str | None = None,
    slice_spacing: float | None = None,
    emphysema: bool = False,
    effusion: bool = False,
    tumour_types: tuple[str, ...] | list[str] | None = None,
    tumour_scale: float = 1.0,
    study_date: str = "20260101",
    position_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> SynthStudy:
    """Make a phantom and write it: :func:`make_phantom` then :func:`write_ct_series`.

    ``position_offset_mm`` moves the patient in the scanner's frame (LPS mm added to every
    position, the truth's too): how a follow-up scan of the same patient differs from the
    prior besides the tumours (``tumour_scale``) and the date.

    ``pixel_spacing`` defaults to a 360 mm field of view (360 / max(rows, columns)); for the
    realistic style to a field of view of 330-430 mm drawn by seed. A ``chest=False`` phantom
    is written with BodyPartExamined ABDOMEN. ``vendor`` goes to :func:`write_ct_series`, the
    other arguments to :func:`make_phantom`.

    Raises:
        TypeError, ValueError: as :func:`make_phantom` and :func:`write_ct_series`.
    """
    if pixel_spacing is None:
        rows_ = _int_arg("rows", rows, 32, 4096)
        columns_ = _int_arg("columns", columns, 32, 4096)
        fov = 360.0
        if style == "realistic":
            fov = round(
                float(np.random.default_rng([_int_arg("seed", seed, 0), 7]).uniform(330, 430))
            )
        pixel_spacing = fov / max(rows_, columns_)
    phantom = make_phantom(
        slices=slices,
        rows=rows,
        columns=columns,
        seed=seed,
        tumours=tumours,
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_thickness,
        chest=chest,
        style=style,
        kernel=kernel,
        slice_spacing=slice_spacing,
        emphysema=emphysema,
        effusion=effusion,
        tumour_types=tumour_types,
        tumour_scale=tumour_scale,
    )
    if any(position_offset_mm):
        phantom = phantom.moved(position_offset_mm)
    return write_ct_series(
        phantom,
        out_dir,
        patient_id=patient_id,
        study_date=study_date,
        seed=seed,
        patient_name="Phantom^Chest" if chest else "Phantom^Abdomen",
        body_part="CHEST" if chest else "ABDOMEN",
        vendor=vendor,
    )
