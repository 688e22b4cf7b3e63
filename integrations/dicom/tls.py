"""DICOM TLS (PS3.15 Annex B) for the node and for C-STORE exports, to the BCP 195 profile:
TLS 1.2 or later, forward-secret AEAD cipher suites only.

pynetdicom's server performs each TLS handshake in its accept loop, so one caller that connects
and never finishes its handshake would stop every other caller from connecting.
:class:`DeferredHandshake` hands pynetdicom sockets whose handshake has not started;
:func:`handshake` completes it in the connection's own thread, within a deadline.
"""

from __future__ import annotations

import socket
import ssl

from radfusion.config import DestinationTLS, NodeTLS

__all__ = ["DeferredHandshake", "client_context", "handshake", "server_context"]

# BCP 195 (RFC 9325) for TLS 1.2; TLS 1.3 suites are all AEAD and forward-secret.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def server_context(tls: NodeTLS) -> ssl.SSLContext:
    """The node's TLS context: its certificate, and with ``client_ca`` mutual TLS.

    Raises:
        ssl.SSLError, OSError: a certificate or key cannot be loaded.
    """
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.client_ca is not None:
        context.load_verify_locations(cafile=tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: DestinationTLS) -> ssl.SSLContext:
    """The TLS context for a C-STORE destination: its certificate must chain to
    ``ca_certificates`` (or the system's CAs) and name the host; our certificate for mutual
    TLS when configured.

    Raises:
        ssl.SSLError, OSError: a certificate or key cannot be loaded.
    """
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # verifies peer and hostname
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=tls.ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


class DeferredHandshake:
    """Stands in for an ``ssl.SSLContext`` given to pynetdicom's server: wraps accepted
    sockets without starting their handshake (see :func:`handshake`)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def wrap_socket(self, sock: socket.socket, server_side: bool = True) -> ssl.SSLSocket:
        return self.context.wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=False
        )


def handshake(sock: ssl.SSLSocket, timeout_s: float) -> str:
    """Complete the server side of ``sock``'s handshake within ``timeout_s`` seconds; returns
    the peer certificate's subject common name ("" without one).

    Raises:
        ssl.SSLError: the handshake failed (plain TCP, expired or untrusted certificate, no
            common protocol or cipher).
        OSError: the peer went away or the deadline passed (TimeoutError).
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout_s)
    try:
        sock.do_handshake()
    finally:
        sock.settimeout(previous)
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for attribute in rdn:
            if attribute[0] == "commonName":
                return str(attribute[1])
    return ""
