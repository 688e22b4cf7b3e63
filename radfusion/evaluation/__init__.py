"""Evaluation: how well the apps' results agree with a reference.

- :mod:`~radfusion.evaluation.synthetic`: a written SEG against a synthetic study's ground truth
  (demo, tests, benchmarks).
- :mod:`~radfusion.evaluation.lidc`: LIDC reader XML (LidcReadMessage) → reference nodules.
- :mod:`~radfusion.evaluation.reference_seg`: a reference DICOM SEG → reference nodules and lungs.
- :mod:`~radfusion.evaluation.lung_ct`: runs the lung-ct app over studies and scores its SEG
  against those references (``radfusion eval lung-ct``).
"""

from radfusion.evaluation.synthetic import Comparison, compare_with_truth, dice, seg_label_volume

__all__ = ["Comparison", "compare_with_truth", "dice", "seg_label_volume"]
