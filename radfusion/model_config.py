"""A model's description (``model.yaml``): what a site edits to use its own model.

Read by the operators that run the model and by the integration that serves it on Triton, so
it sits below both. The format is described in :mod:`radfusion.operators.segmentation_model`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from radfusion.errors import RadfusionError

__all__ = [
    "FusionModelConfig",
    "ModelConfigError",
    "SegmentationModelConfig",
    "default_fusion_config_path",
    "default_model_config_path",
    "read_model_config",
]


class ModelConfigError(RadfusionError, ValueError):
    """A model.yaml is missing, malformed or names a file that does not exist."""


def _reference(model: str) -> Path:
    package = Path(__file__).resolve().parent
    installed = package / "models" / model / "model.yaml"
    source = package.parent / "packaging" / "models" / model / "model.yaml"
    return installed if installed.is_file() else source


def default_model_config_path() -> Path:
    """The reference model shipped with radfusion (a demonstration, not for clinical use):
    ``packaging/models/lung_ct_seg/model.yaml`` in the source tree, ``radfusion/models/...``
    in an installed package (pyproject maps one onto the other)."""
    return _reference("lung_ct_seg")


def default_fusion_config_path() -> Path:
    """The reference fusion model (a demonstration trained on synthetic patients):
    ``packaging/models/lung_fusion/model.yaml`` or its installed copy."""
    return _reference("lung_fusion")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelConfigError(f"{path}: cannot read model config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: expected a mapping at the top level")
    return raw


def _model_file(path: Path, name: object) -> tuple[Path, str]:
    model_path = (Path(path).parent / str(name)).resolve()
    if not model_path.is_file():
        raise ModelConfigError(f"{path}: model file {model_path} does not exist")
    return model_path, hashlib.sha256(model_path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class FusionModelConfig:
    """A fusion model's model.yaml: its TorchScript file, the input features it was trained
    on (in order; the app refuses a model whose list differs from the vector it builds), its
    output columns, and the progression probabilities that separate the risk groups."""

    name: str
    version: str
    model_path: Path
    features: tuple[str, ...]
    outputs: tuple[str, ...]
    risk_groups: tuple[float, float]  # low < first <= intermediate < second <= high
    demonstration: bool = False
    sha256: str = ""

    @classmethod
    def from_yaml(cls, path: Path) -> FusionModelConfig:
        """Read and check a fusion model.yaml.

        Raises:
            ModelConfigError: the file is missing or unreadable, a key is missing or has a bad
                value, or the model file is absent.
        """
        raw = _read_yaml(path)
        try:
            name, version = str(raw["name"]), str(raw["version"])
            features = tuple(str(f) for f in raw["features"])
            outputs = tuple(str(o) for o in raw["outputs"])
            low, high = (float(v) for v in raw["risk_groups"])
            model = raw["model"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelConfigError(f"{path}: missing key or bad value: {exc!r}") from exc
        if not 0 < low < high < 1:
            raise ModelConfigError(f"{path}: risk_groups must be two increasing probabilities")
        if not features or not outputs:
            raise ModelConfigError(f"{path}: features and outputs must not be empty")
        model_path, sha256 = _model_file(path, model)
        return cls(
            name=name,
            version=version,
            model_path=model_path,
            features=features,
            outputs=outputs,
            risk_groups=(low, high),
            demonstration=bool(raw.get("demonstration", False)),
            sha256=sha256,
        )


@dataclass(frozen=True)
class SegmentationModelConfig:
    """The contents of a model.yaml; see the module docstring."""

    name: str
    version: str
    model_path: Path
    spacing_mm: tuple[float, float, float]
    hu_min: float
    hu_max: float
    labels: dict[int, str]
    roi_size: tuple[int, int, int]
    overlap: float
    demonstration: bool = False  # a reference model: its results must say "not for clinical use"
    sha256: str = ""  # of the model file: identifies the weights in the results

    @classmethod
    def from_yaml(cls, path: Path) -> SegmentationModelConfig:
        """Read and check a model.yaml.

        Raises:
            ModelConfigError: the file is missing or unreadable, a key is missing or has a bad
                value (the message names the file and the key), or the model file is absent.
        """
        path = Path(path)
        raw = _read_yaml(path)

        def need(key: str) -> Any:  # parsed YAML: checked (and converted) by the caller
            if key not in raw:
                raise ModelConfigError(f"{path}: missing key {key!r}")
            return raw[key]

        try:
            spacing = tuple(float(v) for v in need("spacing_mm"))
            roi = tuple(int(v) for v in raw.get("roi_size", (96, 256, 256)))
            intensity = need("intensity")
            hu_min = float(intensity["hu_min"])
            hu_max = float(intensity["hu_max"])
            labels = {int(k): str(v) for k, v in need("labels").items()}
            overlap = float(raw.get("overlap", 0.25))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ModelConfigError(f"{path}: bad value: {exc!r}") from exc
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ModelConfigError(f"{path}: spacing_mm must be three positive numbers")
        if len(roi) != 3 or min(roi) < 8:
            raise ModelConfigError(f"{path}: roi_size must be three integers >= 8")
        if hu_max <= hu_min:
            raise ModelConfigError(f"{path}: intensity.hu_max must exceed hu_min")
        if 0 in labels or not labels:
            raise ModelConfigError(
                f"{path}: labels must name output channels 1..N (0 is background)"
            )
        if not 0 <= overlap < 1:
            raise ModelConfigError(f"{path}: overlap must be in [0, 1)")
        model_path, sha256 = _model_file(path, need("model"))
        return cls(
            name=str(need("name")),
            version=str(need("version")),
            model_path=model_path,
            spacing_mm=spacing,
            hu_min=hu_min,
            hu_max=hu_max,
            labels=labels,
            roi_size=roi,
            overlap=overlap,
            demonstration=bool(raw.get("demonstration", False)),
            sha256=sha256,
        )

    def class_index(self, name: str) -> int:
        """The output channel of a class by name (e.g. ``"lung"``).

        Raises:
            KeyError: the model has no such class.
        """
        for index, label in self.labels.items():
            if label == name:
                return index
        raise KeyError(f"model {self.name} has no class {name!r} (has {self.labels})")


def read_model_config(path: Path) -> SegmentationModelConfig | FusionModelConfig:
    """A segmentation or a fusion model.yaml, told apart by its keys (a fusion model lists
    the ``features`` it was trained on).

    Raises:
        ModelConfigError: as the class's ``from_yaml``.
    """
    fusion = "features" in _read_yaml(path)
    return (FusionModelConfig if fusion else SegmentationModelConfig).from_yaml(path)
