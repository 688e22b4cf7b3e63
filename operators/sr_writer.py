"""SR writer: a :class:`SegmentationResult` → a TID 1500 Measurement Report (Comprehensive 3D SR).

One TID 1411 Volumetric ROI group per finding (right lung, left lung, each tumour), each
pointing at its segment in the SEG and holding the finding's volume (mm³ and mL), longest
axial diameter ("Long axis") and mean and SD of attenuation (HU), with the algorithm
identified (TID 4019) on the group and on every measurement.

Each finding also gets a TID 1501 Measurement Group with the same Tracking Unique Identifier,
placed before it, that a viewer can draw and track: its first (only) NUM is the longest axial
diameter ("Long axis", mm), INFERRED FROM a 2D SCOORD two-point POLYLINE (TID 300 row 8, TID
320) from one end of the diameter to the other (both points equal when the ends coincide),
SELECTED FROM the CT image the diameter lies in (for an Enhanced CT, the image and its frame
number); a TEXT "Comment" (TID 1501 row 12) names the finding for people, e.g. "Tumour 1, left
lung, mean -20 HU". The end points (LPS mm) are projected into the pixel grid of each source
plane (Image Position/Orientation (Patient) and Pixel Spacing, per frame from the functional
groups for a multi-frame image), the plane within a quarter of a slice gap is taken, and points
on no plane or outside the image raise ``ValueError``. Coordinates are (column, row) with
0.0\\0.0 at the top left corner of the top left pixel (PS3.3 Table C.18.6-1), so a voxel centre
(r, c) is (c + 0.5, r + 0.5).

Why this shape (OHIF 3.13, extensions/cornerstone-dicom-sr with @cornerstonejs/adapters 5.6):
OHIF merges groups by Tracking Unique Identifier; it loads ("rehydrates") a finding into its
Measurements panel only when the group's Tracking Identifier names a Cornerstone tool
(``Cornerstone3DTools@^0.1.0:Length``) and the group's first NUM carries the SCOORD as its
INFERRED FROM child (a group-level TID 1410 Image Region is drawn but never loaded, and makes
OHIF list every merged NUM as a label, "Long axis" twice and HU as ``[hnsf'U]``); it labels the
measurement with the group's Comment, and shows only the length with its unit, so the mean HU
goes in the label. Every Tracking UID needs a SCOORD somewhere: OHIF fails to open an SR with a
merged group without one. Its stack SR viewport draws only 2D SCOORD, which names its image; a
SCOORD3D line was parsed but not drawn. The TID 1411 group keeps the readable Tracking
Identifier ("Tumour 1"). See tests/viewer/.

A study the app could not measure (``result`` None, ``out_of_scope_reason`` given) gets an SR
with no measurement groups at all: TID 1500's "Qualitative Evaluations" container holds the
reason as text. No finding is ever invented for it.

``statements`` (e.g. whether the patient's clinical and genomic data could be fetched, and why
not) go into the same "Qualitative Evaluations" container (TID 1500 row 12, after the
measurements), each a TEXT "Comment" (row 14), with the algorithm (row 12b).

The output is deterministic: the same inputs give byte-identical files. Nothing in it comes
from the clock (highdicom stamps it in a few places; they are replaced or dropped here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from radfusion.logs import uid_tag
from radfusion.operators.change import Comparison, NoduleChange
from radfusion.operators.result_identity import (
    algorithm_device_uid,
    algorithm_equipment,
    algorithm_serial_number,
    content_datetime,
    drop_clock_stamps,
    finding_concept,
    finding_laterality,
    fit_lo,
    general_equipment,
    save_atomically,
    with_type2_attributes,
)
from radfusion.operators.results import AlgorithmInfo, Finding, SegmentationResult

__all__ = [
    "PRIVATE_SCHEME",
    "SERIES_NUMBER",
    "VIEWER_TRACKING_IDENTIFIER",
    "algorithm_identification",
    "algorithm_report",
    "build_sr",
    "declare_private_scheme",
    "distinct_sources",
    "finding_label",
    "image_library",
    "observation_context",
    "write_sr",
]

SERIES_NUMBER = 902  # after the SEG (901), so results sort after the acquired series

# Procedure reported (TID 1500 row 4, CID 100, extensible). LOINC radiology procedure codes:
# "CT Chest" when lungs were found; the input of an out-of-scope study may not be a chest CT,
# so that SR says only "CT unspecified body region" (CID 100's own entry).
CT_CHEST = Code("24627-2", "LN", "CT Chest")
CT_UNSPECIFIED = codes.cid100.CTUnspecifiedBodyRegion  # LN 25045-6

# Measurement concepts (CID 7469 "Generic Intensity and Size Measurements") and units (UCUM).
_VOLUME = codes.SCT.Volume  # 118565006
_LONG_AXIS = codes.SCT.LongAxis  # 103339001: the longest diameter in the axial plane (RECIST)
_ATTENUATION = codes.DCM.AttenuationCoefficient  # 112031, with a CID 7464 derivation:
_MEAN = codes.SCT.Mean  # 373098007
_SD = codes.SCT.StandardDeviation  # 386136009
_MM3 = codes.UCUM.CubicMillimeter
_ML = Code("ml", "UCUM", "milliliter")
_MM = codes.UCUM.Millimeter
_HU = codes.UCUM.HounsfieldUnit  # [hnsf'U]
# The detector's score for a nodule, in [0, 1]: a ranking score, not a calibrated probability.
_DETECTION_SCORE = codes.DCM.CertaintyOfFinding  # 111012
_NO_UNITS = Code("1", "UCUM", "no units")
_SOURCE_SERIES_FOR_SEGMENTATION = codes.DCM.SourceSeriesForSegmentation  # 121232

# TID 1500 rows 12 and 14: with no measurement groups the report holds this container instead.
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
_COMMENT = codes.DCM.Comment  # 121106
# The Tracking Identifier OHIF (@cornerstonejs/adapters) loads a two-point line with.
VIEWER_TRACKING_IDENTIFIER = "Cornerstone3DTools@^0.1.0:Length"
_ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")

# Concepts without a standard code: radfusion's private scheme, declared in each SR using it.
PRIVATE_SCHEME = "99RADFUSION"
_VOLUME_DOUBLING_TIME = Code("RF0101", PRIVATE_SCHEME, "Volume doubling time")
_VOLUME_CHANGE = codes.DCM.FractionalChange  # 125314, of the volume, in per cent
# Each nodule's status against the prior, coded (also said in the text statements).
_CHANGE_SINCE_PRIOR = Code("RF0110", PRIVATE_SCHEME, "Nodule status since prior CT")
_CHANGE_STATUS = {
    "matched": Code("RF0111", PRIVATE_SCHEME, "Present on prior CT"),
    "new": Code("RF0112", PRIVATE_SCHEME, "New since prior CT"),
    "not found": Code("RF0113", PRIVATE_SCHEME, "Prior nodule not found again"),
}
_DAYS = Code("d", "UCUM", "day")
_PERCENT = Code("%", "UCUM", "percent")

_SEGMENTATION_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
}


def build_sr(
    source_images: Sequence[Dataset],
    seg: Dataset | None,
    result: SegmentationResult | None,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    out_of_scope_reason: str | None = None,
    statements: Sequence[str] = (),
    comparison: Comparison | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report for one processed CT series (not written).

    With a ``comparison`` to a prior CT, each nodule's TID 1411 group also holds its status
    (``99RADFUSION`` RF0110: RF0111 present on the prior, RF0112 new) and, when matched, its
    volume change (DCM Fractional Change, %) and volume doubling time (RF0101, days); each
    prior nodule not found again is an RF0110 = RF0113 CODE in the report's Qualitative
    Evaluations (the scheme is declared), and the report cites the prior's images in its
    Pertinent Other Evidence Sequence.

    With ``result``: one TID 1411 group per finding referencing its segment in ``seg`` (the SEG
    written for the same result), after one TID 1501 group per finding with the diameter
    inferred from a SCOORD line on the source image (and frame) it lies in, and its label.
    Without (``result`` None): ``out_of_scope_reason`` is required, ``seg`` may be None (it is
    ignored), and the report has no measurement groups, only the reason. ``statements`` are
    added as text to the report's Qualitative Evaluations.

    ``source_images`` are the series' datasets (metadata suffices; a dataset repeated per frame,
    as in :attr:`Volume.source_images`, is referenced once). Same study as the sources, series
    number 902, instance 1, SeriesDescription saying what it holds (``AlgorithmInfo.describe``),
    complete, unverified and preliminary (an algorithm's output is never the definitive
    report). Sources without optional or Type 2 attributes (patient name, accession number,
    series number, …) are fine; the caller's datasets are not modified.

    Raises:
        ValueError: no source images, or sources from several studies or without SOP
            Instance/Class UIDs; both or neither of ``result`` and ``out_of_scope_reason``; an
            empty statement; a
            result without findings or without ``seg``; ``seg`` is not a Segmentation of the
            sources' study or lacks a finding's segment number; a finding of unknown kind or
            side; with a result, a source without image position, orientation, pixel spacing
            or matrix size, or a diameter end point that lies on no source image (off every
            plane by a quarter of a slice gap or more, or outside the image).
    """
    sources = distinct_sources(source_images)
    if (result is None) == (out_of_scope_reason is None):
        raise ValueError("give exactly one of result and out_of_scope_reason")
    if not all(text.strip() for text in statements):
        raise ValueError("a statement must have text")
    study_uid = str(sources[0].StudyInstanceUID)
    first = with_type2_attributes(sources[0])
    evidence: list[Dataset] = [first, *sources[1:]]
    observer = observation_context(algorithm)
    algorithm_id = algorithm_identification(algorithm)
    library = image_library(sources)
    content: hd.sr.ContentSequence
    if result is not None:
        if not result.findings:
            raise ValueError("result has no findings: pass out_of_scope_reason instead")
        if seg is None:
            raise ValueError("a result needs its SEG: the measurement groups reference segments")
        _check_seg(seg, study_uid, result)
        planes = _planes(sources)
        source_series = _source_series(str(sources[0].SeriesInstanceUID))
        groups: list[
            hd.sr.MeasurementsAndQualitativeEvaluations
            | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        ] = []
        changes = {}
        if comparison is not None:
            changes = {
                c.tracking_id: (c, comparison.interval_days)
                for c in comparison.changes
                if c.status in ("matched", "new")
            }
        for finding in result.findings:
            # The drawable group first: OHIF takes a merged finding's Tracking Identifier (the
            # tool it loads it with) from the first group of its Tracking UID.
            groups.append(_diameter_group(finding, planes, algorithm_id))
            groups.append(
                _volumetric_group(
                    finding, seg, source_series, algorithm_id, changes.get(finding.tracking_id)
                )
            )
        report = hd.sr.MeasurementReport(
            observation_context=observer,
            procedure_reported=CT_CHEST,
            imaging_measurements=groups,
        )
        # The image library belongs before the measurements (TID 1500 row 5 precedes row 6).
        root = report[0]
        root.ContentSequence.insert(len(root.ContentSequence) - 1, library)
        gone = [c for c in comparison.changes if c.status == "not found"] if comparison else []
        if statements or gone:
            root.ContentSequence.append(
                _qualitative_evaluations(algorithm_id, statements, not_found_again=len(gone))
            )
        content = report
        evidence.append(seg)
    else:
        content = _out_of_scope_report(
            observer,
            algorithm_id,
            library,
            [f"No findings reported: {out_of_scope_reason}", *statements],
        )
    sr = algorithm_report(
        content[0],
        evidence,
        algorithm,
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        holds="Lung nodule measurements" if result is not None else "Lung CT not analysed",
    )
    if comparison is not None and result is not None:
        if comparison.changes:
            declare_private_scheme(sr)
        if comparison.evidence:
            sr.PertinentOtherEvidenceSequence = [_prior_evidence(comparison)]
    return sr


def declare_private_scheme(sr: Dataset) -> None:
    """Declare ``99RADFUSION`` in the SR's Coding Scheme Identification Sequence."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "radfusion concepts without a standard code"
    scheme.CodingSchemeResponsibleOrganization = "radfusion project"
    schemes = list(sr.get("CodingSchemeIdentificationSequence") or [])
    sr.CodingSchemeIdentificationSequence = [*schemes, scheme]


def _prior_evidence(comparison: Comparison) -> Dataset:
    """The prior study's images compared with, as a Hierarchical SOP Instance Reference."""
    series = Dataset()
    series.SeriesInstanceUID = comparison.SeriesInstanceUID
    items = []
    for sop_class, sop_instance in comparison.evidence:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    series.ReferencedSOPSequence = items
    study = Dataset()
    study.StudyInstanceUID = comparison.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    return study


def algorithm_report(
    content: Dataset,
    evidence: Sequence[Dataset],
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    holds: str,
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR of ``content`` by ``algorithm`` about ``evidence`` (the first
    the study's header, with its Type 2 attributes): instance 1, complete, unverified and
    preliminary, the algorithm's equipment and series description, dated from the study,
    nothing from the clock (the same inputs give the same bytes)."""
    date, time = content_datetime(evidence[0])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        **general_equipment(algorithm),
        series_description=fit_lo(algorithm.describe(holds)),
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[algorithm_equipment(algorithm)],
        content_date=date,
        content_time=time,
    )
    drop_clock_stamps(sr)
    return sr


def write_sr(
    source_images: Sequence[Dataset],
    seg: Dataset | None,
    result: SegmentationResult | None,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    out_of_scope_reason: str | None = None,
    statements: Sequence[str] = (),
    path: Path,
) -> Path:
    """Build the SR (see :func:`build_sr`) and write it to ``path`` as a DICOM file.

    The file appears complete or not at all (written beside it, then renamed), so an exporter
    watching the folder never sends half an SR.

    Raises:
        ValueError: as :func:`build_sr`.
        OSError: the file cannot be written.
    """
    sr = build_sr(
        source_images,
        seg,
        result,
        algorithm,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        out_of_scope_reason=out_of_scope_reason,
        statements=statements,
    )
    return save_atomically(sr, path)


# -- inputs -------------------------------------------------------------------------------------


def distinct_sources(source_images: Sequence[Dataset]) -> list[Dataset]:
    """The sources, each SOP instance once, in order; checked to be one study."""
    sources: dict[str, Dataset] = {}
    for ds in source_images:
        uid, sop_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
        if not uid or not sop_class:
            raise ValueError("a source image has no SOP Instance UID or SOP Class UID")
        sources.setdefault(str(uid), ds)
    if not sources:
        raise ValueError("no source images: an SR needs the images it reports on")
    studies = {str(ds.get("StudyInstanceUID") or "") for ds in sources.values()}
    if len(studies) != 1 or "" in studies:
        raise ValueError(
            "source images must share one Study Instance UID, got "
            + ", ".join(uid_tag(u) for u in sorted(studies))
        )
    return list(sources.values())


def _check_seg(seg: Dataset, study_uid: str, result: SegmentationResult) -> None:
    """Refuse a SEG the groups could not resolve to: never reference a segment that isn't."""
    if str(seg.get("SOPClassUID", "")) not in _SEGMENTATION_SOP_CLASSES:
        raise ValueError(f"seg is not a Segmentation (SOP Class {seg.get('SOPClassUID')})")
    if str(seg.get("StudyInstanceUID", "")) != study_uid:
        raise ValueError("seg belongs to another study than the source images")
    numbers = {int(item.SegmentNumber) for item in seg.get("SegmentSequence") or []}
    missing = [f.segment_number for f in result.findings if f.segment_number not in numbers]
    if missing:
        raise ValueError(f"seg has no segment(s) {missing} for the result's findings")


# -- content ------------------------------------------------------------------------------------


def observation_context(algorithm: AlgorithmInfo) -> hd.sr.ObservationContext:
    """TID 1001: the algorithm is the observer (a device, TID 1004), not a person."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm_device_uid(algorithm),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=algorithm.name,
        serial_number=algorithm_serial_number(algorithm),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019; parameters as "name=value" texts (the template holds free text)."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"{k}={v}" for k, v in algorithm.parameters] or None,
        manufacturer=algorithm.manufacturer,
    )


def image_library(sources: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 with one group of plain image references (descriptors are optional).

    highdicom's ImageLibrary describes each image from top-level geometry attributes, which an
    Enhanced CT keeps in functional groups and a CT may leave empty; references alone cannot
    fail. Older OHIF versions fail on a report without an image library.
    """
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    group.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.ImageContentItem(
                name=Code("260753009", "SCT", "Source"),
                referenced_sop_class_uid=str(ds.SOPClassUID),
                referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for ds in sources
        ]
    )
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _finding_codes(finding: Finding) -> tuple[Code, Code, hd.sr.FindingSite]:
    """Finding type, category and site: the type and category the SEG gives the segment, so SR
    group and SEG segment describe the structure alike."""
    concept = finding_concept(finding)
    laterality = finding_laterality(finding)
    # A lung's site is itself; a tumour's is the lung that holds it. Laterality (CID 244)
    # qualifies "Lung", the pattern DICOM uses for paired organs.
    site = hd.sr.FindingSite(anatomic_location=codes.cid7151.Lung, laterality=laterality)
    return concept.type, concept.category, site


def _source_series(series_instance_uid: str) -> hd.sr.SourceSeriesForSegmentation:
    """TID 1411 row 12 with the code meaning PS3.16 gives (121232, DCM, "Source series for
    segmentation"); highdicom 0.28 capitalises it, which validators report as a mismatch."""
    item = hd.sr.SourceSeriesForSegmentation(series_instance_uid)
    item.ConceptNameCodeSequence[0].CodeMeaning = _SOURCE_SERIES_FOR_SEGMENTATION.meaning
    return item


def _tracking(finding: Finding) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(identifier=finding.tracking_id, uid=finding.tracking_uid)


def _long_axis(finding: Finding, algorithm_id: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=_LONG_AXIS,
        value=finding.longest_axial_diameter_mm,
        unit=_MM,
        algorithm_id=algorithm_id,
    )


def _volumetric_group(
    finding: Finding,
    seg: Dataset,
    source_series: hd.sr.SourceSeriesForSegmentation,
    algorithm_id: hd.sr.AlgorithmIdentification,
    change: tuple[NoduleChange, int] | None = None,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for one finding, its ROI being the finding's segment in the SEG; with its
    ``change`` since the prior (and the interval in days) when there was a comparison: its
    status (present on the prior or new) and, when matched, the volume's change in per cent
    and its doubling time (when it grew)."""
    kind, category, site = _finding_codes(finding)
    # Built directly rather than with ReferencedSegment.from_segmentation, which reads per-frame
    # segment numbers that a Label Map SEG does not have.
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=finding.segment_number,
        source_series=source_series,
    )
    measurements = [
        hd.sr.Measurement(
            name=_VOLUME, value=finding.volume_mm3, unit=_MM3, algorithm_id=algorithm_id
        ),
        hd.sr.Measurement(
            name=_VOLUME, value=finding.volume_ml, unit=_ML, algorithm_id=algorithm_id
        ),
        _long_axis(finding, algorithm_id),
        hd.sr.Measurement(
            name=_ATTENUATION,
            value=finding.mean_hu,
            unit=_HU,
            derivation=_MEAN,
            algorithm_id=algorithm_id,
        ),
        hd.sr.Measurement(
            name=_ATTENUATION,
            value=finding.sd_hu,
            unit=_HU,
            derivation=_SD,
            algorithm_id=algorithm_id,
        ),
    ]
    if finding.detection_score is not None:
        measurements.append(
            hd.sr.Measurement(
                name=_DETECTION_SCORE,
                value=round(finding.detection_score, 3),
                unit=_NO_UNITS,
                algorithm_id=algorithm_id,
            )
        )
    evaluations = []
    if change is not None:
        nodule, interval_days = change
        evaluations.append(
            hd.sr.QualitativeEvaluation(_CHANGE_SINCE_PRIOR, _CHANGE_STATUS[nodule.status])
        )
        percent = nodule.volume_change_percent
        if percent is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=_VOLUME_CHANGE,
                    value=round(percent, 1),
                    unit=_PERCENT,
                    algorithm_id=algorithm_id,
                )
            )
        doubling = nodule.doubling_time_days(interval_days)
        if doubling is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=_VOLUME_DOUBLING_TIME,
                    value=round(doubling, 1),
                    unit=_DAYS,
                    algorithm_id=algorithm_id,
                )
            )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding),
        referenced_segment=segment,
        finding_type=kind,
        finding_category=category,
        finding_sites=[site],
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def finding_label(finding: Finding) -> str:
    """What a viewer shows for a finding: which one, where, and its mean attenuation, e.g.
    "Tumour 1, left lung, mean -20 HU" or "Right lung, mean -853 HU"."""
    where = "" if finding.kind == "lung" else f", {finding.side} lung"
    return f"{finding.tracking_id}{where}, mean {finding.mean_hu:.0f} HU"


def _diameter_group(
    finding: Finding, planes: Sequence[_Plane], algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for a finding: its longest axial diameter, inferred from a SCOORD line on the
    CT image it lies in, and its label, so viewers draw, list and track it."""
    kind, category, site = _finding_codes(finding)
    long_axis = hd.sr.Measurement(
        name=_LONG_AXIS,
        value=finding.longest_axial_diameter_mm,
        unit=_MM,
        algorithm_id=algorithm_id,
        referenced_coordinates=[_diameter_coordinates(finding, planes)],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        # The finding's Tracking UID (OHIF merges the groups of one UID into one annotation),
        # with the identifier of the Cornerstone tool that loads a two-point line.
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=VIEWER_TRACKING_IDENTIFIER, uid=finding.tracking_uid
        ),
        finding_type=kind,
        finding_category=category,
        finding_sites=[site],
        algorithm_id=algorithm_id,
        measurements=[long_axis],
    )
    # highdicom has no argument for a TEXT qualitative evaluation (TID 1501 row 12).
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=_COMMENT,
            value=finding_label(finding),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _diameter_coordinates(
    finding: Finding, planes: Sequence[_Plane]
) -> hd.sr.CoordinatesForMeasurement:
    """The longest axial diameter's ends as a two-point POLYLINE (two equal points when they
    coincide: a viewer's length tool needs two) in pixel coordinates of the source image (and
    frame) whose plane holds them."""
    ends = np.asarray(finding.diameter_endpoints_lps, dtype=float)
    located = [_locate(end, planes, finding.tracking_id) for end in ends]
    (plane, first), (other, second) = located
    if plane is not other:
        raise ValueError(
            f"{finding.tracking_id}: the diameter's end points lie on different source images"
            f" ({plane.describe()} and {other.describe()}); an axial diameter lies in one"
        )
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.stack([first, second]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(plane.dataset.SOPClassUID),
            referenced_sop_instance_uid=str(plane.dataset.SOPInstanceUID),
            referenced_frame_numbers=None if plane.frame is None else [plane.frame],
        ),
    )


# -- geometry -----------------------------------------------------------------------------------


_ON_PLANE = 0.25  # a point within this share of the slice gap of a plane lies on it


@dataclass(frozen=True, eq=False)
class _Plane:
    """One source image (or one frame of a multi-frame image) and its place in the patient."""

    dataset: Dataset
    frame: int | None  # 1-based frame number of a multi-frame image; None for single-frame
    position: np.ndarray  # Image Position (Patient): the centre of the top left pixel, LPS mm
    row_direction: np.ndarray  # along a row: increasing column index
    column_direction: np.ndarray  # down a column: increasing row index
    spacing: tuple[float, float]  # Pixel Spacing: (between rows, between columns), mm
    rows: int
    columns: int

    def describe(self) -> str:
        uid = uid_tag(str(self.dataset.SOPInstanceUID))
        return uid if self.frame is None else f"{uid} frame {self.frame}"


def _planes(sources: Sequence[Dataset]) -> list[_Plane]:
    """Every image plane of the sources: single-frame images from their Image Plane module,
    multi-frame images (Enhanced CT) frame by frame from their functional groups.

    Raises:
        ValueError: an image or frame lacks position, orientation, pixel spacing or matrix size.
    """
    planes = []
    for ds in sources:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        multi_frame = "NumberOfFrames" in ds or per_frame is not None
        frames = int(ds.get("NumberOfFrames") or 1)
        if multi_frame and (per_frame is None or len(per_frame) != frames):
            raise ValueError(
                f"source {uid_tag(str(ds.SOPInstanceUID))}: {frames} frames but "
                f"{len(per_frame or [])} per-frame functional group items"
            )
        for index in range(frames):
            item = per_frame[index] if per_frame is not None else None
            ipp = _geometry(ds, "ImagePositionPatient", "PlanePositionSequence", item)
            iop = _geometry(ds, "ImageOrientationPatient", "PlaneOrientationSequence", item)
            spacing = _geometry(ds, "PixelSpacing", "PixelMeasuresSequence", item)
            rows, columns = ds.get("Rows"), ds.get("Columns")
            if ipp is None or iop is None or spacing is None or not rows or not columns:
                frame = f" frame {index + 1}" if multi_frame else ""
                raise ValueError(
                    f"source {uid_tag(str(ds.SOPInstanceUID))}{frame} lacks image position,"
                    " orientation, pixel spacing or matrix size: the diameters cannot be placed"
                    " on it"
                )
            orientation = np.asarray(iop, dtype=float)
            planes.append(
                _Plane(
                    dataset=ds,
                    frame=index + 1 if multi_frame else None,
                    position=np.asarray(ipp, dtype=float),
                    row_direction=orientation[:3],
                    column_direction=orientation[3:],
                    spacing=(float(spacing[0]), float(spacing[1])),
                    rows=int(rows),
                    columns=int(columns),
                )
            )
    return planes


def _geometry(ds: Dataset, keyword: str, sequence: str, frame: Dataset | None) -> Any:
    """An attribute from the top level, else the frame's or the shared functional groups (its
    value as pydicom gives it: the type depends on the VR and the value multiplicity)."""
    if keyword in ds:
        return ds.get(keyword)
    for groups in (frame, *(ds.get("SharedFunctionalGroupsSequence") or [])):
        if groups is not None and sequence in groups and keyword in groups[sequence][0]:
            return groups[sequence][0].get(keyword)
    return None


def _locate(point: np.ndarray, planes: Sequence[_Plane], name: str) -> tuple[_Plane, np.ndarray]:
    """The plane holding ``point`` (LPS mm) and the point's SCOORD (column, row) on it.

    SCOORD pixel coordinates (PS3.3 Table C.18.6-1, Graphic Data) put 0.0\\0.0 at the top left
    corner of the top left pixel, so the centre of pixel (r, c) is (c + 0.5, r + 0.5); Image
    Position (Patient) is the centre of pixel (0, 0). The measurement's end points are voxel
    centres of the volume, which lie on a slice's plane up to the little irregularity in slice
    positions that the volume tolerates; a point counts as on a plane when it is within a
    quarter of the slice gap of it (a quarter of the slice thickness for a single plane), well
    clear of the neighbouring slices, so no point between slices is put on a guessed one.

    Raises:
        ValueError: the point is a quarter of a slice gap or more from every plane, or outside
            the image.
    """
    # As arrays: hundreds of planes, a dozen points per report.
    positions = np.array([p.position for p in planes])
    normals = np.cross([p.row_direction for p in planes], [p.column_direction for p in planes])
    offsets = point - positions
    distances = np.abs(np.einsum("ij,ij->i", offsets, normals))
    nearest = int(np.argmin(distances))  # the first of equals: deterministic
    plane, offset = planes[nearest], offsets[nearest]
    along = np.unique(np.round(positions @ normals[nearest], 6))
    if len(along) > 1:
        gap = float(np.diff(along).min())
    else:
        gap = float(plane.dataset.get("SliceThickness") or 1.0)
    tolerance = _ON_PLANE * gap
    where = "(" + ", ".join(f"{v:.2f}" for v in point) + ") mm"
    if distances[nearest] >= tolerance:
        raise ValueError(
            f"{name}: the diameter end point {where} lies on no source image (nearest:"
            f" {plane.describe()}, {distances[nearest]:.2f} mm off its plane)"
        )
    column = float(offset @ plane.row_direction) / plane.spacing[1] + 0.5
    row = float(offset @ plane.column_direction) / plane.spacing[0] + 0.5
    if not (0.0 <= column <= plane.columns and 0.0 <= row <= plane.rows):
        raise ValueError(
            f"{name}: the diameter end point {where} lies outside {plane.describe()}"
            f" (column {column:.1f}, row {row:.1f} of {plane.columns} x {plane.rows})"
        )
    return plane, np.array([column, row])


def _qualitative_evaluations(
    algorithm_id: hd.sr.AlgorithmIdentification,
    statements: Sequence[str],
    not_found_again: int = 0,
) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 "Qualitative Evaluations": the algorithm (row 12b), a CODE (row 13) per
    prior nodule not found again (the statements name them), and each statement as a TEXT
    "Comment" (row 14)."""
    evaluations = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [
            *algorithm_id,
            *(
                hd.sr.CodeContentItem(
                    name=_CHANGE_SINCE_PRIOR,
                    value=_CHANGE_STATUS["not found"],
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
                for _ in range(not_found_again)
            ),
            *(
                hd.sr.TextContentItem(
                    name=_COMMENT,
                    value=text,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
                for text in statements
            ),
        ]
    )
    return evaluations


def _out_of_scope_report(
    observation_context: hd.sr.ObservationContext,
    algorithm_id: hd.sr.AlgorithmIdentification,
    library: hd.sr.ContainerContentItem,
    statements: Sequence[str],
) -> hd.sr.ContentSequence:
    """TID 1500 without measurement groups (highdicom's MeasurementReport requires one): rows
    1-5, then row 12 "Qualitative Evaluations" with the reason and other statements."""
    root = hd.sr.ContainerContentItem(
        name=codes.cid7021.ImagingMeasurementReport,
        template_id="1500",
    )
    root.ContentSequence = hd.sr.ContentSequence(
        [
            # The language MeasurementReport sets by default, so both kinds of report agree.
            *hd.sr.LanguageOfContentItemAndDescendants(_ENGLISH),
            *observation_context,
            hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=CT_UNSPECIFIED,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
            library,
            _qualitative_evaluations(algorithm_id, statements),
        ]
    )
    return hd.sr.ContentSequence([root], is_root=True)
