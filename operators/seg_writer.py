"""SEG writer: a :class:`SegmentationResult` → a DICOM Segmentation of the source CT series.

One segment per finding (right lung, left lung, each tumour), coded from CID 7150/7151 so
viewers and downstream tools can tell what a segment is without reading its label, with the
algorithm identified per segment (AUTOMATIC, CID 7162 "Artificial Intelligence") and in the
Contributing Equipment Sequence (IHE AI Results). Frames are pixel-aligned to the source
images and referenced from them (highdicom fills the Derivation Image Sequence).

BINARY (1 bit per pixel, one frame per segment and slice) is the default because every SEG
viewer reads it; LABELMAP (Label Map Segmentation Storage, one frame per slice) is smaller but
newer (2024) and fewer viewers read it yet.

The output is deterministic: the same inputs give byte-identical files. Nothing in it comes
from the clock or a random UID (highdicom stamps both; they are overwritten here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radfusion.logs import uid_tag
from radfusion.operators.result_identity import (
    algorithm_equipment,
    content_datetime,
    detached_copy,
    drop_clock_stamps,
    finding_concept,
    finding_laterality,
    fit_lo,
    general_equipment,
    save_atomically,
    with_type2_attributes,
)
from radfusion.operators.results import AlgorithmInfo, Finding, SegmentationResult

__all__ = ["SERIES_NUMBER", "build_seg", "write_seg"]

SERIES_NUMBER = 901  # high, so the SEG sorts after the acquired series in viewers

_LUNG_COLOURS = {"right": (100, 180, 255), "left": (100, 255, 180)}  # RGB
_TUMOUR_COLOURS = ((255, 60, 60), (255, 160, 0), (255, 0, 200), (255, 230, 0))


def build_seg(
    source_images: Sequence[Dataset],
    result: SegmentationResult,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    labelmap: bool = False,
    frame_numbers: Sequence[int] | None = None,
) -> hd.seg.Segmentation:
    """Build the SEG for ``result`` on ``source_images`` (not written anywhere).

    ``source_images`` holds the datasets ``result.labels`` is aligned with (metadata suffices;
    pixel data is not read):

    * single-frame images: one per slice, in the label map's ``k`` order;
    * one multi-frame image (Enhanced CT): once, or repeated once per slice as in
      :attr:`Volume.source_images`. ``frame_numbers[k]`` is the 1-based frame that slice ``k``
      lies on (:attr:`Volume.frame_numbers`); without it the frames are ordered along the
      slice normal, as :func:`assemble_volume` orders them.

    Same study as the source, series number 901, instance 1, SeriesDescription
    ``algorithm.describe("Lung and nodule segments")``. ``labelmap`` selects Label Map
    Segmentation Storage instead of a BINARY Segmentation. Sources without optional or Type 2
    attributes (patient name, study ID, series number, …) are fine; the caller's datasets are
    not modified.

    Raises:
        ValueError: ``result`` has no findings (a SEG needs at least one segment); the label
            map holds a value no finding describes; the label map does not match the sources
            (slice count, matrix size, frame numbers); the sources mix several multi-frame
            images or repeat a single-frame image; a finding's kind or side is unknown.
    """
    if not result.findings:
        raise ValueError(
            "no findings: a SEG needs at least one segment (write only an SR for this result)"
        )
    labels = np.asarray(result.labels)
    stray = _stray_labels(labels, {f.segment_number for f in result.findings})
    if stray:
        raise ValueError(f"label map values {stray} have no finding describing them")
    sources, pixel_array = _align(source_images, labels, frame_numbers)
    first = with_type2_attributes(sources[0])
    sources = _with_slice_thickness([first, *sources[1:]])
    first = sources[0]
    date, time = content_datetime(first)
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        source=algorithm.manufacturer,
        parameters=dict(algorithm.parameters) or None,
    )
    descriptions = [_segment(f, algorithm_id) for f in result.findings]
    description = fit_lo(algorithm.describe("Lung and nodule segments"))
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.LABELMAP
            if labelmap
            else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        **general_equipment(algorithm),
        content_description=description,
        content_label="LUNG_CT_SEG",
        series_description=description,
        transfer_syntax_uid=ExplicitVRLittleEndian,  # every reader has it; BINARY is 1 bit
        omit_empty_frames=True,
        contributing_equipment=[algorithm_equipment(algorithm)],
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
    )
    _make_deterministic(seg, sop_instance_uid)
    return seg


def write_seg(
    source_images: Sequence[Dataset],
    result: SegmentationResult,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    labelmap: bool = False,
    path: Path,
    frame_numbers: Sequence[int] | None = None,
) -> Path:
    """Build the SEG (see :func:`build_seg`) and write it to ``path`` as a DICOM file.

    The file appears complete or not at all (written beside it, then renamed), so an exporter
    watching the folder never sends half a SEG.

    Raises:
        ValueError: as :func:`build_seg`.
        OSError: the file cannot be written.
    """
    seg = build_seg(
        source_images,
        result,
        algorithm,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        labelmap=labelmap,
        frame_numbers=frame_numbers,
    )
    return save_atomically(seg, path)


def _stray_labels(labels: np.ndarray, described: set[int]) -> list[int]:
    """The non-zero values of ``labels`` that no segment number in ``described`` names
    (compared as ``int(value)``), sorted."""
    # The usual case, segment numbers 1..N: an integer map within [0, N] has no stray value.
    # min and max are two cheap passes; np.unique hashes all 75 M voxels of a 300-slice 512²
    # map (0.1-0.9 s on these machines), so it is left for maps that fail the check.
    if (
        labels.size
        and labels.dtype.kind in "ui"
        and described == set(range(1, len(described) + 1))
        and int(labels.min()) >= 0
        and int(labels.max()) <= len(described)
    ):
        return []
    return sorted(int(v) for v in np.unique(labels) if v != 0 and int(v) not in described)


# -- source alignment ---------------------------------------------------------------------------


def _align(
    source_images: Sequence[Dataset],
    labels: np.ndarray,
    frame_numbers: Sequence[int] | None,
) -> tuple[list[Dataset], np.ndarray]:
    """The distinct source datasets and the pixel array in the order highdicom expects: one
    plane per source image, or one per frame of a single multi-frame image."""
    if len(source_images) == 0:
        raise ValueError("no source images")
    distinct: list[Dataset] = []
    seen: set[int] = set()
    for ds in source_images:  # by identity (pydicom datasets are not hashable); linear time
        if id(ds) not in seen:
            seen.add(id(ds))
            distinct.append(ds)
    slices, rows, columns = labels.shape
    for ds in distinct:
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise ValueError(
                f"label map is {rows}x{columns} but source image "
                f"{uid_tag(str(ds.get('SOPInstanceUID', '')))} "
                f"is {ds.Rows}x{ds.Columns}"
            )
    multi = [ds for ds in distinct if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if not multi:
        if len(distinct) != len(source_images):
            raise ValueError("a single-frame source image appears more than once")
        if len(distinct) != slices:
            raise ValueError(
                f"label map has {slices} slices but there are {len(distinct)} source images"
            )
        if frame_numbers is not None and any(int(n) != 1 for n in frame_numbers):
            raise ValueError("frame numbers other than 1 given for single-frame images")
        return distinct, labels
    if len(distinct) > 1:
        raise ValueError(
            "source images must be one multi-frame image or single-frame images only "
            f"({len(multi)} multi-frame among {len(distinct)} images)"
        )
    ds = distinct[0]
    n_frames = int(ds.NumberOfFrames)
    numbers = [int(n) for n in frame_numbers] if frame_numbers is not None else _frame_order(ds)
    if len(numbers) != slices:
        raise ValueError(f"label map has {slices} slices but {len(numbers)} frame numbers")
    if len(set(numbers)) != len(numbers) or not all(1 <= n <= n_frames for n in numbers):
        raise ValueError(f"frame numbers must be distinct and within 1..{n_frames}")
    # highdicom maps plane i of the array to frame i + 1 of a multi-frame source.
    planes = np.zeros((n_frames, rows, columns), dtype=labels.dtype)
    planes[np.asarray(numbers) - 1] = labels
    return [ds], planes


def _with_slice_thickness(sources: list[Dataset]) -> list[Dataset]:
    """``sources``, the first replaced by a copy with Slice Thickness = the spacing between
    the slices when it has none. Slice Thickness is Type 2 in CT (empty or absent is valid)
    but Type 1C in the SEG's Pixel Measures, which highdicom copies from the first source."""
    first = sources[0]
    if len(sources) < 2 or first.get("SliceThickness") not in (None, ""):
        return sources
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    along = np.sort([float(normal @ np.asarray(ds.ImagePositionPatient)) for ds in sources])
    first = detached_copy(first)
    first.SliceThickness = round(float(np.median(np.diff(along))), 6)
    return [first, *sources[1:]]


def _frame_order(ds: Dataset) -> list[int]:
    """1-based frame numbers of a multi-frame image sorted along the slice normal (the order
    :func:`assemble_volume` gives its slices)."""
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != int(ds.NumberOfFrames):
        raise ValueError("multi-frame source without one per-frame functional group per frame")

    def item(frame: Dataset, sequence: str) -> Dataset | None:
        for groups in (frame, shared):
            if sequence in groups and len(groups[sequence].value):
                return groups[sequence].value[0]
        return None

    along = []
    for frame in per_frame:
        orientation = item(frame, "PlaneOrientationSequence")
        position = item(frame, "PlanePositionSequence")
        if orientation is None or position is None:
            raise ValueError("multi-frame source lacks plane orientation or position")
        iop = np.asarray(orientation.ImageOrientationPatient, dtype=float)
        along.append(float(np.cross(iop[:3], iop[3:]) @ np.asarray(position.ImagePositionPatient)))
    return [int(i) + 1 for i in np.argsort(along, kind="stable")]


# -- content ------------------------------------------------------------------------------------


def _segment(
    finding: Finding, algorithm_id: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    laterality = finding_laterality(finding)
    concept = finding_concept(finding)  # the kind is "lung" or "tumour" from here on
    if finding.kind == "lung":
        colour = _LUNG_COLOURS[finding.side]
    else:
        colour = _TUMOUR_COLOURS[(finding.segment_number - 1) % len(_TUMOUR_COLOURS)]
    description = hd.seg.SegmentDescription(
        segment_number=finding.segment_number,
        segment_label=finding.tracking_id,
        segmented_property_category=concept.category,
        segmented_property_type=concept.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_id,
        tracking_id=finding.tracking_id,
        tracking_uid=finding.tracking_uid,
        anatomic_regions=[codes.SCT.Lung] if finding.kind == "tumour" else None,
        display_color=hd.color.CIELabColor.from_rgb(*colour),
    )
    if finding.kind == "lung":
        # Which lung: the type stays "Lung" (CID 7151) with laterality as its modifier
        # (CID 244), the pattern CID 7151 expects for paired organs.
        description.SegmentedPropertyTypeCodeSequence[
            0
        ].SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(laterality)]
    else:
        # Where the tumour is: the lung that holds it.
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            hd.sr.CodedConcept.from_code(laterality)
        ]
    return description


# -- determinism --------------------------------------------------------------------------------


def _make_deterministic(seg: hd.seg.Segmentation, sop_uid: str) -> None:
    """Replace what highdicom takes from the clock or a random UID."""
    drop_clock_stamps(seg)
    # The dimension organization UID is random; derive it from the SOP instance instead.
    dim_uid = str(generate_uid(entropy_srcs=[sop_uid, "dimension-organization"]))
    for sequence in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(sequence) or []:
            if "DimensionOrganizationUID" in item:
                item.DimensionOrganizationUID = dim_uid
