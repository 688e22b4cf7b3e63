"""What the lung CT pipeline found, in one place: the algorithm, its findings, its label map.

The measurement operator produces a :class:`SegmentationResult`; the SEG and SR writers read it.
Nothing here knows DICOM encoding: these are plain values in patient (LPS) millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["AlgorithmInfo", "Finding", "SegmentationResult"]

DEMONSTRATION_NOTICE = "demonstration, not for clinical use"


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm that made a result, for TID 4019, the SEG's segment descriptions and the
    Contributing Equipment Sequence (IHE AI Results).

    ``demonstration`` is true while a reference model shipped with radfusion is in use; the
    SEG and SR series descriptions then say "demonstration, not for clinical use".
    """

    name: str
    version: str
    demonstration: bool = True
    manufacturer: str = "radfusion"
    parameters: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    # e.g. (("inference", "in-process TorchScript"),) or the Triton server and model version

    @property
    def series_description(self) -> str:
        base = f"{self.name} {self.version}"
        return f"{base} ({DEMONSTRATION_NOTICE})" if self.demonstration else base

    def describe(self, content: str) -> str:
        """A results series' description: what it holds, and that it is a demonstration
        (else which algorithm made it), e.g. "Lung nodule measurements (demonstration, not for
        clinical use)". Viewers list series by it; the algorithm and version are in the
        Contributing Equipment either way."""
        if self.demonstration:
            return f"{content} ({DEMONSTRATION_NOTICE})"
        return f"{content}, {self.name} {self.version}"


@dataclass(frozen=True)
class Finding:
    """One segmented structure: a lung or a tumour, with its measurements.

    ``segment_number`` is the structure's value in :attr:`SegmentationResult.labels` and its
    Segment Number in the SEG.
    """

    kind: str  # "lung" | "tumour"
    side: str  # "left" | "right": the lung, or the lung that holds the tumour
    segment_number: int
    tracking_id: str  # human-readable, e.g. "Right lung", "Tumour 1"
    tracking_uid: str
    volume_mm3: float
    longest_axial_diameter_mm: float
    mean_hu: float
    sd_hu: float
    centroid_lps: tuple[float, float, float]
    diameter_endpoints_lps: tuple[tuple[float, float, float], tuple[float, float, float]]
    detection_score: float | None = None  # nodules: the detector's score in [0, 1]

    @property
    def volume_ml(self) -> float:
        return self.volume_mm3 / 1000.0


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """A label map on the source volume's grid (``[k, r, c]``, uint8: 0 background, else the
    finding's ``segment_number``) and the findings it holds, in segment-number order."""

    labels: np.ndarray
    findings: tuple[Finding, ...]

    def __post_init__(self) -> None:
        numbers = [f.segment_number for f in self.findings]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"segment numbers must be 1..N in order, got {numbers}")
        if self.labels.ndim != 3:
            raise ValueError("labels: must be a 3-D array indexed [k, r, c]")
