"""Export to a real Orthanc: delivery, retries, dead letter, retry from the CLI."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import RLELossless, generate_uid

from radfusion.config import DicomDestination, parse_config
from radfusion.integrations.dicom.export import Exporter, deliver
from radfusion.integrations.store.catalog import Catalog
from tests.conftest import REPO, free_port, require_tool, wait_for

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, orthanc: Any) -> dict[str, Any]:
    return {
        "spool": {"path": str(tmp_path / "spool")},
        "export": {
            "destinations": [orthanc.destination(timeout_s=5)],
            "retry": {"attempts": 3, "initial_backoff_s": 0.2, "max_backoff_s": 1},
        },
    }


def test_export_delivers_to_orthanc(tmp_path: Path, orthanc: Any, ct_study: Any) -> None:
    cfg = parse_config(_config(tmp_path, orthanc))
    catalog = Catalog(tmp_path / "c.sqlite")
    exporter = Exporter(cfg.export, catalog, tmp_path / "outbox", "RADFUSION")
    files = list(ct_study.files[:3])
    [result] = exporter.export(files, study_instance_uid=ct_study.StudyInstanceUID)
    assert result.delivered and result.attempts == 1
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert sent <= orthanc.instance_uids()
    assert list((tmp_path / "outbox").iterdir()) == []  # nothing left staged
    assert catalog.dead_letters() == []


def test_orthanc_down_retries_then_dead_letter_then_cli_retry_delivers(
    tmp_path: Path, orthanc: Any, ct_study: Any
) -> None:
    raw = _config(tmp_path, orthanc)
    cfg = parse_config(raw)
    config_path = tmp_path / "radfusion.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    catalog = Catalog(tmp_path / "spool" / "catalog.sqlite")
    waits: list[float] = []
    exporter = Exporter(
        cfg.export, catalog, tmp_path / "spool" / "outbox", "RADFUSION", sleep=waits.append
    )
    # An instance of its own: the session's Orthanc may hold the study's from other tests.
    ds = pydicom.dcmread(ct_study.files[-1])
    uid = ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    f = tmp_path / "instance.dcm"
    ds.save_as(f, enforce_file_format=True)
    orthanc.stop()
    try:
        [result] = exporter.export([f], study_instance_uid=ct_study.StudyInstanceUID)
    finally:
        orthanc.start()
    assert not result.delivered
    assert result.attempts == 3
    assert waits == [0.2, 0.4]  # backoff between the three attempts
    [letter] = catalog.dead_letters()
    assert letter.id == result.dead_letter_id and letter.kind == "export"
    assert "pacs" in letter.error and letter.files == 1
    assert uid not in orthanc.instance_uids()

    listing = subprocess.run(
        [sys.executable, "-m", "radfusion.cli", "deadletter", "list", "--config", str(config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert listing.returncode == 0 and "export" in listing.stdout
    retry = subprocess.run(
        [
            sys.executable,
            "-m",
            "radfusion.cli",
            "deadletter",
            "retry",
            str(letter.id),
            "--config",
            str(config_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert retry.returncode == 0, retry.stderr
    assert uid in orthanc.instance_uids()
    assert catalog.dead_letters() == []
    assert not letter.outbox.exists()
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "radfusion.cli",
            "deadletter",
            "retry",
            str(letter.id),
            "--config",
            str(config_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert again.returncode != 0 and "already" in again.stderr


def _rle_copy(source: Path, target: Path) -> pydicom.Dataset:
    """``source`` as a new instance in RLE Lossless (a compressed syntax pydicom can write)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(target, enforce_file_format=True)
    return ds


def test_a_compressed_instance_is_sent_as_stored(
    tmp_path: Path, orthanc: Any, ct_study: Any
) -> None:
    """Orthanc accepts RLE: the stored bytes go as they are, not decoded and re-encoded."""
    ds = _rle_copy(ct_study.files[0], tmp_path / "rle.dcm")
    deliver(
        parse_config(_config(tmp_path, orthanc)).export.destinations[0],
        [tmp_path / "rle.dcm"],
        "RADFUSION",
    )
    [oid] = [
        oid
        for oid in orthanc.get("/instances")
        if orthanc.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"] == ds.SOPInstanceUID
    ]
    with urllib.request.urlopen(f"{orthanc.url}/instances/{oid}/file", timeout=10) as r:
        stored = pydicom.dcmread(io.BytesIO(r.read()))
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert stored.PixelData == ds.PixelData


def test_a_receiver_that_takes_only_uncompressed_gets_the_decompressed_instance(
    tmp_path: Path, ct_study: Any
) -> None:
    """dcmtk storescp (default: uncompressed syntaxes only) gets the pixels decoded."""
    require_tool("storescp")
    ds = _rle_copy(ct_study.files[0], tmp_path / "rle.dcm")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(["storescp", "-od", str(received), "-aet", "STORESCP", str(port)])
    try:
        wait_for(lambda: _listening(port), 10, "storescp listening")
        destination = DicomDestination(
            name="scp", type="dicom", ae_title="STORESCP", host="127.0.0.1", port=port
        )
        deliver(destination, [tmp_path / "rle.dcm"], "RADFUSION")
    finally:
        scp.terminate()
        scp.wait(10)
    [path] = list(received.iterdir())
    stored = pydicom.dcmread(path)
    assert not stored.file_meta.TransferSyntaxUID.is_compressed
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert (stored.pixel_array == pydicom.dcmread(ct_study.files[0]).pixel_array).all()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
