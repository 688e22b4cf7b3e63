"""STOW-RS export to a real Orthanc (DICOMweb plugin): stored, a broken instance refused alone
and not retried, basic auth right and wrong, TLS with the right and a wrong CA.

Debian's Orthanc 1.10.1 crashes (SIGSEGV) on its first HTTPS request, so TLS is terminated by
a proxy in these tests (Python's ssl, TLS 1.2+, a certificate made at test time) that passes
the bytes on to Orthanc: the TLS handshake and verification are real, the proxy is ours."""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from radfusion.config import parse_config
from radfusion.integrations.dicom.export import Exporter
from radfusion.integrations.store.catalog import Catalog
from tests.conftest import Orthanc, free_port, make_certificates

pytestmark = pytest.mark.integration

USER, PASSWORD = "radfusion", "stow-pw-9d2e"


@pytest.fixture(scope="module")
def guarded_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A second Orthanc that asks for HTTP basic authentication."""
    server = Orthanc(
        tmp_path_factory.mktemp("orthanc-auth"),
        free_port(),
        free_port(),
        settings={"AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}},
        user=(USER, PASSWORD),
    ).start()
    yield server
    server.stop()


class TLSProxy:
    """Accepts TLS (1.2 or later) with ``certificate``/``key`` and relays each connection to
    ``target_port`` on this host."""

    def __init__(
        self, certificate: Path, key: Path, target_port: int, client_ca: Path | None = None
    ) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(certificate, key)
        if client_ca is not None:  # mutual TLS: the caller must show a certificate of this CA
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(client_ca)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshake_failures = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(raw,), daemon=True).start()

    def _relay(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_failures += 1
            raw.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.listener.close()


def _exporter(tmp_path: Path, destination: dict[str, Any]) -> tuple[Exporter, Catalog]:
    config = parse_config(
        {
            "export": {
                "destinations": [
                    {"name": "web", "type": "dicomweb", "timeout_s": 10, **destination}
                ],
                "retry": {"attempts": 3, "initial_backoff_s": 0},
            }
        }
    )
    catalog = Catalog(tmp_path / "catalog.sqlite")
    exporter = Exporter(
        config.export, catalog, tmp_path / "outbox", "RADFUSION", sleep=lambda _: None
    )
    return exporter, catalog


def _copies(ct_study: Any, folder: Path, n: int) -> list[Path]:
    """``n`` of the shared CT's files as new instances (fresh SOP Instance UIDs), so every test
    stores something Orthanc has not seen."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in ct_study.files[:n]:
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_stow_stores_every_instance(tmp_path: Path, orthanc: Orthanc, ct_study: Any) -> None:
    files = _copies(ct_study, tmp_path / "in", 3)
    exporter, catalog = _exporter(tmp_path, {"url": f"{orthanc.url}/dicom-web"})
    [result] = exporter.export(files, study_instance_uid=ct_study.StudyInstanceUID)
    assert result.delivered and result.attempts == 1
    assert {_uid(f) for f in files} <= orthanc.instance_uids()
    assert list((tmp_path / "outbox").iterdir()) == [] and catalog.dead_letters() == []


def test_a_broken_instance_is_dead_lettered_alone_and_not_retried(
    tmp_path: Path, orthanc: Orthanc, ct_study: Any
) -> None:
    good, broken = _copies(ct_study, tmp_path / "in", 2)
    ds = pydicom.dcmread(broken)
    del ds.SOPInstanceUID  # Orthanc cannot index it: 400, with the good one listed as stored
    buffer = io.BytesIO()
    ds.save_as(buffer)
    broken.write_bytes(buffer.getvalue())
    exporter, catalog = _exporter(tmp_path, {"url": f"{orthanc.url}/dicom-web"})
    [result] = exporter.export([good, broken], study_instance_uid=ct_study.StudyInstanceUID)
    assert not result.delivered and result.attempts == 1
    assert _uid(good) in orthanc.instance_uids()
    [dead] = catalog.dead_letters()
    assert "HTTP 400 Bad Request" in dead.error and dead.files == 1
    [left] = dead.outbox.iterdir()
    assert "SOPInstanceUID" not in pydicom.dcmread(left)


def test_basic_auth_with_the_password_from_a_file(
    tmp_path: Path, guarded_orthanc: Orthanc, ct_study: Any
) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    files = _copies(ct_study, tmp_path / "in", 2)
    auth = {"type": "basic", "username": USER, "password_file": str(secret)}
    exporter, _ = _exporter(tmp_path, {"url": f"{guarded_orthanc.url}/dicom-web", "auth": auth})
    [result] = exporter.export(files)
    assert result.delivered
    assert {_uid(f) for f in files} <= guarded_orthanc.instance_uids()


def test_a_wrong_password_is_dead_lettered_at_once(
    tmp_path: Path, guarded_orthanc: Orthanc, ct_study: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADFUSION_TEST_PACS_PASSWORD", "not-the-password")
    files = _copies(ct_study, tmp_path / "in", 1)
    auth = {"type": "basic", "username": USER, "password_env": "RADFUSION_TEST_PACS_PASSWORD"}
    exporter, catalog = _exporter(
        tmp_path, {"url": f"{guarded_orthanc.url}/dicom-web", "auth": auth}
    )
    [result] = exporter.export(files)
    assert not result.delivered and result.attempts == 1
    [dead] = catalog.dead_letters()
    assert "HTTP 401 Unauthorized: check the destination's credentials" in dead.error
    assert "not-the-password" not in dead.error
    assert _uid(files[0]) not in guarded_orthanc.instance_uids()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("tls")
    pem = make_certificates(folder)
    other = folder / "other"
    other.mkdir()
    stranger = make_certificates(other)
    proxy = TLSProxy(pem["server"], pem["server-key"], orthanc.http_port)
    mutual = TLSProxy(pem["server"], pem["server-key"], orthanc.http_port, client_ca=pem["ca"])
    yield {
        "url": f"https://127.0.0.1:{proxy.port}/dicom-web",
        "ca": pem["ca"],
        "wrong_ca": stranger["ca"],
        "proxy": proxy,
        "mutual_url": f"https://127.0.0.1:{mutual.port}/dicom-web",
        "pem": pem,
    }
    proxy.close()
    mutual.close()
    shutil.rmtree(folder, ignore_errors=True)


def test_tls_with_the_sites_ca_stores(
    tmp_path: Path, tls: dict[str, Any], orthanc: Orthanc, ct_study: Any
) -> None:
    files = _copies(ct_study, tmp_path / "in", 2)
    exporter, _ = _exporter(tmp_path, {"url": tls["url"], "verify_tls": str(tls["ca"])})
    [result] = exporter.export(files)
    assert result.delivered, result.error
    assert {_uid(f) for f in files} <= orthanc.instance_uids()


def test_tls_with_an_untrusted_certificate_is_refused_and_not_retried(
    tmp_path: Path, tls: dict[str, Any], orthanc: Orthanc, ct_study: Any
) -> None:
    files = _copies(ct_study, tmp_path / "in", 1)
    exporter, catalog = _exporter(tmp_path, {"url": tls["url"], "verify_tls": str(tls["wrong_ca"])})
    [result] = exporter.export(files)
    assert not result.delivered and result.attempts == 1
    [dead] = catalog.dead_letters()
    assert "TLS failed" in dead.error and "CERTIFICATE_VERIFY_FAILED" in dead.error
    assert _uid(files[0]) not in orthanc.instance_uids()


def test_plain_http_to_a_tls_port_is_not_delivered(
    tmp_path: Path, tls: dict[str, Any], orthanc: Orthanc, ct_study: Any
) -> None:
    files = _copies(ct_study, tmp_path / "in", 1)
    before = tls["proxy"].handshake_failures
    exporter, catalog = _exporter(tmp_path, {"url": tls["url"].replace("https", "http")})
    [result] = exporter.export(files)
    assert not result.delivered
    assert tls["proxy"].handshake_failures > before
    assert _uid(files[0]) not in orthanc.instance_uids()
    assert catalog.dead_letters()[0].files == 1


def test_mutual_tls_needs_the_client_certificate(
    tmp_path: Path, tls: dict[str, Any], orthanc: Orthanc, ct_study: Any
) -> None:
    pem = tls["pem"]
    files = _copies(ct_study, tmp_path / "in", 2)
    base = {"url": tls["mutual_url"], "verify_tls": str(pem["ca"])}
    (tmp_path / "without").mkdir()
    (tmp_path / "with").mkdir()
    exporter, _ = _exporter(tmp_path / "without", base)
    [result] = exporter.export(files[:1])
    assert not result.delivered
    assert _uid(files[0]) not in orthanc.instance_uids()
    # The server's own certificate and key, signed by the CA the proxy trusts, as the client's.
    client = {"client_certificate": str(pem["server"]), "client_key": str(pem["server-key"])}
    exporter, _ = _exporter(tmp_path / "with", {**base, **client})
    [result] = exporter.export(files[1:])
    assert result.delivered, result.error
    assert _uid(files[1]) in orthanc.instance_uids()
