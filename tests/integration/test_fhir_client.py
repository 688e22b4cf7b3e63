"""The FHIR client's paging, retry and auth rules against a real server (Medplum) behind the
fault proxy: relative and foreign ``next`` links, ``Retry-After``, a static token rejected."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from radfusion.config import FhirConfig
from radfusion.integrations.fhir import client as client_module
from radfusion.integrations.fhir.client import FhirClient, FhirError, FhirUnavailable
from tests.fhir_support import FhirEndpoint, FhirProxy

pytestmark = pytest.mark.integration

SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1234.77"


@pytest.fixture
def patients(fhir_tenant: FhirEndpoint) -> FhirEndpoint:
    for n in range(3):
        fhir_tenant.post(
            {
                "resourceType": "Patient",
                "identifier": [{"system": SYSTEM, "value": f"P{n}"}],
                "gender": "other",
            }
        )
    return fhir_tenant


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's waits between attempts, recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waited.append)
    return waited


def _client(proxy: FhirProxy, **config: Any) -> FhirClient:
    settings = {"retry": {"attempts": 3, "initial_backoff_s": 0.1, "max_backoff_s": 5}, **config}
    return FhirClient(FhirConfig(base_url=proxy.base_url, **settings))


def _page(next_url: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Patient", "id": "crafted"}}],
        "link": [{"relation": "next", "url": next_url}],
    }


def test_a_relative_next_link_is_followed_on_the_server(
    patients: FhirEndpoint, fhir_proxy: Callable[..., FhirProxy]
) -> None:
    proxy = fhir_proxy(patients)
    base_path = proxy.base_url.split("://", 1)[1].split("/", 1)[1]
    for relative in (
        f"Patient?identifier={SYSTEM}|",
        f"/{base_path}/Patient?identifier={SYSTEM}|",
        f"?identifier={SYSTEM}|",  # relative to the page it came on, not to the base
    ):
        proxy.clear_log()
        proxy.fail_next(1, status=200, body=_page(relative))
        with _client(proxy) as client:
            found = client.search("Patient", {"identifier": f"{SYSTEM}|"})
        assert found.pages == 2
        ids = [p["id"] for p in found.match]
        assert ids[0] == "crafted" and len(ids) == 4  # the crafted page, then the server's
        assert proxy.requests[1].path == f"/{base_path}/Patient?identifier={SYSTEM}|"


def test_a_next_link_to_another_origin_is_refused(
    patients: FhirEndpoint, fhir_proxy: Callable[..., FhirProxy]
) -> None:
    proxy = fhir_proxy(patients)
    proxy.fail_next(1, status=200, body=_page("https://elsewhere.example/fhir/Patient?page=2"))
    with _client(proxy) as client, pytest.raises(FhirError, match="leaves the server's origin"):
        client.search("Patient", {"identifier": f"{SYSTEM}|"})
    assert len(proxy.requests) == 1  # the token never went elsewhere


def test_retry_after_is_honoured(
    patients: FhirEndpoint, fhir_proxy: Callable[..., FhirProxy], sleeps: list[float]
) -> None:
    proxy = fhir_proxy(patients)
    proxy.fail_next(1, status=429, headers={"Retry-After": "3"})
    with _client(proxy) as client:
        assert len(client.search("Patient", {"identifier": f"{SYSTEM}|"}).match) == 3
    assert sleeps == [3.0]  # not the 0.1 s backoff
    # Longer than radfusion waits: no early retry that only adds load; unavailable at once.
    proxy.clear_log()
    proxy.fail_next(1, status=503, headers={"Retry-After": "Fri, 31 Dec 2099 23:59:59 GMT"})
    with _client(proxy) as client, pytest.raises(FhirUnavailable, match="asked to retry after"):
        client.search("Patient", {"identifier": f"{SYSTEM}|"})
    assert len(proxy.requests) == 1 and sleeps == [3.0]
    # An unreadable Retry-After falls back to the backoff.
    proxy.fail_next(1, status=503, headers={"Retry-After": "soon"})
    with _client(proxy) as client:
        client.search("Patient", {"identifier": f"{SYSTEM}|"})
    assert sleeps == [3.0, 0.1]


def test_a_rejected_static_token_is_refused_not_resent(
    patients: FhirEndpoint, fhir_proxy: Callable[..., FhirProxy], sleeps: list[float]
) -> None:
    proxy = fhir_proxy(patients)
    proxy.require_bearer("the-right-one")
    auth = {"type": "bearer", "token": "a-revoked-one"}
    with _client(proxy, auth=auth) as client, pytest.raises(FhirError) as raised:
        client.search("Patient", {"identifier": f"{SYSTEM}|"})
    assert not isinstance(raised.value, FhirUnavailable) and raised.value.status == 401
    assert [r.status for r in proxy.requests] == [401] and sleeps == []
    assert "a-revoked-one" not in str(raised.value)
    with _client(proxy, auth={"type": "bearer", "token": "the-right-one"}) as client:
        assert len(client.search("Patient", {"identifier": f"{SYSTEM}|"}).match) == 3


def test_retry_after_dates_are_gmt_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import email.utils
    import time

    import httpx

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        soon = email.utils.formatdate(time.time() + 10, usegmt=True)
        for value in (soon, soon.replace("GMT", "-0000")):
            wait = client_module._retry_after(httpx.Response(503, headers={"Retry-After": value}))
            assert wait is not None and 5 <= wait <= 11, (value, wait)
        for odd in (b"\xb2", b"-5", b""):  # a superscript two (Latin-1) passes str.isdigit
            response = httpx.Response(503, headers=[(b"Retry-After", odd)])
            assert client_module._retry_after(response) is None, odd
    finally:
        monkeypatch.undo()  # the zone as it was, then re-read
        time.tzset()


def test_a_refusing_token_endpoint_is_a_refusal_not_unavailability(
    patients: FhirEndpoint,
    fhir_proxy: Callable[..., FhirProxy],
    smart_token_endpoint: Any,
    tmp_path: Any,
) -> None:
    from tests.fhir_support import registered_smart_client

    auth = registered_smart_client(smart_token_endpoint, tmp_path)
    proxy = fhir_proxy(patients)
    for status, expected in ((400, FhirError), (503, FhirUnavailable)):
        smart_token_endpoint.fail_next(1, status=status)
        with (
            _client(proxy, auth=auth, retry={"attempts": 1}) as client,
            pytest.raises(FhirError) as raised,
        ):
            client.search("Patient", {"identifier": f"{SYSTEM}|"})
        assert type(raised.value) is expected, status
    assert proxy.requests == []  # no request without a token
