"""How radfusion's result objects identify their algorithm, their content date and their coded
findings: shared by the SEG and SR writers, so a SEG and the SR that references it name the
same device, carry the same dates and code the same structure alike.

* The algorithm as equipment: :func:`algorithm_device_uid`, :func:`algorithm_serial_number`,
  the General Equipment attributes :func:`general_equipment` and the Contributing Equipment
  item :func:`algorithm_equipment` (IHE AI Results).
* The study as highdicom reads it: :func:`with_type2_attributes` (sparse source headers) and
  :func:`content_datetime` (dates from the source, never the clock).
* The findings as codes: :func:`finding_concept` (CID 7150 category, CID 7151 type) and
  :func:`finding_laterality` (CID 244).
* Determinism and value limits: :func:`drop_clock_stamps` and :func:`fit_lo`.
* Writing: :func:`write_atomically` and :func:`save_atomically` for DICOM (a result file
  appears complete or not at all).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypedDict

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from radfusion.operators.results import AlgorithmInfo, Finding

__all__ = [
    "LO_MAX",
    "FindingConcept",
    "GeneralEquipment",
    "algorithm_device_uid",
    "algorithm_equipment",
    "algorithm_serial_number",
    "content_datetime",
    "detached_copy",
    "drop_clock_stamps",
    "finding_concept",
    "finding_laterality",
    "fit_lo",
    "general_equipment",
    "save_atomically",
    "with_type2_attributes",
    "write_atomically",
]

LO_MAX = 64  # characters in an LO value (SeriesDescription, ContentDescription)

# Used when the source has no date at all: Content Date is Type 1 and the clock would make
# every run differ.
_FALLBACK_DATE, _FALLBACK_TIME = "19700101", "000000"
# Type 2 attributes highdicom copies from the first source by attribute access, so a source
# without them (seen from anonymisers and some converters) would raise AttributeError.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

_LATERALITY = {"right": codes.cid244.Right, "left": codes.cid244.Left}


class FindingConcept(NamedTuple):
    """What a finding is: its category (CID 7150) and type (CID 7151)."""

    category: Code
    type: Code


class GeneralEquipment(TypedDict):
    """highdicom's keyword arguments naming the device that made an instance."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str


# Neoplasm (SCT 108369006) is CID 7151's code for a tumour; a lesion whose nature the model
# cannot know would be "Mass", but this model is trained to find tumours. A lung is "Lung" on
# either side: which one is said by laterality (CID 244) as a modifier, the pattern DICOM uses
# for paired organs (there are no "Right lung" / "Left lung" concepts in any context group).
_CONCEPTS = {
    "lung": FindingConcept(codes.cid7150.AnatomicalStructure, codes.cid7151.Lung),
    "tumour": FindingConcept(
        codes.cid7150.MorphologicallyAbnormalStructure, codes.cid7151.Neoplasm
    ),
}


# -- the algorithm as equipment -----------------------------------------------------------------


def algorithm_device_uid(algorithm: AlgorithmInfo) -> str:
    """The algorithm's Device UID: the same name and version always give the same UID.

    Used for the Contributing Equipment item of the SEG and SR and the SR's device observer
    (TID 1004), so both name the same device.
    """
    return str(
        generate_uid(entropy_srcs=["radfusion-algorithm", algorithm.name, algorithm.version])
    )


def algorithm_serial_number(algorithm: AlgorithmInfo) -> str:
    """The algorithm's Device Serial Number, ``RF-`` and 16 hex digits.

    Software has no serial number; a digest of name and version is stable per build.
    """
    digest = hashlib.sha256(f"{algorithm.name}\0{algorithm.version}".encode()).hexdigest()
    return f"RF-{digest[:16].upper()}"


def general_equipment(algorithm: AlgorithmInfo) -> GeneralEquipment:
    """The algorithm as the device that made a SEG or SR (General Equipment module), as
    keyword arguments for highdicom's SOP classes: manufacturer, the algorithm's name as model
    name, its version as software versions, and :func:`algorithm_serial_number`."""
    return GeneralEquipment(
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm_serial_number(algorithm),
    )


def algorithm_equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    """The IHE AI Results Contributing Equipment item naming the algorithm.

    Purpose "Processing Equipment" (DCM 109102, CID 7005): it made a new instance from the
    source images; "Modifying Equipment" (109103) is for changing an instance in place. The
    contribution description is ``algorithm.series_description`` cut to an LO value.

    Raises:
        ValueError: the algorithm's manufacturer, name or version is not a valid LO value
            (highdicom checks them; longer than 64 characters, say).
    """
    item = hd.ContributingEquipment(
        **general_equipment(algorithm),
        purpose_of_reference=codes.cid7005.ProcessingEquipment,
        contribution_description=fit_lo(algorithm.series_description),
    )
    item.DeviceUID = algorithm_device_uid(algorithm)  # not a highdicom argument; allowed here
    return item


# -- the study as highdicom reads it ------------------------------------------------------------


def detached_copy(ds: Dataset) -> Dataset:
    """A new dataset holding the same elements, to which attributes can be added without
    touching ``ds`` (pydicom's ``Dataset.copy()`` shares the element dictionary)."""
    copy = Dataset()
    copy.update(ds)
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    return copy


def with_type2_attributes(ds: Dataset) -> Dataset:
    """``ds``, or a copy with the Type 2 attributes highdicom reads from a source added empty.

    Also empties a Patient's Sex other than M, F or O, which highdicom rejects. ``ds`` itself
    is never modified.
    """
    missing = [k for k in _TYPE2_FROM_SOURCE if k not in ds]
    sex = ds.get("PatientSex")
    bad_sex = sex not in (None, "", "M", "F", "O")  # highdicom rejects other values
    if not missing and not bad_sex:
        return ds
    copy = detached_copy(ds)
    for keyword in missing:
        setattr(copy, keyword, None)
    if bad_sex:
        copy.PatientSex = None
    return copy


def content_datetime(source: Dataset) -> tuple[str, str]:
    """Date and time (DA, TM) for a result's content and series: the source's, never the
    clock's, so re-running on the same study writes the same bytes.

    The first valid date of study, series, content and acquisition, with its time (without
    fractions; ``000000`` when missing or malformed); ``19700101``, ``000000`` when the source
    has no date at all.
    """
    for date_kw, time_kw in (
        ("StudyDate", "StudyTime"),
        ("SeriesDate", "SeriesTime"),
        ("ContentDate", "ContentTime"),
        ("AcquisitionDate", "AcquisitionTime"),
    ):
        date = str(source.get(date_kw) or "")
        if len(date) == 8 and date.isdigit():
            time = str(source.get(time_kw) or "").split(".")[0]
            if not (time.isdigit() and len(time) in (2, 4, 6)):
                time = _FALLBACK_TIME
            return date, time
    return _FALLBACK_DATE, _FALLBACK_TIME


# -- the findings as codes ----------------------------------------------------------------------


def finding_concept(finding: Finding) -> FindingConcept:
    """The category and type codes of ``finding``: Anatomical Structure / Lung for a lung,
    Morphologically Abnormal Structure / Neoplasm for a tumour.

    Raises:
        ValueError: the finding's kind is neither "lung" nor "tumour".
    """
    concept = _CONCEPTS.get(finding.kind)
    if concept is None:
        raise ValueError(f"finding {finding.tracking_id!r}: unknown kind {finding.kind!r}")
    return concept


def finding_laterality(finding: Finding) -> Code:
    """The laterality code (CID 244) of ``finding``'s side: the lung, or the lung that holds
    the tumour.

    Raises:
        ValueError: the finding's side is neither "right" nor "left".
    """
    laterality = _LATERALITY.get(finding.side)
    if laterality is None:
        raise ValueError(f"finding {finding.tracking_id!r}: unknown side {finding.side!r}")
    return laterality


# -- determinism and value limits ---------------------------------------------------------------


def fit_lo(text: str) -> str:
    """``text`` cut to an LO value (64 characters), keeping a trailing "(… not for clinical
    use)" notice; text that fits is returned as it is."""
    if len(text) <= LO_MAX:
        return text
    head, sep, notice = text.rpartition(" (")
    if sep and len(notice) + 5 < LO_MAX:
        return head[: LO_MAX - len(notice) - 5] + "... (" + notice
    return text[: LO_MAX - 3] + "..."


def drop_clock_stamps(ds: Dataset) -> None:
    """Remove, in place, what highdicom stamps from the clock on a SEG or SR.

    Instance Creation Date and Time (Type 3) are dropped rather than set to the study's time,
    and the Contribution DateTime of highdicom's own Contributing Equipment item is removed.
    """
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        if keyword in ds:
            delattr(ds, keyword)
    for item in ds.get("ContributingEquipmentSequence") or []:
        if item.get("ManufacturerModelName") == "highdicom" and "ContributionDateTime" in item:
            del item.ContributionDateTime


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write`` on a file beside ``path``, then rename it to ``path``, so an exporter
    watching the folder never picks up half a file.

    Raises:
        OSError: the file cannot be written (and whatever ``write`` raises).
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def save_atomically(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file at ``path`` (:func:`write_atomically`).

    Raises:
        OSError: the file cannot be written.
    """
    return write_atomically(path, lambda partial: ds.save_as(partial, enforce_file_format=True))
