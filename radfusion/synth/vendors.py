"""Vendor styles of CT headers and pixel encodings, so readers meet what scanners really write.

Each style (:data:`VENDORS`) fixes the transfer syntax, how HU are stored (PixelRepresentation,
BitsStored, RescaleSlope/Intercept), the PixelPaddingValue written outside the scan circle,
and the Manufacturer, model, kernel and SeriesDescription wording; the model and kernel name
are picked by seed among the vendor's usual ones:

========  ========  ==  ====  =========  =====  ======================  ======================
style     syntax    PR  bits  intercept  slope  padding (stored→raw HU)  kernels soft / sharp
========  ========  ==  ====  =========  =====  ======================  ======================
generic   explicit  1   16    0          1      none                    STANDARD / LUNG
ge        explicit  1   16    -1024      1      -2000 → -3024           STANDARD, SOFT / LUNG
siemens   implicit  0   12    -1024      1      none (0 = -1024 HU)     B30f, Br40d / B70f
philips   explicit  0   16    -1024      1|0.5  0xF830 → large positive B, C / L, YA
canon     implicit  1   16    0          1      -3024 → -3024           FC08, FC13 / FC52, FC86
========  ========  ==  ====  =========  =====  ======================  ======================

Siemens' SOMATOM Force writes Br40d / Bl57d with the iterative strength as a second value.

Every stored value decodes through the rescale to the phantom's HU exactly, except padding,
which a reader must recognise by PixelPaddingValue (it decodes to no real HU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["VENDORS", "VendorStyle", "encode_slice", "vendor_style"]

VENDORS = ("generic", "ge", "siemens", "philips", "canon")


@dataclass(frozen=True)
class VendorStyle:
    """How one vendor writes a CT series (see the module table); built by :func:`vendor_style`."""

    name: str
    manufacturer: str
    model: str
    transfer_syntax: UID
    pixel_representation: int  # 0 unsigned, 1 signed
    bits_stored: int
    intercept: float
    slope: float
    padding: int | None  # stored PixelPaddingValue, None: no attribute
    kernel: list[str]  # ConvolutionKernel (Siemens adds the iterative strength as a 2nd value)
    series_description: str
    software: str
    image_type: list[str]


_MODELS = {
    "ge": ("LightSpeed VCT", "Revolution CT", "Discovery CT750 HD"),
    "siemens": ("SOMATOM Definition AS+", "SOMATOM Force", "Sensation 64"),
    "philips": ("Brilliance 64", "iCT 256", "IQon - Spectral CT"),
    "canon": ("Aquilion ONE", "Aquilion Prime SP"),
}
_KERNELS = {
    ("ge", "soft"): ("STANDARD", "SOFT"),
    ("ge", "sharp"): ("LUNG", "BONE"),
    ("philips", "soft"): ("B", "C"),
    ("philips", "sharp"): ("L", "YA"),
    ("canon", "soft"): ("FC08", "FC13"),
    ("canon", "sharp"): ("FC52", "FC86"),
}


def vendor_style(vendor: str, kernel: str, thickness: float, seed: int) -> VendorStyle:
    """The header style of ``vendor`` for a ``kernel`` ("soft"/"sharp") series.

    Raises:
        ValueError: an unknown vendor or kernel (the message names ``vendor``/``kernel``).
    """
    if vendor not in VENDORS:
        raise ValueError(f"vendor: must be one of {', '.join(VENDORS)}, got {vendor!r}")
    if kernel not in ("soft", "sharp"):
        raise ValueError(f"kernel: must be 'soft' or 'sharp', got {kernel!r}")
    t = f"{thickness:g}"
    if vendor == "generic":
        name = "STANDARD" if kernel == "soft" else "LUNG"
        return VendorStyle(
            "generic",
            "radfusion synthetic phantom",
            "radfusion.synth.ct",
            ExplicitVRLittleEndian,
            1,
            16,
            0.0,
            1.0,
            None,
            [name],
            "",
            "radfusion synth 1",
            ["ORIGINAL", "PRIMARY", "AXIAL"],
        )
    model = _MODELS[vendor][seed % len(_MODELS[vendor])]
    if vendor == "siemens":
        if model == "SOMATOM Force":
            kernel_value = ["Br40d", "3"] if kernel == "soft" else ["Bl57d", "3"]
            desc = f"Thorax {t} {kernel_value[0][:4]} {kernel_value[1]}"
        else:
            kernel_value = ["B30f"] if kernel == "soft" else ["B70f"]
            desc = f"Thorax {t} {kernel_value[0]}"
        return VendorStyle(
            vendor,
            "SIEMENS",
            model,
            ImplicitVRLittleEndian,
            0,
            12,
            -1024.0,
            1.0,
            None,
            kernel_value,
            desc,
            "syngo CT VA48A",
            ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"],
        )
    name = _KERNELS[(vendor, kernel)][(seed // 3) % 2]
    if vendor == "ge":
        word = {"STANDARD": "STND", "SOFT": "Soft", "LUNG": "Lung", "BONE": "Bone"}[name]
        return VendorStyle(
            vendor,
            "GE MEDICAL SYSTEMS",
            model,
            ExplicitVRLittleEndian,
            1,
            16,
            -1024.0,
            1.0,
            -2000,
            [name],
            f"{t}mm {word} CHEST",
            "LightSpeedverrel",
            ["ORIGINAL", "PRIMARY", "AXIAL"],
        )
    if vendor == "philips":
        slope = 0.5 if seed % 2 else 1.0  # some Philips series rescale with a slope
        return VendorStyle(
            vendor,
            "Philips",
            model,
            ExplicitVRLittleEndian,
            0,
            16,
            -1024.0,
            slope,
            0xF830,
            [name],
            f"Thorax {t}mm {name} iDose 3",
            "4.1.6",
            ["ORIGINAL", "PRIMARY", "AXIAL"],
        )
    return VendorStyle(
        vendor,
        "CANON_MEC",
        model,
        ImplicitVRLittleEndian,
        1,
        16,
        0.0,
        1.0,
        -3024,
        [name],
        f"Lung {t} {name} AIDR 3D",
        "V10.8",
        ["ORIGINAL", "PRIMARY", "AXIAL"],
    )


def apply_headers(ds: Dataset, style: VendorStyle) -> None:
    """Set the vendor-dependent attributes of a CT dataset (pixels are separate)."""
    ds.Manufacturer = style.manufacturer
    ds.ManufacturerModelName = style.model
    ds.SoftwareVersions = style.software
    ds.ImageType = style.image_type
    ds.ConvolutionKernel = style.kernel if len(style.kernel) > 1 else style.kernel[0]
    if style.series_description:
        ds.SeriesDescription = style.series_description
    ds.BitsStored = style.bits_stored
    ds.HighBit = style.bits_stored - 1
    ds.PixelRepresentation = style.pixel_representation
    ds.RescaleIntercept = f"{style.intercept:g}"
    ds.RescaleSlope = f"{style.slope:g}"
    if style.padding is not None:
        # The VR of PixelPaddingValue follows PixelRepresentation (US or SS).
        ds.add_new(0x00280120, "SS" if style.pixel_representation else "US", style.padding)
    elif "PixelPaddingValue" in ds:
        del ds.PixelPaddingValue


def encode_slice(hu: np.ndarray, style: VendorStyle, outside: np.ndarray | None) -> bytes:
    """Stored pixel bytes of one int16 HU slice; ``outside`` pixels (the scan circle's
    outside) get the padding value, or stay -1024 HU where the style has none."""
    stored = np.rint((hu.astype(np.float64) - style.intercept) / style.slope)
    top = (1 << style.bits_stored) - 1 if style.pixel_representation == 0 else 32767
    np.clip(stored, 0 if style.pixel_representation == 0 else -32768, top, out=stored)
    if outside is not None and style.padding is not None:
        stored[outside] = style.padding
    dtype = "<u2" if style.pixel_representation == 0 else "<i2"
    return stored.astype(dtype).tobytes()
