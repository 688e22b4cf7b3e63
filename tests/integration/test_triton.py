"""Inference on a real ``tritonserver`` (CPU, Python backend): same results as in process,
clear errors, and nothing lost when the server goes away."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from radfusion.config import RadfusionConfig, TritonConfig, parse_config
from radfusion.integrations.inference.triton import (
    TritonModelNotReady,
    TritonPredictor,
    TritonUnavailable,
)
from radfusion.operators.segmentation_model import (
    SegmentationModelConfig,
    default_model_config_path,
    load_torchscript,
    segment,
)
from radfusion.synth.ct_series import synth_ct
from tests.conftest import make_certificates, start_triton, storescu, wait_for

pytestmark = pytest.mark.integration

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def model() -> SegmentationModelConfig:
    return SegmentationModelConfig.from_yaml(default_model_config_path())


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return synth_ct(
        tmp_path_factory.mktemp("chest"),
        slices=60,
        rows=128,
        columns=128,
        slice_thickness=5.0,
        seed=5400,
        tumours=1,
        patient_id="RF-IT-TRITON",
    )


@pytest.mark.parametrize(
    ("protocol", "shared_memory"), [("grpc", "system"), ("grpc", "off"), ("http", "auto")]
)
def test_triton_logits_equal_in_process_logits(
    triton: Any, model: SegmentationModelConfig, protocol: str, shared_memory: str
) -> None:
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    x = torch.rand(3, 1, 32, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = load_torchscript(model.model_path)(x)
    config = TritonConfig(url=url, protocol=protocol, shared_memory=shared_memory)  # type: ignore[arg-type]
    with TritonPredictor(config, "lung_ct_seg") as predictor:
        got = predictor(x)
        assert predictor._use_shm == (shared_memory != "off")  # same host: shm is usable
    assert got.shape == expected.shape == (3, 3, 32, 64, 64)
    # Batched and unbatched convolutions round differently in the last bits.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_segment_through_triton_gives_the_in_process_class_map(
    triton: Any, model: SegmentationModelConfig
) -> None:
    from radfusion.synth.ct import make_phantom

    phantom = make_phantom(
        seed=3, slices=48, rows=160, columns=160, pixel_spacing=2.2, slice_thickness=5.0
    )
    hu = phantom.hu
    spacing = (phantom.slice_thickness, *phantom.pixel_spacing)
    local = segment(hu, spacing, load_torchscript(model.model_path), model)
    config = TritonConfig(url=triton.grpc_url, max_in_flight=2)
    with TritonPredictor(config, "lung_ct_seg") as predictor:
        remote = segment(hu, spacing, predictor, model, windows_per_call=predictor.windows_per_call)
    assert np.isin(local, (1, 2)).sum() > 1000  # lungs were found at all
    assert (local != remote).mean() < 1e-5


def test_the_fusion_model_on_triton_equals_in_process(triton: Any) -> None:
    from radfusion.model_config import FusionModelConfig, default_fusion_config_path

    fusion = FusionModelConfig.from_yaml(default_fusion_config_path())
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, len(fusion.features) + 3, generator=generator)
    x[:, -3:] = (x[:, -3:] > 0).float()  # presence flags
    expected = load_torchscript(fusion.model_path)(x)
    with TritonPredictor(TritonConfig(url=triton.grpc_url), "lung_fusion") as predictor:
        got = predictor(x)
        assert predictor.identity.weights_sha256 == fusion.sha256
    assert got.shape == expected.shape == (5, len(fusion.outputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_predictor_names_server_model_and_what_the_server_has(triton: Any) -> None:
    with pytest.raises(TritonModelNotReady) as err:
        TritonPredictor(TritonConfig(url=triton.grpc_url), "lung_ct_segX", "3")
    text = str(err.value)
    assert f"Triton at {triton.grpc_url}" in text
    assert "'lung_ct_segX' version 3" in text
    assert "lung_ct_seg/1 (READY)" in text


def test_predictor_says_which_server_is_down() -> None:
    from tests.conftest import free_port

    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TritonUnavailable, match=f"Triton at {url}: cannot connect"):
        TritonPredictor(TritonConfig(url=url, connect_timeout_s=1), "lung_ct_seg")
    assert time.monotonic() - started < 30  # gave up after its connect timeout, not forever


def test_request_cut_by_a_server_kill_is_retried_until_the_server_is_back(
    triton_repository: Path,
) -> None:
    server = start_triton(triton_repository)
    try:
        config = TritonConfig(
            url=server.grpc_url,
            max_in_flight=1,
            retry={"attempts": 8, "initial_backoff_s": 0.5, "max_backoff_s": 2},
        )
        predictor = TritonPredictor(config, "lung_ct_seg")
        # Four full-size windows one after another: several seconds of server work, so the
        # kill below lands while requests are in flight.
        x = torch.rand(4, 1, 96, 256, 256, generator=torch.Generator().manual_seed(2))
        out: dict[str, Any] = {}

        def call() -> None:
            try:
                out["y"] = predictor(x)
            except Exception as err:
                out["error"] = err

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)
        server.stop(kill=True)
        time.sleep(1.0)
        assert caller.is_alive()  # retrying, not failed
        server.start()
        caller.join(300)
        predictor.close()
        assert "error" not in out, out.get("error")
        assert out["y"].shape == (4, 3, 96, 256, 256)
    finally:
        server.close()


def _job_config(triton_url: str, results: Path) -> dict[str, Any]:
    return {
        "routing": {"rules": [{"name": "chest", "when": {"Modality": "CT"}, "apps": ["lung-ct"]}]},
        "export": {"destinations": [{"name": "results", "type": "folder", "path": str(results)}]},
        "triton": {
            "url": triton_url,
            "connect_timeout_s": 1,
            "retry": {"attempts": 2, "initial_backoff_s": 0.2},
        },
        "jobs": {"retry": {"attempts": 2, "initial_backoff_s": 0.5}},  # queued again once
    }


def _results(folder: Path, study_uid: str) -> dict[str, Path]:
    """SEG, SR and FUSION (the fusion SR, series 903) → result file of the study in an export
    folder."""
    found = {}
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.StudyInstanceUID == study_uid:
            found["FUSION" if ds.get("SeriesNumber") == 903 else str(ds.Modality)] = path
    return found


def test_studies_survive_triton_down_at_start_and_killed_later(
    node_factory: Any, triton_repository: Path, tmp_path: Path
) -> None:
    from tests.conftest import free_port

    grpc_port, http_port = free_port(), free_port()
    results = tmp_path / "results"
    node = node_factory(_job_config(f"127.0.0.1:{grpc_port}", results))
    first = synth_ct(tmp_path / "a", slices=60, rows=128, columns=128, slice_thickness=5.0,
                     seed=5401, tumours=1, patient_id="RF-IT-T1")  # fmt: skip
    second = synth_ct(tmp_path / "b", slices=60, rows=128, columns=128, slice_thickness=5.0,
                      seed=5402, tumours=1, patient_id="RF-IT-T2")  # fmt: skip
    from radfusion.service import open_catalog

    catalog = open_catalog(parse_config(node.config))

    def dead_letter_for(uid: str) -> int | None:
        for letter in catalog.dead_letters():
            if letter.kind == "job" and letter.StudyInstanceUID == uid:
                return letter.id
        return None

    # 1. The server is down when the study arrives: the study fails into the dead letters,
    #    with the reason; nothing is lost.
    storescu(node.port, list(first.files))
    wait_for(lambda: dead_letter_for(first.StudyInstanceUID) is not None, 120, "a dead letter")
    letter = catalog.dead_letter(dead_letter_for(first.StudyInstanceUID) or 0)
    assert letter is not None and "TritonUnavailable" in letter.error
    assert letter.attempts == 2  # queued again by jobs.retry, then dead-lettered
    events = [e for e, _ in catalog.events_of(first.StudyInstanceUID)]
    assert events.count("job-retry-scheduled") == 1
    assert f"127.0.0.1:{grpc_port}" in letter.error
    server = start_triton(triton_repository, grpc_port=grpc_port, http_port=http_port)
    try:
        # 2. The server is back: a retry of the dead letter produces the results.
        assert node.cli("deadletter", "retry", str(letter.id)).returncode == 0
        wait_for(
            lambda: {"SEG", "SR"} <= set(_results(results, first.StudyInstanceUID)), 180, "results"
        )
        # TID 4019 names the served model and the server.
        sr = _results(results, first.StudyInstanceUID)["SR"]
        assert b"inference=lung_ct_seg/1 on Triton 2.51.0" in sr.read_bytes()

        # 3. The server dies after the app connected to it: the next study fails after its
        #    retries, then succeeds on retry once the server is back.
        server.stop(kill=True)
        storescu(node.port, list(second.files))
        wait_for(lambda: dead_letter_for(second.StudyInstanceUID) is not None, 120, "dead letter")
        second_letter = dead_letter_for(second.StudyInstanceUID) or 0
        server.start()
        assert node.cli("deadletter", "retry", str(second_letter)).returncode == 0
        wait_for(
            lambda: {"SEG", "SR"} <= set(_results(results, second.StudyInstanceUID)), 180, "results"
        )
    finally:
        server.close()
    assert "Triton request failed" in node.log()  # the retries were logged


def test_run_once_with_a_wrong_model_name_fails_clearly(
    triton: Any, chest: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys

    import yaml

    config = tmp_path / "radfusion.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "triton": {"url": triton.grpc_url},
                "apps": {"lung_ct": {"triton_model": "lung_ct_v2"}},
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "radfusion.cli", "run", "lung-ct", "--input",
         str(chest.directory), "--output", str(tmp_path / "out"), "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1
    assert "'lung_ct_v2' version latest on Triton at" in out.stderr
    assert "lung_ct_seg/1 (READY)" in out.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_lung_ct_results_through_triton_match_in_process(
    triton: Any, chest: Any, tmp_path: Path
) -> None:
    from radfusion.apps.lung_ct.app import run_folder

    local = run_folder(chest.directory, tmp_path / "local", RadfusionConfig())
    remote = run_folder(
        chest.directory,
        tmp_path / "triton",
        parse_config({"triton": {"url": triton.grpc_url, "shared_memory": "system"}}),
    )

    def seg_pixels(paths: list[Path]) -> np.ndarray:
        (seg,) = [p for p in paths if pydicom.dcmread(p).SOPClassUID == SEG_CLASS]
        return np.asarray(pydicom.dcmread(seg).pixel_array)

    a, b = seg_pixels(local), seg_pixels(remote)
    assert a.shape == b.shape and a.any()
    assert (a != b).mean() < 1e-5

    def fusion_sr(paths: list[Path]) -> Path:
        (path,) = [p for p in paths if p.name == "fusion_sr.dcm"]
        return path

    # The fusion ran on the server too, and says so; its numbers are the in-process ones.
    local_sr, remote_sr = fusion_sr(local), fusion_sr(remote)
    assert b"lung_fusion/1 on Triton 2.51.0" in remote_sr.read_bytes()
    assert b"in process (TorchScript)" in local_sr.read_bytes()
    numbers = _numbers(pydicom.dcmread(local_sr))
    assert numbers and _numbers(pydicom.dcmread(remote_sr)) == pytest.approx(numbers, abs=1e-4)


def _numbers(ds: Any) -> list[float]:
    """Every NUM of an SR, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "NUM":
            found.append(float(item.MeasuredValueSequence[0].NumericValue))
        found.extend(_numbers(item))
    return found


def test_grpc_over_tls(triton_repository: Path, tmp_path: Path) -> None:
    pem = make_certificates(tmp_path)
    server = start_triton(
        triton_repository,
        extra_args=[
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={pem['server']}",
            f"--grpc-server-key={pem['server-key']}",
        ],
    )
    try:
        x = torch.rand(1, 1, 32, 64, 64)
        tls = {"root_certificates": str(pem["ca"])}
        config = TritonConfig(url=server.grpc_url, tls=tls, shared_memory="off")
        with TritonPredictor(config, "lung_ct_seg") as predictor:
            assert predictor(x).shape == (1, 3, 32, 64, 64)
        # Without TLS the server cannot be spoken to, and the error says where.
        plain = TritonConfig(url=server.grpc_url, connect_timeout_s=1)
        with pytest.raises(TritonUnavailable, match=server.grpc_url):
            TritonPredictor(plain, "lung_ct_seg")
    finally:
        server.close()


def test_served_weights_other_than_the_model_yaml_are_refused(
    triton_repository: Path, tmp_path: Path
) -> None:
    import shutil

    from radfusion.apps.lung_ct.app import make_predictor, model_config
    from radfusion.integrations.inference.triton import TritonError

    repo = tmp_path / "repo"
    shutil.copytree(triton_repository, repo)
    config_file = repo / "lung_ct_seg" / "config.pbtxt"
    model = model_config(RadfusionConfig().apps.lung_ct)
    config_file.write_text(config_file.read_text().replace(model.sha256, "0" * 64))
    server = start_triton(repo)
    try:
        config = parse_config({"triton": {"url": server.grpc_url}})
        with pytest.raises(TritonError, match="serves weights 0000000000000000, but"):
            make_predictor(config, model)
    finally:
        server.close()
