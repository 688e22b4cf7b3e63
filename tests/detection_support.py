"""What a perfect detector finds on a synthetic phantom: the writer tests' input."""

from __future__ import annotations

import numpy as np

from radfusion.operators.detection import Anatomy
from radfusion.operators.lungs import LungFields
from radfusion.operators.nodules import FEATURES, NoduleCandidate
from radfusion.synth.ct import LABELS, TUMOUR_LABEL_BASE

DETECTION_SCORES = (0.874, 0.652)  # the nodules', largest first


def anatomy_from_truth(truth: np.ndarray) -> Anatomy:
    """What a perfect detector finds: the truth's lungs and one nodule per tumour, the larger
    first with the higher detection score."""
    tumours = sorted(
        (truth == label for label in np.unique(truth[truth >= TUMOUR_LABEL_BASE])),
        key=lambda mask: -int(np.count_nonzero(mask)),
    )
    nodules = []
    for rank, mask in enumerate(tumours):
        k, r, c = np.nonzero(mask)
        box = (
            slice(int(k.min()), int(k.max()) + 1),
            slice(int(r.min()), int(r.max()) + 1),
            slice(int(c.min()), int(c.max()) + 1),
        )
        nodules.append(
            NoduleCandidate(
                box=box,
                mask=mask[box].copy(),
                score=DETECTION_SCORES[rank],
                diameter_mm=20.0,
                core_hu=30.0,
                texture="solid",
                features=(0.0,) * len(FEATURES),
            )
        )
    right, left = truth == LABELS["right_lung"], truth == LABELS["left_lung"]
    fields = LungFields(right, left, right | left, truth != LABELS["background"], ())
    return Anatomy(fields, tuple(nodules), (), len(nodules))
