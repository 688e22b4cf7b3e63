"""A copy of a real CT series with ``--factor`` times as many slices, for timing the top of the
slice-count range on real anatomy.

The one real case here (LIDC-IDRI-0001) has 133 slices; hospitals send 1.0-1.25 mm series of
250-400. Between each pair of neighbouring slices this writes ``factor - 1`` slices linearly
interpolated in HU (new SOP Instance and Series Instance UIDs, positions, slice thickness and
spacing; uncompressed). The anatomy stays real, its through-plane detail does not become
finer: use the copy for timing (``benchmarks/e2e.py --real OUT``), never for accuracy.

    .venv/bin/python benchmarks/thin_slices.py /work/shared/data/lidc-idri-0001/dicom \
        /tmp/lidc-265 [--factor 2]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radfusion.operators.volume import assemble_volume


def thin_series(source: Path, out: Path, factor: int) -> int:
    """Write the interpolated series of the CT images in ``source`` to ``out``; return how
    many slices were written. The series is assembled as the app assembles it
    (:func:`assemble_volume`: order along the slice normal, rescale, geometry checks).

    Raises:
        ValueError: ``factor`` is below 2, ``source`` holds fewer than two single-frame CT
            images, or their geometry is irregular (:class:`VolumeError`, which says how).
    """
    if factor < 2:
        raise ValueError(f"factor {factor}: must be 2 or more")
    images = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            continue  # not DICOM (notes, checksums): not part of the series
        if ds.get("Modality") == "CT" and "PixelData" in ds and ds.get("NumberOfFrames", 1) == 1:
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()  # the copies are written uncompressed, like their pixel data
            images.append(ds)
    if len(images) < 2:
        raise ValueError(f"{source}: fewer than two single-frame CT images")
    volume = assemble_volume(images)
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    thickness = f"{volume.spacing_mm[0] / factor:.3f}"
    count = (len(volume.hu) - 1) * factor + 1
    for i in range(count):
        k, j = divmod(i, factor)
        w = j / factor
        hu = volume.hu[k] if j == 0 else (1.0 - w) * volume.hu[k] + w * volume.hu[k + 1]
        position = (volume.affine @ np.array([0.0, 0.0, i / factor, 1.0]))[:3]
        ds = copy.deepcopy(volume.source_images[k])
        stored = np.round((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        dtype = np.dtype(f"{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}")
        limits = np.iinfo(dtype)
        ds.PixelData = np.clip(stored, limits.min, limits.max).astype(dtype).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
        ds.SliceLocation = f"{position[2]:.3f}"
        ds.SliceThickness = thickness
        if "SpacingBetweenSlices" in ds:
            ds.SpacingBetweenSlices = thickness
        ds.InstanceNumber = i + 1
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f"{i + 1:06d}.dcm", enforce_file_format=True)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--factor", type=int, default=2)
    args = parser.parse_args()
    print(f"{thin_series(args.source, args.out, args.factor)} slices written to {args.out}")


if __name__ == "__main__":
    main()
