"""How series are named in logs, reasons and the SR, and how reconstruction kernels are
classed: the words radfusion uses for a series, never its UID in clear."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from pydicom.dataset import Dataset

from radfusion.logs import uid_tag
from radfusion.operators.ct_headers import functional_value

__all__ = [
    "KernelClass",
    "convolution_kernel",
    "dicom_text",
    "kernel_class",
    "mm_text",
    "series_label",
    "series_name",
    "series_number",
]

KernelClass = Literal["soft", "sharp", "unknown"]


def series_number(ds: Dataset) -> int | None:
    """Series Number as an integer; None when absent or not a number."""
    try:
        value = ds.get("SeriesNumber")
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def dicom_text(value: object, limit: int = 64) -> str:
    """A header string as logs and reports may show it: ASCII, one line, at most ``limit``."""
    text = " ".join(str(value or "").encode("ascii", "replace").decode("ascii").split())
    return text[:limit]


def convolution_kernel(ds: Dataset) -> str:
    """Convolution Kernel (Enhanced CT: CT Reconstruction functional group; Legacy Converted:
    the unassigned converted attributes); the first value (Siemens adds e.g. a strength:
    ``Br40d\\3``); "" when not stated."""
    value = functional_value(ds, "ConvolutionKernel", "CTReconstructionSequence")
    if value is None:
        value = functional_value(
            ds, "ConvolutionKernel", "UnassignedSharedConvertedAttributesSequence"
        )
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0] if len(value) else ""
    return dicom_text(value)


def series_label(number: int | None, series_instance_uid: str) -> str:
    if number is not None:
        return f"series {number}"
    if series_instance_uid:
        return f"series {uid_tag(series_instance_uid)}"
    return "images without a Series Instance UID"


def series_name(ds: Dataset, series_instance_uid: str = "") -> str:
    """A series as logs and reports name it, from one of its images: Series Number (else a
    hashed tag of ``series_instance_uid``, never the UID in clear) with Series Description and
    Convolution Kernel when present, e.g. ``series 3 (ThoraxRoutine B70f)``."""
    head = series_label(series_number(ds), series_instance_uid)
    description, kernel = dicom_text(ds.get("SeriesDescription")), convolution_kernel(ds)
    details = [description] if description else []
    if kernel and kernel.casefold() not in description.casefold().split():
        details.append(kernel)
    return f"{head} ({' '.join(details)})" if details else head


# Vendors' kernel names. GE names them; Siemens gives a letter or two and a sharpness number
# (B30f, Br40d, I31f; Bl57d is a lung kernel); Canon/Toshiba FC and a number (body and head
# below 30, bone FC3x, lung FC5x and up); Philips letters (A-C soft, D/E sharp, L lung, Y* for
# the iDose/IMR body range). Sharp means edge-enhancing: lung, bone, high resolution.
_GE_SOFT = {"SOFT", "STANDARD", "STND", "SMOOTH"}
_GE_SHARP = {"LUNG", "BONE", "BONEPLUS", "BONE PLUS", "EDGE", "CHEST", "HD LUNG"}
_PHILIPS_SOFT = {"A", "B", "C", "YA", "YB", "YC"}
_PHILIPS_SHARP = {"D", "E", "EC", "L", "LA", "YD", "YE", "YF"}
_CANON = re.compile(r"^FC(\d{2})$")
_SIEMENS = re.compile(r"^[A-Z]{1,2}(\d{2})[A-Z]?$")
_SIEMENS_SHARP_FROM = 50  # B50f and up: B6x-B8x body/bone sharp, Bl57 lung
_CANON_SHARP_FROM = 30  # FC30 and up: bone and lung


def kernel_class(kernel: Dataset | str) -> KernelClass:
    """Whether a reconstruction kernel is ``soft`` (soft tissue, standard body: GE SOFT and
    STANDARD, Siemens B30f/Br40/I31f, Philips A/B/C/YA-YC, Canon FC0x-FC2x) or ``sharp`` (lung,
    bone, high resolution: GE LUNG/BONE/BONEPLUS/EDGE/CHEST, Siemens B50 and up such as B70f
    and Bl57, Philips D/E/L/YD-YF, Canon FC30 and up); ``unknown`` when not stated or not
    recognised. ``kernel`` is an image (its Convolution Kernel) or the kernel's name.

    A heuristic over vendors' naming, for choosing among reconstructions; it never decides
    whether a series qualifies.
    """
    name = (
        convolution_kernel(kernel) if isinstance(kernel, Dataset) else dicom_text(kernel)
    ).upper()
    if not name:
        return "unknown"
    if name in _GE_SOFT or name in _PHILIPS_SOFT:
        return "soft"
    if name in _GE_SHARP or name in _PHILIPS_SHARP:
        return "sharp"
    for pattern, sharp_from in ((_CANON, _CANON_SHARP_FROM), (_SIEMENS, _SIEMENS_SHARP_FROM)):
        match = pattern.match(name)
        if match:
            return "sharp" if int(match.group(1)) >= sharp_from else "soft"
    return "unknown"


def mm_text(value: float) -> str:
    """A length as reasons give it: ``240``, ``1.25`` (at most two decimals)."""
    return f"{round(value, 2):g}"
