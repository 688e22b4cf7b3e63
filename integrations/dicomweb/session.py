"""HTTP sessions for DICOMweb destinations: TLS (BCP 195) and credentials, one place."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from radfusion.config import DicomWebDestination

__all__ = ["session_for"]


class _TLSAdapter(HTTPAdapter):
    """TLS 1.2 or later (BCP 195) whatever the system's OpenSSL allows, with the
    destination's CA bundle and client certificate loaded into the one context used."""

    def __init__(self, dest: DicomWebDestination) -> None:
        try:
            context = ssl.create_default_context(
                cafile=str(dest.verify_tls) if isinstance(dest.verify_tls, Path) else None
            )
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"cannot load the CA bundle {dest.verify_tls}: {err}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if dest.verify_tls is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if dest.client_certificate is not None and dest.client_key is not None:
            try:
                context.load_cert_chain(dest.client_certificate, dest.client_key)
            except (OSError, ssl.SSLError) as err:
                raise ValueError(
                    f"cannot load the client certificate {dest.client_certificate}: {err}"
                ) from None
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


def session_for(dest: DicomWebDestination) -> requests.Session:
    """A requests session for ``dest``: its TLS settings and credentials (read now, so a
    rotated secret is picked up).

    Raises:
        ValueError: the secret, CA bundle or client certificate cannot be read.
    """
    session = requests.Session()
    session.mount("https://", _TLSAdapter(dest))
    session.verify = dest.verify_tls is not False
    secret = dest.auth.secret()
    if dest.auth.type == "basic":
        assert dest.auth.username is not None and secret is not None
        session.auth = (dest.auth.username, secret)
    elif dest.auth.type == "bearer":
        session.headers["Authorization"] = f"Bearer {secret}"
    return session
