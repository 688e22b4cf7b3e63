"""Fusion summary image: what the fusion SR says, as a Secondary Capture image (series 904).

The fusion SR (:mod:`radfusion.operators.fusion_sr`) is the record: coded, machine-readable,
citing its inputs. But OHIF 3.13 cannot open it (its one measurement group has no image
coordinates) and many PACS viewers show no SR content at all, while every viewer shows an
image. So the same result is also rendered as text on an image: progression risk with its
uncertainty and risk group, the EGFR estimate or the record's test, the inputs used and
missing (and why), each modality's contribution and the top inputs, and where the full
report is. It names the model, says it is a demonstration when it is one, and carries no
patient identifier in its pixels (Burned In Annotation NO).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from radfusion.operators.fusion import FusionResult
from radfusion.operators.fusion_sr import SERIES_NUMBER as FUSION_SR_SERIES
from radfusion.operators.fusion_sr import fusion_algorithm
from radfusion.operators.result_identity import (
    algorithm_equipment,
    content_datetime,
    drop_clock_stamps,
    fit_lo,
    general_equipment,
    save_atomically,
    with_type2_attributes,
)
from radfusion.operators.results import DEMONSTRATION_NOTICE
from radfusion.operators.sr_writer import distinct_sources

__all__ = ["SERIES_NUMBER", "build_fusion_summary", "summary_lines", "write_fusion_summary"]

SERIES_NUMBER = 904  # after the fusion SR (903)
_WIDTH, _HEIGHT = 1024, 768
_MARGIN = 40
_WRAP = 78  # characters per line at the body font size


def summary_lines(result: FusionResult) -> list[str]:
    """The summary's lines, title first (no PHI: no name, ID or date of the patient)."""
    model = result.model
    title = f"Fusion estimate: {model.name} {model.version}"
    if model.demonstration:
        title += f" ({DEMONSTRATION_NOTICE})"
    lines = [
        title,
        "",
        f"Progression within 12 months: {100 * result.progression_probability:.0f} % "
        f"± {100 * result.progression_sd:.0f} % (SD), {result.risk_group} risk",
        f"Progression-free time risk score: {result.risk_score:+.2f} ± {result.risk_sd:.2f} "
        "(higher: earlier progression)",
    ]
    egfr = result.egfr
    if egfr.tested:
        lines.append(f"EGFR: {egfr.status} (tested; from the patient record, not the model)")
    elif egfr.probability is not None and egfr.sd is not None:
        lines.append(
            f"EGFR mutation (not tested): {100 * egfr.probability:.0f} % ± {100 * egfr.sd:.0f} %"
        )
    if result.primary_volume_ml is not None:
        size = f"{result.primary_volume_ml:.1f} mL"
        if result.primary_diameter_mm is not None:
            size += f", {result.primary_diameter_mm:.0f} mm across"
        lines.append(f"Primary tumour (imaging input): {size}")
    lines.append("")
    lines.append(f"Inputs used: {', '.join(result.used) or 'none'}")
    for modality, why in sorted(result.missing.items()):
        lines.append(f"Missing: {modality}: {why}")
    modalities = ", ".join(f"{c.label} {c.log_odds:+.2f}" for c in result.modalities)
    lines.append(
        f"Contributions to the log-odds (baseline {result.baseline_log_odds:+.2f}): {modalities}"
    )
    top = ", ".join(f"{c.label} {c.log_odds:+.2f}" for c in result.top_features[:5])
    if top:
        lines.append(f"Top inputs: {top}")
    lines.append("")
    lines.append(
        f"The coded report, with its inputs and FHIR sources, is the fusion SR (series "
        f"{FUSION_SR_SERIES}). Run by: {result.served_by}."
    )
    return lines


def _render(lines: Sequence[str]) -> np.ndarray:
    """The lines as white text on black, RGB (rows, columns, 3), uint8."""
    image = Image.new("RGB", (_WIDTH, _HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    title_font = ImageFont.load_default(size=26)
    body_font = ImageFont.load_default(size=21)
    y = _MARGIN
    for i, line in enumerate(lines):
        font = title_font if i == 0 else body_font
        colour = (255, 210, 80) if i == 0 else (235, 235, 235)
        wrapped = textwrap.wrap(line, width=_WRAP if i else _WRAP - 10) or [""]
        for part in wrapped:
            if y > _HEIGHT - _MARGIN:
                break  # never happens with the lines above; the image must not grow
            draw.text((_MARGIN, y), part, fill=colour, font=font)
            y += 34 if i == 0 else 28
    return np.asarray(image, dtype=np.uint8)


def build_fusion_summary(
    source_images: Sequence[Dataset],
    result: FusionResult,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> hd.sc.SCImage:
    """The summary image for one analysed series (not written): same study as the sources,
    series 904, instance 1, dated from the study.

    Raises:
        ValueError: as :func:`radfusion.operators.sr_writer.distinct_sources`.
    """
    first = with_type2_attributes(distinct_sources(source_images)[0])
    algorithm = fusion_algorithm(result)
    equipment = general_equipment(algorithm)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=first,
        pixel_array=_render(summary_lines(result)),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=equipment["manufacturer"],
        patient_orientation=("L", "F"),  # unrelated to the patient: a page of text
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        contributing_equipment=[algorithm_equipment(algorithm)],
    )
    image.SeriesDescription = fit_lo(algorithm.describe("Fusion summary image"))
    image.ManufacturerModelName = equipment["manufacturer_model_name"]
    image.SoftwareVersions = equipment["software_versions"]
    image.DeviceSerialNumber = equipment["device_serial_number"]
    image.BurnedInAnnotation = "NO"  # text, but nothing that identifies the patient
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.ConversionType = "WSD"  # workstation: rendered, not scanned
    image.ImageComments = "Rendering of the fusion SR of this study (series 903)"
    date, time = content_datetime(first)
    # Dated like the other results, from the study, not the clock: same input, same bytes.
    # Laterality is Type 2C for a paired body part: both lungs, so empty.
    for keyword, value in {
        "Laterality": None,
        "ContentDate": date,
        "ContentTime": time,
        "SeriesDate": date,
        "SeriesTime": time,
        "DateOfSecondaryCapture": date,
        "TimeOfSecondaryCapture": time,
    }.items():
        setattr(image, keyword, value)
    drop_clock_stamps(image)
    return image


def write_fusion_summary(
    source_images: Sequence[Dataset],
    result: FusionResult,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    path: Path,
) -> Path:
    """Build the summary image and write it to ``path`` (complete or not at all).

    Raises:
        ValueError: as :func:`build_fusion_summary`.
        OSError: the file cannot be written.
    """
    image = build_fusion_summary(
        source_images,
        result,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
    )
    return save_atomically(image, path)
