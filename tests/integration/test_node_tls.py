"""DICOM TLS against real peers: dcmtk storescu (BCP 195 profile) as the scanner into the
node, and radfusion's C-STORE export into dcmtk storescp with TLS, with certificates made at
test time."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from radfusion.config import DestinationTLS, DicomDestination
from radfusion.integrations.dicom.export import DeliveryError, deliver
from tests.conftest import free_port, make_pki, require_tool, storescu, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_args(pki: dict[str, Path], identity: str | None, trust: str = "ca") -> list[str]:
    """storescu's TLS options: present ``identity`` (None: anonymous TLS), trust ``trust``."""
    present = ["+tls", str(pki[f"{identity}-key"]), str(pki[identity])] if identity else ["+tla"]
    return [*present, "+cf", str(pki[trust])]


def instances(node: Any) -> int:
    db = sqlite3.connect(node.spool / "catalog.sqlite")
    return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


@pytest.fixture
def tls_node(node_factory: Any, pki: dict[str, Path]) -> Any:
    return node_factory(
        {
            "node": {
                "acse_timeout_s": 3,
                "tls": {
                    "certificate": str(pki["server"]),
                    "private_key": str(pki["server-key"]),
                    "client_ca": str(pki["ca"]),
                },
            }
        },
        start=False,
    ).start(probe=False)


def test_a_caller_with_a_certificate_of_our_ca_stores(
    tls_node: Any, pki: dict[str, Path], ct_study: Any
) -> None:
    r = storescu(tls_node.port, ct_study.files[:3], extra=tls_args(pki, "client"))
    assert r.returncode == 0, r.stderr
    assert instances(tls_node) == 3
    assert "TLS connection from 127.0.0.1, certificate 'CT_SCANNER'" in tls_node.log()
    assert "DICOM TLS, mutual" in tls_node.log()


def test_plain_expired_foreign_and_anonymous_callers_are_refused(
    tls_node: Any, pki: dict[str, Path], ct_study: Any
) -> None:
    one = [ct_study.files[0]]
    assert storescu(tls_node.port, one).returncode != 0  # plain TCP
    assert storescu(tls_node.port, one, extra=tls_args(pki, "expired")).returncode != 0
    assert storescu(tls_node.port, one, extra=tls_args(pki, "stranger")).returncode != 0
    assert storescu(tls_node.port, one, extra=tls_args(pki, None)).returncode != 0
    # and a caller that does not trust the node's certificate stops on its own side
    refused = storescu(tls_node.port, one, extra=tls_args(pki, "client", trust="stranger-ca"))
    assert refused.returncode != 0
    log = tls_node.log()
    assert log.count("TLS handshake failed") >= 4, log
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate" in log.lower()
    assert instances(tls_node) == 0
    ok = storescu(tls_node.port, one, extra=tls_args(pki, "client"))
    assert ok.returncode == 0, ok.stderr


def test_a_stalled_handshake_does_not_hold_up_other_callers(
    tls_node: Any, pki: dict[str, Path], ct_study: Any
) -> None:
    """pynetdicom handshakes in its accept loop: one silent connection stopped every other."""
    silent = [socket.create_connection(("127.0.0.1", tls_node.port)) for _ in range(3)]
    try:
        # Before, the accept loop waited on the silent handshakes and this caller's own TLS
        # handshake timed out ("TLS read operation did not complete").
        r = storescu(tls_node.port, [ct_study.files[0]], extra=tls_args(pki, "client"))
        assert r.returncode == 0, r.stderr
        wait_for(
            lambda: tls_node.log().count("TLS handshake failed") >= 3,
            10,
            "the silent connections closed at the deadline",
        )
    finally:
        for sock in silent:
            sock.close()


def test_export_over_tls_to_storescp(tmp_path: Path, pki: dict[str, Path], ct_study: Any) -> None:
    """radfusion's C-STORE export with mutual TLS into dcmtk storescp (requires our
    certificate), and refused when the peer's certificate is not trusted."""
    exe = require_tool("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(
        [exe, "-od", str(received), "-aet", "TLS_PACS",
         "+tls", str(pki["server-key"]), str(pki["server"]), "+cf", str(pki["ca"]), "-rc",
         str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: _listening(port), 10, "storescp listening")
        tls = DestinationTLS(
            ca_certificates=pki["ca"], certificate=pki["client"], private_key=pki["client-key"]
        )
        dest = DicomDestination(
            name="pacs", ae_title="TLS_PACS", host="127.0.0.1", port=port, tls=tls
        )
        deliver(dest, list(ct_study.files[:2]), "RADFUSION")
        assert {pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir()} == {
            pydicom.dcmread(p).SOPInstanceUID for p in ct_study.files[:2]
        }
        untrusting = dest.model_copy(
            update={"tls": tls.model_copy(update={"ca_certificates": pki["stranger-ca"]})}
        )
        with pytest.raises(DeliveryError, match="TLS refused"):
            deliver(untrusting, [ct_study.files[2]], "RADFUSION")
        anonymous = dest.model_copy(update={"tls": DestinationTLS(ca_certificates=pki["ca"])})
        with pytest.raises(DeliveryError, match="TLS refused"):
            deliver(anonymous, [ct_study.files[2]], "RADFUSION")
    finally:
        scp.terminate()
        scp.wait(10)
    assert len(list(received.iterdir())) == 2


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
