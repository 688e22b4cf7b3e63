"""Test doubles around the real FHIR server: the server process, a fault-injecting reverse
proxy, and a SMART Backend Services token endpoint.

- :class:`FhirServer` runs ``tests/fhir_server/server.mjs`` (Medplum's FhirRouter over a
  MemoryRepository on Node); :meth:`FhirEndpoint.tenant` gives a fresh, empty server under its
  own base URL, so tests need not share data.
- :class:`FhirProxy` sits between radfusion's client and that server and misbehaves on request:
  down (connection refused), slow, canned failures (503, 500 with an OperationOutcome, ...),
  bearer-token checks (401 with ``WWW-Authenticate``); it logs every request it saw.
- :class:`SmartTokenEndpoint` is an OAuth2 token endpoint for the SMART Backend Services
  profile: it verifies the client's ``private_key_jwt`` assertion with joserfc (a JOSE
  implementation independent of the PyJWT the client signs with) and issues opaque tokens that
  :meth:`FhirProxy.require_bearer` accepts while they are valid.

Everything listens on 127.0.0.1 only. The fixtures that start these live in conftest.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
FHIR_JSON = "application/fhir+json"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def operation_outcome(code: str, text: str, severity: str = "error") -> dict[str, Any]:
    """A one-issue OperationOutcome (``text`` goes into ``diagnostics``)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}],
    }


# --- the real server ---------------------------------------------------------------------


class FhirHttpError(AssertionError):
    """The FHIR server answered a test's request with an error status; ``outcome`` is the
    OperationOutcome (or whatever JSON) it sent."""

    def __init__(self, method: str, url: str, status: int, outcome: Any) -> None:
        super().__init__(f"{method} {url} -> {status}: {json.dumps(outcome)[:2000]}")
        self.status = status
        self.outcome = outcome


class FhirEndpoint:
    """One FHIR base URL with small helpers for tests to load and read data.

    Args:
        base_url: e.g. ``http://127.0.0.1:PORT/fhir/R4`` (no trailing slash).
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def request(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """Send one request; ``path`` is relative to the base URL (``Patient?gender=male``)
        or absolute (a Bundle ``next`` link). Returns (status, headers, parsed JSON body);
        never raises for an HTTP error status.

        Raises:
            urllib.error.URLError: the server cannot be reached.
        """
        url = (
            path
            if path.startswith(("http://", "https://"))
            else f"{self.base_url}/{path.lstrip('/')}".rstrip("/")
        )
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            url,
            data=data,
            method=method,
            headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON, **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, head, raw = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            status, head, raw = err.code, dict(err.headers), err.read()
        return status, head, json.loads(raw) if raw else None

    def _checked(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        status, _, answer = self.request(method, path, body)
        if status >= 400:
            raise FhirHttpError(method, path, status, answer)
        return dict(answer)

    def get(self, path: str) -> dict[str, Any]:
        """GET ``path`` (relative or absolute) and return the JSON body.

        Raises:
            FhirHttpError: the server answered 4xx/5xx.
        """
        return self._checked("GET", path)

    def post(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """Create ``resource`` (POST /Type), or process a ``transaction``/``batch`` Bundle
        (POST to the base). Returns the created resource or the response Bundle.

        Raises:
            FhirHttpError: the server refused it (a transaction is then not applied at all).
        """
        is_batch = resource.get("resourceType") == "Bundle" and resource.get("type") in (
            "transaction",
            "batch",
        )
        return self._checked("POST", "" if is_batch else str(resource["resourceType"]), resource)

    def put(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """Update ``resource`` (PUT /Type/id); returns the new version.

        Raises:
            FhirHttpError: the server refused it.
        """
        return self._checked("PUT", f"{resource['resourceType']}/{resource['id']}", resource)

    def search(self, query: str) -> list[dict[str, Any]]:
        """All matches of ``query`` (``Observation?patient=...``), following ``next`` links.

        Raises:
            FhirHttpError: a page was refused.
        """
        out: list[dict[str, Any]] = []
        url: str | None = query
        while url:
            page = self.get(url)
            out += [e["resource"] for e in page.get("entry", []) if _mode(e) == "match"]
            url = next((x["url"] for x in page.get("link", []) if x["relation"] == "next"), None)
        return out

    def tenant(self, name: str | None = None) -> FhirEndpoint:
        """A separate, empty FHIR server on the same process (``/t/NAME/fhir/R4``); each new
        name is a new data set, so tests that count matches are not disturbed by others."""
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(self.base_url))
        return FhirEndpoint(f"{origin}/t/{name or uuid.uuid4().hex}/fhir/R4")


def _mode(entry: Mapping[str, Any]) -> str:
    return str((entry.get("search") or {}).get("mode", "match"))


class FhirServer(FhirEndpoint):
    """The test FHIR server process (``node tests/fhir_server/server.mjs``).

    Args:
        node: path of the ``node`` program.
        log_path: where the server's request log and errors go.
        port: the port to listen on (127.0.0.1).
    """

    def __init__(self, node: str, log_path: Path, port: int | None = None) -> None:
        self.port = port or _free_port()
        super().__init__(f"http://127.0.0.1:{self.port}/fhir/R4")
        self.node = node
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @staticmethod
    def installed() -> bool:
        """Whether ``npm ci --prefix tests/fhir_server`` has been run."""
        return (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir()

    @staticmethod
    def node_major(node: str) -> int:
        """The major version of ``node`` (the server needs 20 or newer); 0 if unreadable."""
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
        major = out.stdout.strip().lstrip("v").split(".")[0]
        return int(major) if major.isdigit() else 0

    def start(self, timeout: float = 60) -> FhirServer:
        """Start the process and wait until ``GET metadata`` answers.

        Raises:
            AssertionError: it exited or did not answer within ``timeout`` s (the message
                carries the end of its log).
        """
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.node, str(SERVER_DIR / "server.mjs"), "--port", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=SERVER_DIR,
            )
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"FHIR server exited: {self.log()[-3000:]}")
            try:
                if self.request("GET", "metadata")[0] == 200:
                    self.startup_s = time.monotonic() - started
                    return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"FHIR server did not start in {timeout} s: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --- loopback HTTP services ----------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, owner: _LoopbackService) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        self.server.owner._handle(self, body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class _LoopbackService:
    """A threaded HTTP server on 127.0.0.1 that can be taken down and brought back up on the
    same port (``down = True`` closes the listening socket and every open connection)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._up()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def down(self) -> bool:
        """True while nothing listens on the port: clients get "connection refused"."""
        return self._server is None

    @down.setter
    def down(self, value: bool) -> None:
        if value and self._server is not None:
            self._stop_serving()
        elif not value and self._server is None:
            self._up()

    def close(self) -> None:
        """Stop serving for good (wakes any request held by a delay)."""
        self._closing.set()
        self._stop_serving()

    def _up(self) -> None:
        self._server = _Server(self.port, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def _stop_serving(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def _handle(self, handler: _Handler, body: bytes) -> None:
        raise NotImplementedError

    @staticmethod
    def _answer(
        handler: _Handler, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        try:
            handler.send_response(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() not in ("date", "server"):
                    handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
            handler.close_connection = True

    @staticmethod
    def _json(value: Any) -> bytes:
        return json.dumps(value).encode()


# --- the fault-injecting proxy -------------------------------------------------------------


@dataclass
class LoggedRequest:
    """One request the proxy received, as the client sent it."""

    method: str
    path: str  # path and query string
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int = 0  # what the proxy answered

    @property
    def query(self) -> dict[str, list[str]]:
        """The query parameters (each name → its values, in order)."""
        return parse_qs(urlsplit(self.path).query, keep_blank_values=True)


@dataclass(frozen=True)
class _Canned:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


class FhirProxy(_LoopbackService):
    """A reverse proxy in front of a FHIR endpoint with switchable faults.

    Requests keep their path, query and ``Host`` header, so the server's Bundle links lead
    back through the proxy. Faults apply in this order to each request: ``down`` (refused),
    ``delay_s`` (held before anything else), :meth:`fail_next` (canned answers, before the
    token check), :meth:`require_bearer` (401), then forwarding (``Authorization`` is not
    passed on). :attr:`requests` logs every request received, headers as the client sent them
    (``Authorization`` included), with the status it was answered.

    Args:
        upstream: the FHIR endpoint to forward to; :attr:`base_url` is its base path here.
    """

    def __init__(self, upstream: FhirEndpoint | str) -> None:
        base = str(getattr(upstream, "base_url", upstream)).rstrip("/")
        parts = urlsplit(base)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.base_path = parts.path
        self.delay_s = 0.0
        self.upstream_timeout_s = 60.0
        self.requests: list[LoggedRequest] = []
        self._canned: deque[_Canned] = deque()
        self._bearer: Callable[[str], bool] | None = None
        super().__init__()

    @property
    def base_url(self) -> str:
        """The FHIR base URL to give the client under test."""
        return self.origin + self.base_path

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        body: Mapping[str, Any] | str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``n`` requests with ``status`` and ``body`` instead of forwarding.

        ``body``: a dict is sent as FHIR JSON, text/bytes as ``text/plain``, None as an
        OperationOutcome (code ``transient`` for 429/503, ``exception`` otherwise). Any status
        works, so a test can also inject a crafted 200 (say, a Bundle with a foreign ``next``).
        """
        if body is None:
            code = "transient" if status in (429, 503) else "exception"
            body = operation_outcome(code, f"injected {status} by the test proxy")
        if isinstance(body, Mapping):
            raw, kind = self._json(body), FHIR_JSON
        else:
            raw, kind = (body.encode() if isinstance(body, str) else body), "text/plain"
        canned = _Canned(status, raw, (("Content-Type", kind), *(headers or {}).items()))
        with self._lock:
            self._canned.extend([canned] * n)

    def require_bearer(self, validator: Callable[[str], bool] | str | None) -> None:
        """Demand ``Authorization: Bearer TOKEN`` with ``validator(TOKEN)`` true (a string:
        that exact token; None: no check). Otherwise answer 401 with ``WWW-Authenticate:
        Bearer realm="fhir"`` (plus ``error="invalid_token"`` when a token was sent)."""
        if isinstance(validator, str):
            expected = validator
            self._bearer = lambda token: secrets.compare_digest(token, expected)
        else:
            self._bearer = validator

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def paths(self) -> list[str]:
        """``METHOD path?query`` of each logged request, in order."""
        with self._lock:
            return [f"{r.method} {r.path}" for r in self.requests]

    def _handle(self, handler: _Handler, body: bytes) -> None:
        entry = LoggedRequest(
            handler.command, handler.path, {k.lower(): v for k, v in handler.headers.items()}, body
        )
        with self._lock:
            self.requests.append(entry)
        if self.delay_s and self._closing.wait(self.delay_s):
            return
        with self._lock:
            canned = self._canned.popleft() if self._canned else None
        if canned is not None:
            entry.status = canned.status
            self._answer(handler, canned.status, canned.body, canned.headers)
            return
        refusal = self._check_bearer(entry.headers.get("authorization", ""))
        if refusal is not None:
            entry.status = 401
            outcome = operation_outcome("login", "authentication required")
            self._answer(handler, 401, self._json(outcome), [("Content-Type", FHIR_JSON), refusal])
            return
        entry.status, head, answer = self._forward(handler, body)
        self._answer(handler, entry.status, answer, head)

    def _check_bearer(self, authorization: str) -> tuple[str, str] | None:
        if self._bearer is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip() and self._bearer(token.strip()):
            return None
        challenge = 'Bearer realm="fhir"'
        if token.strip():
            challenge += ', error="invalid_token", error_description="token invalid or expired"'
        return ("WWW-Authenticate", challenge)

    def _forward(self, handler: _Handler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {
            k: v
            for k, v in handler.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() != "authorization"
        }
        conn = http.client.HTTPConnection(
            self.upstream_host, self.upstream_port, timeout=self.upstream_timeout_s
        )
        try:
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        except OSError as err:
            outcome = operation_outcome("transient", f"upstream unreachable: {err}")
            return 502, [("Content-Type", FHIR_JSON)], self._json(outcome)
        finally:
            conn.close()


# --- SMART Backend Services ----------------------------------------------------------------


@dataclass(frozen=True)
class ClientKey:
    """A client's signing key pair for SMART Backend Services tests."""

    algorithm: str  # RS384 or ES384
    kid: str
    private_pem: str
    public_jwk: dict[str, Any]

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWK Set a client registers with the token endpoint."""
        return {"keys": [self.public_jwk]}


def generate_client_key(algorithm: str = "RS384", kid: str | None = None) -> ClientKey:
    """A fresh RSA 2048 (RS384) or EC P-384 (ES384) key pair with its public JWK.

    Raises:
        ValueError: another algorithm.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from joserfc.jwk import ECKey, RSAKey

    if algorithm == "RS384":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES384":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        raise ValueError(f"SMART Backend Services uses RS384 or ES384, not {algorithm}")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk_cls: Any = RSAKey if algorithm == "RS384" else ECKey
    jwk = jwk_cls.import_key(public).as_dict(private=False)
    jwk.update(kid=kid or uuid.uuid4().hex[:16], alg=algorithm, use="sig")
    return ClientKey(algorithm, jwk["kid"], pem, jwk)


def sign_assertion(
    key: ClientKey,
    *,
    client_id: str,
    token_url: str,
    lifetime_s: int = 300,
    now: float | None = None,
    algorithm: str | None = None,
    header: Mapping[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A client assertion as a SMART client signs it (PyJWT, as radfusion's client does):
    ``iss = sub = client_id``, ``aud = token_url``, ``exp = now + lifetime_s``, fresh ``jti``,
    ``kid`` in the header. Keyword ``claims`` override or add claims (None removes one)."""
    import jwt

    now = time.time() if now is None else now
    payload: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": int(now) + lifetime_s,
        "iat": int(now),
        "jti": uuid.uuid4().hex,
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"typ": "JWT", "kid": key.kid, **(header or {})}
    return jwt.encode(
        payload, key.private_pem, algorithm=algorithm or key.algorithm, headers=headers
    )


@dataclass(frozen=True)
class IssuedToken:
    """An access token the endpoint gave out."""

    access_token: str
    client_id: str
    scope: str
    issued_at: float
    expires_at: float


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token endpoint and how it was answered (``error`` empty on success;
    ``reason`` is the verifier's own explanation, for assertions in tests)."""

    client_id: str | None
    status: int
    error: str = ""
    reason: str = ""


class TokenRejected(Exception):
    """A token request is refused: ``error`` is the OAuth2 error code."""

    def __init__(self, error: str, reason: str, client_id: str | None = None) -> None:
        super().__init__(f"{error}: {reason}")
        self.error = error
        self.reason = reason
        self.client_id = client_id


@dataclass
class _Client:
    jwks: dict[str, Any]
    scopes: set[str] | None


class SmartTokenEndpoint(_LoopbackService):
    """An OAuth2 token endpoint for SMART Backend Services (``client_credentials`` with a
    ``private_key_jwt`` assertion), verified with joserfc.

    A request succeeds only when: ``grant_type=client_credentials``, ``client_assertion_type``
    is the jwt-bearer URN, the assertion's ``alg`` is RS384 or ES384 and its signature checks
    against the client's registered JWK (by ``kid``; without one, any registered key that
    fits), ``iss == sub ==`` a registered client id, ``aud ==`` :attr:`token_url`, ``exp`` is
    in the future and at most :attr:`max_lifetime_s` ahead, ``jti`` was never seen, and the
    scopes asked for are allowed. Refusals are 400 with an OAuth2 ``{"error",
    "error_description"}`` body (RFC 6749 §5.2; SMART: ``invalid_client`` for a bad
    assertion). Tokens are opaque and live :attr:`expires_in` s.

    Args:
        expires_in: lifetime of issued tokens in seconds (short for refresh tests).
        path: the endpoint's path.
    """

    def __init__(self, expires_in: int = 300, path: str = "/auth/token") -> None:
        self.expires_in = expires_in
        self.max_lifetime_s = 300
        self.path = path
        self.issued: list[IssuedToken] = []
        self.requests: list[TokenRequest] = []
        self._clients: dict[str, _Client] = {}
        self._seen_jti: set[tuple[str, str]] = set()
        self._revoked: set[str] = set()
        self._canned: deque[int] = deque()
        super().__init__()

    @property
    def token_url(self) -> str:
        """The endpoint's URL: what clients post to and put in ``aud``."""
        return self.origin + self.path

    def register_client(
        self, client_id: str, jwks: Mapping[str, Any] | ClientKey, scopes: Iterable[str] = ()
    ) -> None:
        """Register a client's public key(s) (a JWK Set or a :class:`ClientKey`) and the
        scopes it may get (empty: any)."""
        keys = jwks.jwks if isinstance(jwks, ClientKey) else dict(jwks)
        self._clients[client_id] = _Client(keys, set(scopes) or None)

    def validate(self, token: str) -> bool:
        """Whether ``token`` was issued here, is not revoked and has not expired (give this to
        :meth:`FhirProxy.require_bearer`)."""
        now = time.time()
        with self._lock:
            return token not in self._revoked and any(
                t.access_token == token and now < t.expires_at for t in self.issued
            )

    def revoke_all(self) -> None:
        """Invalidate every token issued so far (the next FHIR request gets a 401)."""
        with self._lock:
            self._revoked.update(t.access_token for t in self.issued)

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """Answer the next ``n`` token requests with ``status`` and an OAuth2 error body."""
        with self._lock:
            self._canned.extend([status] * n)

    def verify_assertion(self, assertion: str, now: float | None = None) -> str:
        """Check a client assertion and return its client id (records its ``jti``).

        Raises:
            TokenRejected: any check failed (``error`` is ``invalid_client``).
        """
        from joserfc import jws, jwt
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        now = time.time() if now is None else now
        try:
            unverified = jws.extract_compact(assertion.encode())
            header, claims = unverified.headers(), json.loads(unverified.payload)
        except (JoseError, ValueError) as err:
            raise TokenRejected("invalid_client", f"malformed assertion: {err}") from None
        if not isinstance(claims, dict):
            raise TokenRejected("invalid_client", "the assertion's payload is not an object")
        alg, kid, client_id = header.get("alg"), header.get("kid"), claims.get("iss")
        if alg not in ("RS384", "ES384"):
            raise TokenRejected("invalid_client", f"algorithm {alg!r} not allowed", client_id)
        client = self._clients.get(str(client_id))
        if client is None:
            raise TokenRejected("invalid_client", f"unknown client {client_id!r}", client_id)
        keys = [
            k
            for k in KeySet.import_key_set(client.jwks).keys
            if (kid is None or k.kid == kid) and k.key_type == ("RSA" if alg == "RS384" else "EC")
        ]
        if not keys:
            raise TokenRejected("invalid_client", f"no registered {alg} key {kid!r}", client_id)
        token = None
        for key in keys:
            try:
                token = jwt.decode(assertion, key, algorithms=[alg])
                break
            except JoseError:
                continue
        if token is None:
            raise TokenRejected("invalid_client", "signature does not verify", client_id)
        self._check_claims(token.claims, str(client_id), now)
        return str(client_id)

    def _check_claims(self, claims: dict[str, Any], client_id: str, now: float) -> None:
        from joserfc.errors import JoseError
        from joserfc.jwt import JWTClaimsRegistry

        registry = JWTClaimsRegistry(
            now=int(now),
            iss={"essential": True, "value": client_id},
            sub={"essential": True, "value": client_id},
            aud={"essential": True, "value": self.token_url},
            exp={"essential": True},
            jti={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as err:
            raise TokenRejected("invalid_client", f"claims: {err}", client_id) from None
        if isinstance(claims["aud"], list) and claims["aud"] != [self.token_url]:
            raise TokenRejected("invalid_client", "aud must be the token URL alone", client_id)
        if claims["exp"] > now + self.max_lifetime_s:
            raise TokenRejected(
                "invalid_client", f"exp more than {self.max_lifetime_s} s ahead", client_id
            )
        with self._lock:
            if (client_id, claims["jti"]) in self._seen_jti:
                raise TokenRejected("invalid_client", "jti already used", client_id)
            self._seen_jti.add((client_id, claims["jti"]))

    def _grant(self, form: Mapping[str, list[str]]) -> tuple[str, dict[str, Any]]:
        def one(name: str) -> str:
            values = form.get(name, [])
            if len(values) != 1:
                raise TokenRejected("invalid_request", f"{name} must be given once")
            return values[0]

        if one("grant_type") != "client_credentials":
            raise TokenRejected("unsupported_grant_type", "only client_credentials")
        if one("client_assertion_type") != ASSERTION_TYPE:
            raise TokenRejected("invalid_request", "client_assertion_type must be jwt-bearer")
        client_id = self.verify_assertion(one("client_assertion"))
        scope = form.get("scope", [""])[0]
        allowed = self._clients[client_id].scopes
        if allowed is not None and not set(scope.split()) <= allowed:
            raise TokenRejected("invalid_scope", f"not allowed: {scope}", client_id)
        now = time.time()
        token = IssuedToken(secrets.token_urlsafe(32), client_id, scope, now, now + self.expires_in)
        with self._lock:
            self.issued.append(token)
        return client_id, {
            "access_token": token.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "scope": scope,
        }

    def _handle(self, handler: _Handler, body: bytes) -> None:
        no_store = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
        if handler.command != "POST" or urlsplit(handler.path).path != self.path:
            self._answer(handler, 404, self._json({"error": "not_found"}), no_store)
            return
        with self._lock:
            canned = self._canned.popleft() if self._canned else None
        if canned is not None:
            self.requests.append(TokenRequest(None, canned, "temporarily_unavailable"))
            error = {"error": "temporarily_unavailable", "error_description": "injected"}
            self._answer(handler, canned, self._json(error), no_store)
            return
        try:
            client_id, answer = self._grant(parse_qs(body.decode("utf-8", "replace")))
        except TokenRejected as err:
            self.requests.append(TokenRequest(err.client_id, 400, err.error, err.reason))
            error = {"error": err.error, "error_description": err.reason}
            self._answer(handler, 400, self._json(error), no_store)
            return
        self.requests.append(TokenRequest(client_id, 200))
        self._answer(handler, 200, self._json(answer), no_store)


__all__ = [
    "ASSERTION_TYPE",
    "ClientKey",
    "FhirEndpoint",
    "FhirHttpError",
    "FhirProxy",
    "FhirServer",
    "IssuedToken",
    "LoggedRequest",
    "SmartTokenEndpoint",
    "TokenRejected",
    "TokenRequest",
    "cohort_patients",
    "generate_client_key",
    "operation_outcome",
    "registered_smart_client",
    "sign_assertion",
]


def registered_smart_client(
    endpoint: SmartTokenEndpoint, folder: Path, algorithm: str = "RS384", kid: str = "radfusion-1"
) -> dict[str, Any]:
    """Register a fresh client key at ``endpoint`` (client id ``radfusion``), write its private
    key into ``folder`` and return the ``fhir.auth`` section that uses it."""
    key = generate_client_key(algorithm, kid=kid)
    endpoint.register_client("radfusion", key)
    (folder / "key.pem").write_text(key.private_pem)
    return {
        "type": "smart-backend",
        "token_url": endpoint.token_url,
        "client_id": "radfusion",
        "private_key": str(folder / "key.pem"),
        "algorithm": algorithm,
        "key_id": kid,
    }


def cohort_patients(root: Path, **cohort: Any) -> list[dict[str, Any]]:
    """Write a synthetic cohort into ``root`` (``synth_cohort`` arguments) and return each
    patient: CT ``files``, the first one's ``header`` (no pixels), its ``StudyInstanceUID`` and
    ``PatientID``, the FHIR ``bundle`` and the ``truth``."""
    import pydicom

    from radfusion.synth.cohort import synth_cohort

    synth_cohort(root, **cohort)
    patients = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted((folder / "ct").glob("*.dcm"))
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        patients.append(
            {
                "files": files,
                "header": header,
                "StudyInstanceUID": str(header.StudyInstanceUID),
                "PatientID": str(header.PatientID),
                "bundle": json.loads((folder / "bundle.json").read_text()),
                "truth": json.loads((folder / "ground_truth.json").read_text()),
            }
        )
    return patients
