"""Authentication to the FHIR server: none, a static bearer token, or SMART Backend Services.

SMART Backend Services (the HL7 SMART App Launch "backend services" profile): radfusion signs
a short-lived JWT with its registered private key (``RS384`` or ``ES384``; ``iss`` = ``sub``
= client id, ``aud`` = the token endpoint, ``exp`` ≤ 5 minutes ahead, a fresh ``jti``), posts
it as a ``client_credentials`` grant with ``client_assertion_type``
``urn:ietf:params:oauth:client-assertion-type:jwt-bearer``, and caches the access token until
shortly before it expires. A 401 from the FHIR server invalidates the cache once.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

import httpx

from radfusion.config import FhirAuth
from radfusion.errors import RadfusionError, Unavailable

__all__ = [
    "Auth",
    "AuthError",
    "AuthUnavailable",
    "BearerToken",
    "NoAuth",
    "SmartBackendServices",
    "make_auth",
]

_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_ASSERTION_LIFETIME_S = 300  # the profile's maximum
_REFRESH_MARGIN_S = 30  # renew a cached token this long before it expires


class AuthError(RadfusionError, RuntimeError):
    """No access token could be obtained: the token endpoint refused us (a configuration
    problem). The message says from where and why, never the key or the token."""


class AuthUnavailable(AuthError, Unavailable):
    """No access token could be obtained because the token endpoint was unreachable or
    failing (5xx, 429): a later attempt may work."""


class Auth(Protocol):
    """Gives the Authorization header for a request; ``invalidate`` after a 401."""

    def headers(self) -> dict[str, str]: ...

    def invalidate(self) -> bool:
        """Drop the credentials a 401 rejected; True when asking again may give others
        (worth one more request), False when they cannot change."""
        ...


class NoAuth:
    def headers(self) -> dict[str, str]:
        return {}

    def invalidate(self) -> bool:
        return False


class BearerToken:
    """A static token from the configuration (a 401 cannot be cured by asking again)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        return False


class SmartBackendServices:
    """Access tokens from a SMART Backend Services token endpoint, cached until near expiry.

    Args:
        token_url: the token endpoint (also the JWT's ``aud``).
        client_id: the registered client id (``iss`` and ``sub``).
        private_key: PEM text of the RSA or EC P-384 private key.
        algorithm: ``RS384`` or ``ES384``.
        key_id: the key's ``kid``, when the server holds several keys for the client.
        scope: the scopes asked for.
        http: the client that reaches the token endpoint (timeouts, TLS).
    """

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        private_key: str,
        algorithm: str,
        key_id: str | None,
        scope: str,
        http: httpx.Client,
    ) -> None:
        if algorithm not in ("RS384", "ES384"):
            raise AuthError(f"SMART Backend Services allows RS384 or ES384, not {algorithm}")
        self.token_url = token_url
        self.client_id = client_id
        self.algorithm = algorithm
        self.key_id = key_id
        self.scope = scope
        self._key = private_key
        self._http = http
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0

    def assertion(self, now: float | None = None) -> str:
        """A signed client assertion JWT for one token request."""
        import jwt

        now = time.time() if now is None else now
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "exp": int(now) + _ASSERTION_LIFETIME_S,
            "iat": int(now),
            "jti": uuid.uuid4().hex,
        }
        headers = {"typ": "JWT", **({"kid": self.key_id} if self.key_id else {})}
        try:
            return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as err:
            raise AuthError(
                f"cannot sign the {self.algorithm} client assertion with the configured key: "
                f"{type(err).__name__}"
            ) from None

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or time.time() >= self._expires_at:
                self._token, self._expires_at = self._fetch()
            return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        with self._lock:
            self._token = None
        return True

    def _fetch(self) -> tuple[str, float]:
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": _ASSERTION_TYPE,
            "client_assertion": self.assertion(),
        }
        try:
            response = self._http.post(self.token_url, data=form)
        except httpx.HTTPError as err:
            raise AuthUnavailable(
                f"token endpoint {self.token_url}: {type(err).__name__}"
            ) from None
        if response.status_code != 200:
            # OAuth errors are {"error": ..., "error_description": ...}: no secrets in them.
            detail = ""
            try:
                body = response.json()
                detail = f": {body.get('error', '')} {body.get('error_description', '')}".rstrip()
            except ValueError:
                pass
            failing = response.status_code >= 500 or response.status_code == 429
            raise (AuthUnavailable if failing else AuthError)(
                f"token endpoint {self.token_url} answered {response.status_code}{detail}"
            )
        try:
            body = response.json()
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise AuthError(f"token endpoint {self.token_url} gave no access_token") from None
        return token, time.time() + max(0.0, lifetime - _REFRESH_MARGIN_S)


def make_auth(config: FhirAuth, http: httpx.Client) -> Auth:
    """The authentication the configuration names.

    Raises:
        AuthError: the private key file cannot be read.
    """
    if config.type == "bearer":
        return BearerToken(str(config.token))
    if config.type == "smart-backend":
        try:
            key = Path(str(config.private_key)).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as err:
            raise AuthError(f"cannot read the private key {config.private_key}: {err}") from None
        return SmartBackendServices(
            token_url=str(config.token_url),
            client_id=str(config.client_id),
            private_key=key,
            algorithm=config.algorithm,
            key_id=config.key_id,
            scope=config.scope,
            http=http,
        )
    return NoAuth()
