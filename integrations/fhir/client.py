"""A small FHIR R4 REST client: read and search with paging, retries and authentication.

What it is for: fetching a patient's context while a study is processed. Hospital FHIR
servers are slow sometimes, down sometimes and answer with OperationOutcomes; this client turns
each of those into one of two errors, so the caller can decide what to do:

- :class:`FhirUnavailable`: the server could not be reached or kept failing (connection
  errors, timeouts, 429, 5xx) after the retries. Transient: the same request may work later.
- :class:`FhirError`: the server answered and refused (4xx, a malformed answer). Its
  ``outcome`` holds the OperationOutcome's issues (severity, code), without their free text.

Logs name resource types and HTTP statuses only: never identifiers, names, or the
OperationOutcome diagnostics text (servers echo patient data into it).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from radfusion import audit
from radfusion.config import FhirConfig
from radfusion.errors import RadfusionError, Unavailable
from radfusion.integrations.fhir.auth import Auth, AuthError, make_auth

__all__ = ["FhirClient", "FhirError", "FhirUnavailable", "OutcomeIssue", "SearchResult"]

log = logging.getLogger("radfusion.fhir")
# httpx logs every request URL at INFO, and search URLs carry patient identifiers.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_RETRY_STATUSES = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class OutcomeIssue:
    """One OperationOutcome issue, without its diagnostics text."""

    severity: str
    code: str
    details: str = ""  # the details' coding codes, e.g. "MSG_NO_MATCH" (coded, not free text)


class FhirError(RadfusionError, RuntimeError):
    """The FHIR server refused a request or answered something unusable."""

    def __init__(
        self, message: str, *, status: int | None = None, outcome: tuple[OutcomeIssue, ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


class FhirUnavailable(FhirError, Unavailable):
    """The FHIR server could not be reached, timed out or kept failing after the retries."""


@dataclass
class SearchResult:
    """The resources of a search (``match``) and those ``_include`` brought (``include``),
    after following ``next`` links; ``pages`` counts the round trips."""

    match: list[dict[str, Any]] = field(default_factory=list)
    include: list[dict[str, Any]] = field(default_factory=list)
    pages: int = 0

    def included(self, reference: str) -> dict[str, Any] | None:
        """The included (or matched) resource a ``Type/id`` reference points at."""
        for resource in (*self.include, *self.match):
            if f"{resource.get('resourceType')}/{resource.get('id')}" == reference:
                return resource
        return None


def _issues(body: Any) -> tuple[OutcomeIssue, ...]:
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ()
    issues = []
    for issue in body.get("issue") or []:
        codes = [
            str(c.get("code", ""))
            for c in ((issue.get("details") or {}).get("coding") or [])
            if isinstance(c, dict)
        ]
        issues.append(
            OutcomeIssue(
                severity=str(issue.get("severity", "")),
                code=str(issue.get("code", "")),
                details=",".join(c for c in codes if c),
            )
        )
    return tuple(issues)


def _describe(issues: tuple[OutcomeIssue, ...]) -> str:
    return "; ".join(
        f"{i.severity} {i.code}" + (f" ({i.details})" if i.details else "") for i in issues
    )


def _retry_after(response: httpx.Response | None) -> float | None:
    """The seconds a 429/503 answer's ``Retry-After`` asks for (delta-seconds or HTTP-date),
    or None when it has none that can be read."""
    value = response.headers.get("Retry-After", "").strip() if response is not None else ""
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are GMT, never local time
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - time.time())


class FhirClient:
    """Reads, searches and (for the write-back) creates and updates resources on one FHIR R4
    server.

    Args:
        config: the ``fhir:`` configuration section.
        transport: an httpx transport (tests may pass one; default: the network).

    Raises:
        AuthError: the configured private key cannot be read.
    """

    def __init__(self, config: FhirConfig, *, transport: httpx.BaseTransport | None = None):
        self.config = config
        self.base_url = config.base_url
        verify = (
            str(config.verify_tls)
            if not isinstance(config.verify_tls, bool)
            else (config.verify_tls)
        )
        self._http = httpx.Client(
            timeout=config.timeout_s,
            verify=verify,
            transport=transport,
            headers={"Accept": "application/fhir+json"},
            follow_redirects=False,
        )
        self.auth: Auth = make_auth(config.auth, self._http)
        self._origin = urlsplit(self.base_url)[:2]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET [base]/Type/id``.

        Raises:
            FhirError: not found (status 404/410) or refused; FhirUnavailable as above.
        """
        return self._get(f"{self.base_url}/{resource_type}/{resource_id}", None, resource_type)

    def search(self, resource_type: str, params: Mapping[str, str | list[str]]) -> SearchResult:
        """``GET [base]/Type?params`` and every ``next`` page (at most ``max_pages``).

        ``_count`` defaults to the configured page size. ``next`` links must stay on the
        server's own origin (the request carries the access token); a relative one (some
        servers behind proxies send them) is resolved against the page it came on.

        Raises:
            FhirError: the server refused the search, answered with something other than a
                searchset Bundle, sent a ``next`` link elsewhere, or had more pages than
                ``max_pages``. FhirUnavailable as above.
        """
        try:
            result = self._search(resource_type, params)
        except FhirError as err:
            self._audit_query(resource_type, 8, type(err).__name__)
            raise
        self._audit_query(
            resource_type, 0, f"{len(result.match)} match(es), {result.pages} page(s)"
        )
        return result

    def _audit_query(self, resource_type: str, outcome: int, detail: str) -> None:
        # The query's parameters identify the patient: the trail names the resource type only.
        audit.record(
            audit.QUERY,
            outcome=outcome,
            participants=[{"role": "server", "url": self.base_url}],
            objects=[{"resource": resource_type}],
            detail=detail,
        )

    def _search(self, resource_type: str, params: Mapping[str, str | list[str]]) -> SearchResult:
        query: dict[str, str | list[str]] = {"_count": str(self.config.page_size), **params}
        url: str | None = f"{self.base_url}/{resource_type}"
        result = SearchResult()
        while url is not None:
            if result.pages >= self.config.max_pages:
                raise FhirError(
                    f"{resource_type} search has more than {self.config.max_pages} pages"
                )
            bundle = self._get(url, query, resource_type)
            page_url = url
            result.pages += 1
            query = {}  # a next link carries its own query
            if bundle.get("resourceType") != "Bundle":
                raise FhirError(f"{resource_type} search answered a {bundle.get('resourceType')}")
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource")
                if not isinstance(resource, dict):
                    continue
                mode = (entry.get("search") or {}).get("mode", "match")
                if resource.get("resourceType") == "OperationOutcome":
                    issues = _issues(resource)
                    if issues:
                        log.warning("FHIR %s search outcome: %s", resource_type, _describe(issues))
                    continue
                (result.include if mode == "include" else result.match).append(resource)
            url = next(
                (
                    urljoin(page_url, str(link.get("url")))
                    for link in bundle.get("link") or []
                    if link.get("relation") == "next" and link.get("url")
                ),
                None,
            )
            if url is not None and urlsplit(url)[:2] != self._origin:
                raise FhirError(f"{resource_type} search: next link leaves the server's origin")
        return result

    def create(
        self, resource: Mapping[str, Any], *, if_none_exist: str | None = None
    ) -> dict[str, Any]:
        """``POST [base]/Type`` (with ``If-None-Exist: if_none_exist``, a conditional create
        where the server supports it); returns the resource as stored.

        Raises:
            FhirError: refused (e.g. 403, 422 with its OperationOutcome's codes);
                FhirUnavailable after the retries, as for reads.
        """
        kind = str(resource["resourceType"])
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else {}
        return self._send("POST", f"{self.base_url}/{kind}", None, kind, resource, headers)

    def update(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """``PUT [base]/Type/id`` of a resource that has an ``id``; returns it as stored.

        Raises:
            FhirError, FhirUnavailable: as :meth:`create`.
        """
        kind, rid = str(resource["resourceType"]), str(resource["id"])
        return self._send("PUT", f"{self.base_url}/{kind}/{rid}", None, kind, resource, {})

    def _get(self, url: str, params: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
        return self._send("GET", url, params, what, None, {})

    def _send(
        self,
        method: str,
        url: str,
        params: Mapping[str, Any] | None,
        what: str,
        body: Mapping[str, Any] | None,
        headers: Mapping[str, str],
    ) -> dict[str, Any]:
        """One request with the retries (transport errors, 429/5xx), a token refresh on a
        first 401, and refusals as :class:`FhirError`. A write is sent again only after an
        answer saying it was not done or no answer at all: the writes radfusion sends are
        idempotent (an update by id, a create guarded by ``If-None-Exist``)."""
        delays = self.config.retry.delays()
        refreshed = False
        attempt = 0
        while True:
            response: httpx.Response | None  # None: the request never got an answer
            try:
                # params=None keeps a next link's own query (an empty dict would replace it).
                response = self._http.request(
                    method,
                    url,
                    params=params or None,
                    json=body,
                    headers={
                        **self.auth.headers(),
                        **headers,
                        **({"Content-Type": "application/fhir+json"} if body is not None else {}),
                    },
                )
            except AuthError as err:
                # Only an unreachable or failing token endpoint may pass; a refusal (say,
                # invalid_client) is configuration, and waiting will not cure it.
                kind = FhirUnavailable if isinstance(err, Unavailable) else FhirError
                raise kind(f"FHIR server {self.base_url}: {err}") from None
            except httpx.TransportError as err:  # refused, reset, timed out, TLS
                problem, response = type(err).__name__, None
            else:
                if response.status_code == 401 and not refreshed:
                    refreshed = True  # the token may have expired or been revoked: once more
                    if self.auth.invalidate():
                        continue
                if response.status_code < 400:
                    return self._json(response, what)
                if response.status_code not in _RETRY_STATUSES:
                    raise self._refusal(response, what)
                problem = f"HTTP {response.status_code}"
            status = None if response is None else response.status_code
            if attempt >= len(delays):
                raise FhirUnavailable(
                    f"FHIR server {self.base_url} unavailable for {what}: {problem} "
                    f"(after {attempt + 1} attempts)",
                    status=status,
                )
            delay = delays[attempt]
            asked = _retry_after(response)
            longest = self.config.retry.max_backoff_s
            if asked is not None:
                if asked > longest:
                    # Asking sooner than the server said only adds to its load; a study is
                    # not held up that long (imaging-only or hold takes over).
                    raise FhirUnavailable(
                        f"FHIR server {self.base_url} unavailable for {what}: {problem}, "
                        f"asked to retry after {asked:.0f} s (radfusion waits {longest:.0f} s "
                        "at most)",
                        status=status,
                    )
                delay = max(delay, asked)
            log.warning(
                "FHIR %s request failed (%s); retry %d of %d in %.1f s",
                what,
                problem,
                attempt + 1,
                len(delays),
                delay,
            )
            time.sleep(delay)
            attempt += 1

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise FhirError(
                f"FHIR server {self.base_url} answered {what} with something that is not JSON",
                status=response.status_code,
            ) from None
        if not isinstance(body, dict):
            raise FhirError(f"FHIR server {self.base_url} answered {what} with a non-object")
        return body

    def _refusal(self, response: httpx.Response, what: str) -> FhirError:
        try:
            issues = _issues(response.json())
        except ValueError:
            issues = ()
        detail = f": {_describe(issues)}" if issues else ""
        log.warning("FHIR %s request refused: HTTP %d%s", what, response.status_code, detail)
        return FhirError(
            f"FHIR server {self.base_url} refused {what}: HTTP {response.status_code}{detail}",
            status=response.status_code,
            outcome=issues,
        )
