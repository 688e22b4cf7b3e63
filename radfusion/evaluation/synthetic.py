"""Compare a written DICOM SEG with a synthetic study's ground truth (demo, tests, benchmarks).

Works from the exported SEG file itself, so what is measured is what the PACS received.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from radfusion.synth.ct import LABELS

__all__ = ["Comparison", "compare_with_truth", "dice", "seg_label_volume"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _slice_order(ct_files: Sequence[Path]) -> list[str]:
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in ct_files]
    iop = np.asarray(heads[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    heads.sort(key=lambda h: float(np.asarray(h.ImagePositionPatient, dtype=float) @ normal))
    return [str(h.SOPInstanceUID) for h in heads]


def seg_label_volume(seg_path: Path, ct_files: Sequence[Path]) -> tuple[np.ndarray, dict[int, str]]:
    """The SEG as a [k, r, c] array of segment numbers in the CT's slice order (ascending
    along the slice normal), and the segment labels by number."""
    seg = hd.seg.segread(seg_path)
    uids = _slice_order(ct_files)
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=numbers,
        combine_segments=False,
        skip_overlap_checks=True,
    )  # [k, r, c, segments]
    labels = np.zeros(masks.shape[:3], dtype=np.uint8)
    for i, n in enumerate(numbers):
        labels[masks[..., i] > 0] = n
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    return labels, names


@dataclass(frozen=True)
class Comparison:
    """One truth structure against its best-matching segment."""

    structure: str
    segment: str  # matched segment label, or "missed"
    truth_ml: float
    found_ml: float
    dice: float
    diameter_mm: float  # 2 × truth radius for tumours, 0 for lungs


def compare_with_truth(
    labels: np.ndarray, names: dict[int, str], study_dir: Path
) -> list[Comparison]:
    """Per lung and per tumour of the synthetic truth: Dice and volumes against the SEG."""
    truth = np.load(Path(study_dir) / "labels.npz")["labels"]
    meta = json.loads((Path(study_dir) / "truth.json").read_text())
    spacing = meta["spacing_mm"]
    voxel_ml = spacing["row"] * spacing["column"] * spacing["slice"] / 1000.0
    if truth.shape != labels.shape:
        raise ValueError(f"truth shape {truth.shape} != SEG shape {labels.shape}")
    rows = []
    structures = [
        ("Right lung", truth == LABELS["right_lung"], 0.0),
        ("Left lung", truth == LABELS["left_lung"], 0.0),
    ]
    for i, t in enumerate(meta["tumours"], 1):
        structures.append((f"Tumour (truth {i})", truth == t["label"], 2 * t["radius_mm"]))
    for name, mask, diameter in structures:
        overlaps = {n: int(np.logical_and(mask, labels == n).sum()) for n in names}
        best = max(overlaps, key=lambda n: overlaps[n]) if overlaps else None
        if best is None or overlaps[best] == 0:
            rows.append(Comparison(name, "missed", mask.sum() * voxel_ml, 0.0, 0.0, diameter))
            continue
        found = labels == best
        rows.append(
            Comparison(
                name,
                names[best],
                float(mask.sum()) * voxel_ml,
                float(found.sum()) * voxel_ml,
                dice(mask, found),
                diameter,
            )
        )
    return rows
