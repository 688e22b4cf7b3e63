"""The Triton model repository writer: configs Triton accepts, the right weights, clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from radfusion.cli import main
from radfusion.integrations.inference.repository import (
    RepositoryError,
    model_config_text,
    write_repository,
)
from radfusion.model_config import FusionModelConfig, default_fusion_config_path
from radfusion.operators.segmentation_model import (
    SegmentationModelConfig,
    default_model_config_path,
)


def _config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_repository_is_libtorch_on_gpu(tmp_path: Path) -> None:
    written, fusion = write_repository(tmp_path)
    assert fusion.name == "lung_fusion" and _config(fusion.config).backend == "pytorch"
    reference_fusion = FusionModelConfig.from_yaml(default_fusion_config_path())
    assert _sha(fusion.weights) == reference_fusion.sha256
    assert _config(fusion.config).parameters["model_sha256"].string_value == (
        reference_fusion.sha256
    )
    config = _config(written.config)
    assert config.name == "lung_ct_seg" and config.backend == "pytorch"
    assert config.default_model_filename == "model.pt"
    assert written.weights == tmp_path / "lung_ct_seg" / "1" / "model.pt"
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert "model_file" not in config.parameters  # the Python model's parameters are dropped
    assert config.max_batch_size >= 1 and config.dynamic_batching.preferred_batch_size
    reference = SegmentationModelConfig.from_yaml(default_model_config_path())
    assert _sha(written.weights) == reference.sha256
    # The digest travels with the config, so a client can check what the server runs.
    assert config.parameters["model_sha256"].string_value == reference.sha256
    assert (tmp_path / "lung_ct_seg" / "MODEL_CARD.md").is_file()
    assert not (tmp_path / "lung_ct_seg" / "1" / "model.py").exists()


def test_python_backend_on_cpu(tmp_path: Path) -> None:
    written, fusion = write_repository(tmp_path, cpu=True, backend="python")
    assert (tmp_path / "lung_fusion" / "1" / "model.py").is_file()
    (fusion_out,) = _config(fusion.config).output
    assert list(fusion_out.dims) == [-1]
    config = _config(written.config)
    assert config.backend == "python"
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert config.parameters["model_file"].string_value == "model.ts"
    assert (tmp_path / "lung_ct_seg" / "1" / "model.py").is_file()
    assert written.weights.name == "model.ts"
    (tensor_in,), (tensor_out,) = config.input, config.output
    assert (tensor_in.name, tensor_in.data_type) == ("INPUT__0", mc.TYPE_FP32)
    assert (tensor_out.name, list(tensor_out.dims)) == ("OUTPUT__0", [3, -1, -1, -1])


def test_rewriting_replaces_the_model_folder(tmp_path: Path) -> None:
    write_repository(tmp_path, backend="python")
    write_repository(tmp_path, backend="pytorch")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert "lung_ct_seg/1/model.py" not in files and "lung_ct_seg/1/model.ts" not in files
    assert not [f for f in files if ".tmp" in f]


def test_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "model.yaml"
    text = default_model_config_path().read_text().replace("model: model.ts", "model: gone.ts")
    broken.write_text(text)
    with pytest.raises(RepositoryError, match=r"gone\.ts"):
        write_repository(tmp_path / "repo", models={"lung_ct_seg": broken})


def test_unknown_model_has_no_template() -> None:
    with pytest.raises(RepositoryError, match="no Triton template for 'brain_seg'"):
        model_config_text("brain_seg", cpu=True, backend="python")


def test_cli_writes_the_repository(tmp_path: Path) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["triton", "repo", "--out", str(tmp_path), "--cpu"])
    assert result.exit_code == 0, result.output
    assert "lung_ct_seg" in result.output
    assert _config(tmp_path / "lung_ct_seg" / "config.pbtxt").instance_group[0].kind == (
        mc.ModelInstanceGroup.KIND_CPU
    )
