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
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def thin_series(source: Path, out: Path, factor: int) -> int:
    """Write the interpolated series of the CT images in ``source`` to ``out``; return how
    many slices were written.

    Raises:
        ValueError: ``source`` holds fewer than two CT images or ``factor`` is below 2.
    """
    if factor < 2:
        raise ValueError(f"factor {factor}: must be 2 or more")
    images = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            continue  # not DICOM (notes, checksums): not part of the series
        if ds.get("Modality") == "CT" and "PixelData" in ds:
            images.append(ds)
    if len(images) < 2:
        raise ValueError(f"{source}: fewer than two CT images")
    images.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    for d in images:
        if d.file_meta.TransferSyntaxUID.is_compressed:
            d.decompress()  # the copies are written uncompressed, like their pixel data
    hu = [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in images]
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    step = abs(float(images[1].ImagePositionPatient[2]) - float(images[0].ImagePositionPatient[2]))
    written = 0
    for k, image in enumerate(images):
        for j in range(factor if k + 1 < len(images) else 1):
            w = j / factor
            value = hu[k] if j == 0 else (1.0 - w) * hu[k] + w * hu[k + 1]
            position = [float(v) for v in image.ImagePositionPatient]
            if j:
                after = [float(v) for v in images[k + 1].ImagePositionPatient]
                position = [(1.0 - w) * a + w * b for a, b in zip(position, after, strict=True)]
            ds = image.copy()
            stored = (value - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
            ds.PixelData = np.round(stored).astype(image.pixel_array.dtype).tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
            ds.SliceLocation = f"{position[2]:.3f}"
            ds.SliceThickness = f"{step / factor:.3f}"
            if "SpacingBetweenSlices" in ds:
                ds.SpacingBetweenSlices = f"{step / factor:.3f}"
            ds.InstanceNumber = written + 1
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(out / f"{written + 1:06d}.dcm", enforce_file_format=True)
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--factor", type=int, default=2)
    args = parser.parse_args()
    print(f"{thin_series(args.source, args.out, args.factor)} slices written to {args.out}")


if __name__ == "__main__":
    main()
