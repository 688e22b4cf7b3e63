"""Shared fixtures: real tools (dcmtk, dicom3tools, Orthanc) and radfusion node processes.

Integration tests use the real programs. Where one is missing they are skipped locally with the
reason, but on CI (CI=true) a missing tool is a failure: CI installs them all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def require_tool(name: str) -> str:
    """Path of a program, or skip (fail on CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed")
    return path


def evidence_uids(ds: Any) -> set[str]:
    """Every SOP Instance UID in a result's Current Requested Procedure Evidence Sequence."""
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def sr_texts(sr: Any) -> list[str]:
    """Every TEXT content item's value of an SR, in document order."""
    out = []

    def walk(items: Any) -> None:
        for item in items:
            if "TextValue" in item:
                out.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def storescu(
    port: int,
    files: list[Path],
    *,
    calling: str = "STORESCU",
    called: str = "RADFUSION",
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with dcmtk storescu, proposing exactly their SOP classes (-R)."""
    exe = require_tool("storescu")
    return subprocess.run(
        [
            exe,
            "-R",
            "-aet",
            calling,
            "-aec",
            called,
            *(extra or []),
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def echoscu(port: int, calling: str = "ECHOSCU") -> bool:
    exe = require_tool("echoscu")
    r = subprocess.run(
        [exe, "-aet", calling, "-aec", "RADFUSION", "127.0.0.1", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


@dataclass
class NodeProcess:
    """A ``radfusion serve`` process with its own config and spool."""

    config_path: Path
    config: dict[str, Any]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def spool(self) -> Path:
        return Path(self.config["spool"]["path"])

    def start(self, probe: bool = True) -> NodeProcess:
        """Start the node and wait until it answers an association (``probe``) or, for a
        node that only speaks TLS, until it logs that it listens."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (open while the process runs)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radfusion.cli", "serve", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        ready = self._listening if probe else self._logged_listening
        wait_for(ready, 30, "the radfusion node to listen")
        return self

    def _logged_listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited: {self.log()}")
        return "listening on" in self.log()

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited: {self.log()}")
        # A bare TCP probe would hold an association slot until the ACSE timeout; a real
        # association attempt (accepted or rejected) ends cleanly.
        from pynetdicom import AE

        ae = AE(ae_title="PROBE")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title="RADFUSION")
        answered = assoc.is_established or assoc.is_rejected
        if assoc.is_established:
            assoc.release()
        return bool(answered)

    def kill(self) -> None:
        """SIGKILL: no clean-up, as in a crash or power cut of the process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self._log:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "radfusion.cli", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Make node processes: ``node_factory(config_overrides)``; all stopped at teardown."""
    nodes: list[NodeProcess] = []

    def make(overrides: dict[str, Any] | None = None, start: bool = True) -> NodeProcess:
        port = free_port()
        n = len(nodes)
        config: dict[str, Any] = {
            "node": {"host": "127.0.0.1", "port": port, "allowed_callers": [{"ae_title": "*"}]},
            "spool": {"path": str(tmp_path / f"spool{n}"), "min_free_mb": 1},
            "completion": {"quiet_period_s": 1.5},
        }
        for key, value in (overrides or {}).items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        path = tmp_path / f"node{n}.yaml"
        path.write_text(yaml.safe_dump(config))
        node = NodeProcess(path, config, port, tmp_path / f"node{n}.log")
        nodes.append(node)
        return node.start() if start else node

    yield make
    for node in nodes:
        node.stop()


@dataclass
class Orthanc:
    """A real Orthanc PACS (DICOM + REST + DICOMweb), started once per session. ``settings``
    are added to its configuration (e.g. TLS and registered users); ``user`` and ``ca`` are
    what the tests' own REST calls then need."""

    root: Path
    dicom_port: int
    http_port: int
    proc: subprocess.Popen[bytes] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    user: tuple[str, str] | None = None
    ca: Path | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.get("SslEnabled") else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        exe = require_tool("Orthanc")
        config = {
            "Name": "radfusion-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": ["/usr/share/orthanc/plugins"],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpTimeout": 30,
            "StableAge": 1,
            **self.settings,
        }
        (self.root / "orthanc.json").write_text(json.dumps(config))
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 (held by the process)
        self.proc = subprocess.Popen(
            [exe, str(self.root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        wait_for(self._up, 60, "Orthanc to start")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError((self.root / "orthanc.log").read_text(errors="replace")[-3000:])
        try:
            self.get("/system")
        except (urllib.error.URLError, ConnectionError, OSError):
            return False
        return True

    def _open(self, request: urllib.request.Request) -> Any:
        import base64
        import ssl

        if self.user is not None:
            token = base64.b64encode(":".join(self.user).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            body = r.read()
            return json.loads(body) if body.strip() else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def get(self, path: str) -> Any:
        return self._open(urllib.request.Request(self.url + path))

    def delete(self, path: str) -> Any:
        return self._open(urllib.request.Request(self.url + path, method="DELETE"))

    def destination(self, **extra: Any) -> dict[str, Any]:
        """This Orthanc as a radfusion ``export.destinations`` entry named ``pacs``."""
        return {
            "name": "pacs",
            "type": "dicom",
            "ae_title": "ORTHANC",
            "host": "127.0.0.1",
            "port": self.dicom_port,
            **extra,
        }

    def post(self, path: str, body: Any, method: str = "POST") -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        return self._open(request)

    def put(self, path: str, body: Any) -> Any:
        return self.post(path, body, method="PUT")

    def instance_uids(self) -> set[str]:
        out = set()
        for oid in self.get("/instances"):
            out.add(self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"])
        return out


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port()).start()
    yield server
    server.stop()


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate (with its key) for 127.0.0.1, made with the openssl
    command: ``ca``, ``ca-key``, ``server``, ``server-key``."""
    openssl = require_tool("openssl")
    files = {n: folder / f"{n}.pem" for n in ("ca", "ca-key", "server", "server-key")}
    csr, ext = folder / "server.csr", folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
         "-keyout", files["ca-key"], "-out", files["ca"]],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", files["server-key"], "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", files["ca"], "-CAkey", files["ca-key"],
         "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", files["server"]],
    ):  # fmt: skip
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)
    return files


def make_pki(folder: Path) -> dict[str, Path]:
    """Certificates for DICOM TLS tests, made with ``cryptography``: a CA (``ca``), a server
    certificate for 127.0.0.1 (``server``/``server-key``), a client (``client``/
    ``client-key``), an expired client (``expired``/``expired-key``) of that CA, and a
    client of another CA (``stranger``/``stranger-key``, CA ``stranger-ca``)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    files: dict[str, Path] = {}

    def save(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            files[f"{name}-key"] = folder / f"{name}-key.pem"
            files[f"{name}-key"].write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

    def issue(
        cn: str,
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
        *,
        ca: bool = False,
        server: bool = False,
        days: tuple[int, int] = (-1, 2),
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer[0].subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days[0]))
            .not_valid_after(now + dt.timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
        else:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        signer = issuer[1] if issuer else key
        return builder.sign(signer, hashes.SHA256()), key

    ca = issue("radfusion-test-ca", None, ca=True)
    save("ca", ca[0], None)
    save("server", *issue("127.0.0.1", ca, server=True))
    save("client", *issue("CT_SCANNER", ca))
    save("expired", *issue("OLD_SCANNER", ca, days=(-30, -1)))
    stranger_ca = issue("someone-else-ca", None, ca=True)
    save("stranger-ca", stranger_ca[0], None)
    save("stranger", *issue("STRANGER", stranger_ca))
    return files


def reversed_enhanced_ct(images: Sequence[Any], folder: Path) -> tuple[Any, Any]:
    """A Legacy Converted Enhanced CT of ``images`` with its frames in reverse slice order (so
    frame number != slice index + 1), written into ``folder``; returns it and its Volume."""
    import highdicom as hd
    import pydicom

    from radfusion.operators.volume import assemble_volume

    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        list(reversed(images)),
        series_instance_uid="1.2.826.0.1.3680043.10.1234.9.80",
        series_number=2,
        sop_instance_uid="1.2.826.0.1.3680043.10.1234.9.81",
        instance_number=1,
    )
    enhanced.save_as(folder / "enhanced.dcm")
    return enhanced, assemble_volume([pydicom.dcmread(folder / "enhanced.dcm")])


@pytest.fixture(scope="session")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small synthetic chest CT (40 slices, 128×128), shared read-only by tests."""
    from radfusion.synth.ct_series import synth_ct

    return synth_ct(
        tmp_path_factory.mktemp("ct"),
        slices=40,
        seed=7,
        rows=128,
        columns=128,
        patient_id="RF-TEST-1",
    )


def start_triton(repository: Path, **options: Any) -> Any:
    """A real ``tritonserver`` on ``repository`` (skip locally, fail on CI, when it is not
    installed: ``make .triton`` installs it)."""
    from tests.triton_server import (
        LocalTritonServer,
        TritonServerNotFound,
    )

    try:
        server = LocalTritonServer(repository, ["lung_ct_seg", "lung_fusion"], **options)
    except TritonServerNotFound as err:
        if os.environ.get("CI"):
            pytest.fail(f"{err}; `make test` must install it")
        pytest.skip(str(err))
    return server.start()


@pytest.fixture(scope="session")
def triton_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference models as a CPU, Python-backend Triton repository."""
    from radfusion.integrations.inference.repository import write_repository

    root = tmp_path_factory.mktemp("triton-repo")
    write_repository(root, cpu=True, backend="python")
    return root


@pytest.fixture(scope="session")
def triton(triton_repository: Path) -> Iterator[Any]:
    """One real Triton server for the session (tests that kill a server start their own)."""
    server = start_triton(triton_repository)
    yield server
    server.close()


# --- FHIR: a real server (Medplum on Node), a fault-injecting proxy, a SMART token endpoint ---
# The classes are in tests/fhir_support.py; `make test` installs the server's node_modules.
from tests.fhir_support import FhirEndpoint, FhirProxy, FhirServer, SmartTokenEndpoint  # noqa: E402


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    """The real FHIR R4 server (``tests/fhir_server``), one per session: a
    ``tests.fhir_support.FhirServer`` with ``base_url``, ``get``, ``post``, ``search`` and
    ``tenant()`` (a fresh, empty server of its own; prefer it where a test counts matches)."""
    node = require_tool("node")
    message = ""
    if FhirServer.node_major(node) < 20:
        message = f"{node} is older than Node 20, which the test FHIR server needs"
    elif not FhirServer.installed():
        message = "tests/fhir_server/node_modules is missing: run `make test` (npm ci)"
    if message and os.environ.get("CI"):
        pytest.fail(message)
    if message:
        pytest.skip(message)
    server = FhirServer(node, tmp_path_factory.mktemp("fhir") / "server.log").start()
    yield server
    server.stop()


@pytest.fixture
def fhir_tenant(fhir_server: FhirServer) -> FhirEndpoint:
    """A fresh, empty FHIR server for one test (a tenant of the session's process)."""
    return fhir_server.tenant()


@pytest.fixture
def fhir_proxy(fhir_server: FhirServer) -> Iterator[Callable[..., FhirProxy]]:
    """Make fault-injecting proxies: ``fhir_proxy(upstream=None)`` → ``FhirProxy``
    in front of ``upstream`` (an endpoint such as ``fhir_tenant``; default: the session's
    server); all closed at teardown."""
    proxies: list[FhirProxy] = []

    def make(upstream: FhirEndpoint | str | None = None) -> FhirProxy:
        proxy = FhirProxy(upstream if upstream is not None else fhir_server)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def smart_token_endpoint() -> Iterator[SmartTokenEndpoint]:
    """A SMART Backend Services token endpoint for one test (``tests.fhir_support.
    SmartTokenEndpoint``: ``register_client``, ``token_url``, ``validate``, ``issued``, ...)."""
    endpoint = SmartTokenEndpoint()
    yield endpoint
    endpoint.close()
