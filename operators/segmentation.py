"""Segmentation operator: a CT volume → the model's class map on the same grid.

The model, its preprocessing and its label map come from a model.yaml (see
:mod:`radfusion.operators.segmentation_model`), so a site can drop in its own TorchScript model.
"""

from __future__ import annotations

import logging

from monai.deploy.core import Fragment, Operator, OperatorSpec

from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.segmentation_model import (
    ModelConfigError,
    Predictor,
    SegmentationModelConfig,
    default_model_config_path,
    segment_map,
)
from radfusion.operators.volume import Volume

__all__ = [
    "ModelConfigError",
    "SegmentationModelConfig",
    "SegmentationOperator",
    "default_model_config_path",
]

log = logging.getLogger("radfusion.operators.segmentation")


class SegmentationOperator(Operator):
    """Input ``volume`` (:class:`Volume`, or a ``VolumeError`` passed through) → output
    ``classes`` (:class:`ClassMap` on the volume's grid, resolved on demand; ``None`` when there
    was no volume).

    ``predictor`` runs the network (in process, or on Triton); the app chooses it.
    :attr:`timings` holds the seconds per stage (preprocess, inference, postprocess) after a run.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        config: SegmentationModelConfig,
        predictor: Predictor,
        **kw: object,
    ) -> None:
        self.config = config
        self.predictor = predictor
        self.timings: dict[str, float] = {}  # this operator's stage seconds, read after a run
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.output("classes")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        volume = op_input.receive("volume")
        classes = None
        if isinstance(volume, Volume):
            classes = segment_map(
                volume.hu,
                volume.spacing_mm,
                self.predictor,
                self.config,
                timings=self.timings,
                windows_per_call=getattr(self.predictor, "windows_per_call", 1),
            )
        op_output.emit(classes, "classes")
