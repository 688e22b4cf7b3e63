"""Write a Triton model repository for radfusion's models, ready for a site's server.

The templates live in ``packaging/triton/<model>/`` (``config.pbtxt`` and, for Triton's
Python backend, ``1/model.py``); the weights come from the model's ``model.yaml`` (by default
the reference models in ``packaging/models/``). Two backends:

- ``pytorch`` (default): Triton's LibTorch backend, what NVIDIA's Triton containers serve out
  of the box. The TorchScript file becomes ``1/model.pt``.
- ``python``: Triton's Python backend running ``1/model.py``, which loads ``1/model.ts`` with
  torch from the stub's Python environment. For servers without the LibTorch backend (the
  ``tritonserver`` in the ``nvidia-pytriton`` wheel that the tests use).

Instance groups are ``KIND_GPU`` unless ``cpu`` is set. Every config is parsed as Triton's
``ModelConfig`` protobuf before it is written, so a malformed template fails here, not on the
server.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from radfusion.errors import RadfusionError
from radfusion.model_config import default_model_config_path, read_model_config

__all__ = ["REFERENCE_MODELS", "RepositoryError", "template_dir", "write_repository"]

Backend = Literal["pytorch", "python"]

REFERENCE_MODELS = {
    "lung_ct_seg": "lung_ct_seg/model.yaml",
    "lung_fusion": "lung_fusion/model.yaml",
}
"""Triton model name → its model.yaml under the reference models folder."""


class RepositoryError(RadfusionError, ValueError):
    """A template or model file is missing or malformed, or the output folder is unusable."""


def template_dir() -> Path:
    """``packaging/triton`` in the source tree, ``radfusion/triton`` when installed."""
    root = Path(__file__).resolve().parents[2]
    installed = root / "triton"
    return installed if (installed / "lung_ct_seg").is_dir() else root / "packaging" / "triton"


@dataclass(frozen=True)
class WrittenModel:
    name: str
    config: Path
    weights: Path


def model_config_text(name: str, *, cpu: bool, backend: Backend, sha256: str = "") -> str:
    """The ``config.pbtxt`` for ``name``: the template, adapted to the backend and device.
    ``sha256`` (of the weights) goes into parameter ``model_sha256``, so a client can check
    that the server runs the weights its model.yaml describes.

    Raises:
        RepositoryError: no template, or it does not parse as a Triton ``ModelConfig``.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    path = template_dir() / name / "config.pbtxt"
    try:
        config = text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except OSError as err:
        raise RepositoryError(f"no Triton template for {name!r}: {err}") from None
    except text_format.ParseError as err:
        raise RepositoryError(f"{path}: not a valid Triton model config: {err}") from None
    if config.name != name:
        raise RepositoryError(f"{path}: names model {config.name!r}, expected {name!r}")
    if backend == "pytorch":
        config.backend = "pytorch"
        config.default_model_filename = "model.pt"
        # The Python model's own parameters mean nothing to LibTorch.
        for key in ("model_file", "torch_threads"):
            config.parameters.pop(key, None)
        config.parameters["INFERENCE_MODE"].string_value = "true"
    if sha256:
        config.parameters["model_sha256"].string_value = sha256
    kind = mc.ModelInstanceGroup.KIND_CPU if cpu else mc.ModelInstanceGroup.KIND_GPU
    for group in config.instance_group:
        group.kind = kind
    header = (
        f"# {name}: written by `radfusion triton repo` ({backend} backend, "
        f"{'CPU' if cpu else 'GPU'}).\n"
        "# A DEMONSTRATION, NOT FOR CLINICAL USE when it carries radfusion's reference model\n"
        "# (see MODEL_CARD.md beside this file).\n"
    )
    return header + text_format.MessageToString(config)


def write_repository(
    out: Path,
    *,
    cpu: bool = False,
    backend: Backend = "pytorch",
    models: dict[str, Path] | None = None,
) -> list[WrittenModel]:
    """Write a model repository into ``out`` (created; existing model folders are replaced).

    Args:
        out: the repository root, as passed to ``tritonserver --model-repository``.
        cpu: instance groups on CPU instead of GPU.
        backend: ``pytorch`` (LibTorch) or ``python`` (see the module docstring).
        models: Triton model name → model.yaml; default: the reference models.

    Raises:
        RepositoryError: a template, model.yaml or TorchScript file is missing or malformed.
    """
    if models is None:
        models_dir = default_model_config_path().parents[1]  # installed or source tree
        models = {n: models_dir / rel for n, rel in REFERENCE_MODELS.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, yaml_path in models.items():
        try:
            model = read_model_config(yaml_path)
        except ValueError as err:
            raise RepositoryError(str(err)) from None
        text = model_config_text(name, cpu=cpu, backend=backend, sha256=model.sha256)
        target = out / name
        staging = out / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "1").mkdir(parents=True)
        (staging / "config.pbtxt").write_text(text, encoding="utf-8")
        weights = staging / "1" / ("model.pt" if backend == "pytorch" else "model.ts")
        shutil.copy2(model.model_path, weights)
        if backend == "python":
            shutil.copy2(template_dir() / name / "1" / "model.py", staging / "1" / "model.py")
        card = model.model_path.parent / "MODEL_CARD.md"
        if card.is_file():
            shutil.copy2(card, staging / "MODEL_CARD.md")
        # Swap by renames, so a server polling the repository sees the old model or the new
        # one, never half of one (and the old one is gone only once the new one is in place).
        retired = out / f".{name}.old"
        shutil.rmtree(retired, ignore_errors=True)
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
        written.append(WrittenModel(name, target / "config.pbtxt", target / "1" / weights.name))
    return written
