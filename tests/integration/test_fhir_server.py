"""The FHIR test infrastructure itself: the real server (Medplum on Node) does what the FHIR
client's tests rely on, the proxy's faults behave as documented, and the SMART token endpoint
accepts exactly the assertions the SMART Backend Services profile allows."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest

from tests.fhir_support import (
    ASSERTION_TYPE,
    ClientKey,
    FhirEndpoint,
    FhirHttpError,
    FhirProxy,
    FhirServer,
    SmartTokenEndpoint,
    generate_client_key,
    operation_outcome,
    sign_assertion,
)

pytestmark = pytest.mark.integration

LOINC = "http://loinc.org"
MRN = "urn:oid:1.2.840.99.4.1"


def _patient_bundle(mrn: str, *, observations: int = 0, system: str = MRN) -> dict[str, Any]:
    """A transaction: one Patient (urn:uuid) and ``observations`` smoking-status Observations
    dated one day apart from 2024-01-01."""
    patient = f"urn:uuid:{uuid.uuid4()}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": patient,
            "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": system, "value": mrn}],
                "gender": "female",
                "birthDate": "1961-02-03",
            },
            "request": {"method": "POST", "url": "Patient"},
        }
    ]
    for i in range(observations):
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": LOINC, "code": "72166-2"}]},
                    "subject": {"reference": patient},
                    "effectiveDateTime": f"2024-01-{i + 1:02d}",
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _created(response: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [
        e["resource"] for e in response["entry"] if e["resource"]["resourceType"] == resource_type
    ]


def _next(bundle: dict[str, Any]) -> str | None:
    return next((x["url"] for x in bundle.get("link", []) if x["relation"] == "next"), None)


# --- the server ----------------------------------------------------------------------------


def test_server_starts_quickly_and_describes_itself(fhir_server: FhirServer) -> None:
    assert fhir_server.startup_s < 20, fhir_server.startup_s  # ~1 s on an idle 2-core machine
    capability = fhir_server.get("metadata")
    assert capability["resourceType"] == "CapabilityStatement"
    assert capability["fhirVersion"] == "4.0.1"
    patient = next(r for r in capability["rest"][0]["resource"] if r["type"] == "Patient")
    assert "identifier" in {p["name"] for p in patient["searchParam"]}
    assert {"transaction", "batch"} <= {i["code"] for i in capability["rest"][0]["interaction"]}


def test_transaction_then_identifier_search_finds_exactly_that_patient(
    fhir_tenant: FhirEndpoint,
) -> None:
    response = fhir_tenant.post(_patient_bundle("RF-1", observations=2))
    fhir_tenant.post(_patient_bundle("RF-2"))
    fhir_tenant.post(_patient_bundle("RF-1", system="urn:oid:1.2.840.99.4.2"))  # other issuer
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["201"] * 3
    (patient,) = _created(response, "Patient")

    found = fhir_tenant.search(f"Patient?identifier={MRN}|RF-1")
    assert [p["id"] for p in found] == [patient["id"]]
    # urn:uuid references were rewritten to the created Patient
    observations = fhir_tenant.search(f"Observation?subject=Patient/{patient['id']}")
    assert len(observations) == 2
    assert {o["subject"]["reference"] for o in observations} == {f"Patient/{patient['id']}"}
    assert fhir_tenant.search(f"Patient?identifier={MRN}|RF-3") == []


def test_failed_transaction_stores_nothing(fhir_tenant: FhirEndpoint) -> None:
    bundle = _patient_bundle("RF-9", observations=1)
    del bundle["entry"][1]["resource"]["code"]  # Observation.code is required
    with pytest.raises(FhirHttpError) as err:
        fhir_tenant.post(bundle)
    assert err.value.status == 400
    assert err.value.outcome["resourceType"] == "OperationOutcome"
    assert err.value.outcome["issue"][0]["expression"] == ["Observation.code"]
    assert fhir_tenant.search(f"Patient?identifier={MRN}|RF-9") == []


def test_paging_follows_next_links_across_pages(fhir_tenant: FhirEndpoint) -> None:
    (patient,) = _created(fhir_tenant.post(_patient_bundle("RF-P", observations=23)), "Patient")
    url: str | None = f"Observation?patient=Patient/{patient['id']}&_count=5"
    sizes, ids = [], []
    while url:
        page = fhir_tenant.get(url)
        assert page["total"] == 23
        sizes.append(len(page["entry"]))
        ids += [e["resource"]["id"] for e in page["entry"]]
        url = _next(page)
        assert url is None or url.startswith(fhir_tenant.base_url + "/Observation?")
    assert sizes == [5, 5, 5, 5, 3]
    assert len(set(ids)) == 23
    # without _count the server pages by 20, as Medplum's own server does
    first = fhir_tenant.get(f"Observation?patient=Patient/{patient['id']}")
    assert len(first["entry"]) == 20 and _next(first)


def test_include_brings_referenced_resources(fhir_tenant: FhirEndpoint) -> None:
    created = fhir_tenant.post(_patient_bundle("RF-I", observations=2))
    (patient,) = _created(created, "Patient")
    results = [{"reference": f"Observation/{o['id']}"} for o in _created(created, "Observation")]
    report = fhir_tenant.post(
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "51969-4"}]},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "effectiveDateTime": "2024-01-05",
            "result": results,
        }
    )
    page = fhir_tenant.get(
        f"DiagnosticReport?patient=Patient/{patient['id']}&code={LOINC}|51969-4"
        "&_include=DiagnosticReport:result&_include=DiagnosticReport:subject"
    )
    modes = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}": e["search"]["mode"]
        for e in page["entry"]
    }
    assert modes == {
        f"DiagnosticReport/{report['id']}": "match",
        f"Patient/{patient['id']}": "include",
        **{r["reference"]: "include" for r in results},
    }
    assert page["total"] == 1  # includes are not counted as matches


def test_token_reference_and_date_search(fhir_tenant: FhirEndpoint) -> None:
    (patient,) = _created(fhir_tenant.post(_patient_bundle("RF-D", observations=5)), "Patient")
    ref = f"Patient/{patient['id']}"
    assert len(fhir_tenant.search(f"Observation?patient={ref}&code={LOINC}|72166-2")) == 5
    assert fhir_tenant.search(f"Observation?patient={ref}&code={LOINC}|69548-6") == []
    dates = sorted(
        o["effectiveDateTime"]
        for o in fhir_tenant.search(f"Observation?subject={ref}&date=le2024-01-03")
    )
    assert dates == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert len(fhir_tenant.search(f"Observation?subject={ref}&date=gt2024-01-03")) == 2


def test_versions_read_and_vread(fhir_tenant: FhirEndpoint) -> None:
    status, headers, first = fhir_tenant.request(
        "POST", "Patient", {"resourceType": "Patient", "gender": "male"}
    )
    assert status == 201
    assert headers["ETag"] == f'W/"{first["meta"]["versionId"]}"'
    assert headers["Location"].endswith(
        f"/Patient/{first['id']}/_history/{first['meta']['versionId']}"
    )
    second = fhir_tenant.put({**first, "gender": "female"})
    assert second["meta"]["versionId"] != first["meta"]["versionId"]
    assert fhir_tenant.get(f"Patient/{first['id']}")["gender"] == "female"
    old = fhir_tenant.get(f"Patient/{first['id']}/_history/{first['meta']['versionId']}")
    assert old["gender"] == "male"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "Patient/no-such-id", None, 404),
        ("GET", "Patient?no-such-param=1", None, 400),  # not silently "no match"
        ("GET", "Observation?date=yesterday", None, 400),
        ("POST", "Observation", {"resourceType": "Observation", "status": "final"}, 400),
        ("POST", "Patient", {"resourceType": "Patient", "colour": "blue"}, 400),
    ],
)
def test_errors_are_operation_outcomes(
    fhir_tenant: FhirEndpoint, method: str, path: str, body: Any, status: int
) -> None:
    got, headers, answer = fhir_tenant.request(method, path, body)
    assert got == status
    assert headers["Content-Type"].startswith("application/fhir+json")
    assert answer["resourceType"] == "OperationOutcome"
    assert answer["issue"][0]["severity"] == "error"


def test_tenants_are_isolated(fhir_server: FhirServer) -> None:
    one, two = fhir_server.tenant(), fhir_server.tenant()
    one.post(_patient_bundle("RF-T"))
    assert len(one.search(f"Patient?identifier={MRN}|RF-T")) == 1
    assert two.search(f"Patient?identifier={MRN}|RF-T") == []


# --- the proxy -----------------------------------------------------------------------------


def test_proxy_forwards_and_logs_every_page(
    fhir_tenant: FhirEndpoint, fhir_proxy: Callable[..., FhirProxy]
) -> None:
    (patient,) = _created(fhir_tenant.post(_patient_bundle("RF-X", observations=7)), "Patient")
    proxy = fhir_proxy(fhir_tenant)
    via = FhirEndpoint(proxy.base_url)
    found = via.search(f"Observation?patient=Patient/{patient['id']}&_count=3")
    assert len(found) == 7
    # the next links point at the proxy, so all three pages went through it
    assert len(proxy.requests) == 3
    assert all(r.method == "GET" and r.status == 200 for r in proxy.requests)
    assert [r.query.get("_offset") for r in proxy.requests] == [None, ["3"], ["6"]]
    base_path = urlsplit(proxy.base_url).path
    assert (
        proxy.paths()[0] == f"GET {base_path}/Observation?patient=Patient/{patient['id']}&_count=3"
    )


def test_proxy_down_refuses_then_recovers(fhir_proxy: Callable[..., FhirProxy]) -> None:
    proxy = fhir_proxy()
    with httpx.Client(timeout=5) as client:
        assert client.get(f"{proxy.base_url}/metadata").status_code == 200
        proxy.down = True
        with pytest.raises(httpx.TransportError):  # the kept-alive connection is gone too
            client.get(f"{proxy.base_url}/metadata")
        with pytest.raises(httpx.ConnectError):
            client.get(f"{proxy.base_url}/metadata")
        proxy.down = False
        assert client.get(f"{proxy.base_url}/metadata").status_code == 200


def test_proxy_delay_times_a_client_out(fhir_proxy: Callable[..., FhirProxy]) -> None:
    proxy = fhir_proxy()
    proxy.delay_s = 5
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{proxy.base_url}/metadata", timeout=0.3)
    assert time.monotonic() - started < 2
    proxy.delay_s = 0
    assert httpx.get(f"{proxy.base_url}/metadata", timeout=5).status_code == 200


def test_proxy_fail_next_then_passes_through(fhir_proxy: Callable[..., FhirProxy]) -> None:
    proxy = fhir_proxy()
    outcome = operation_outcome("exception", "database is down for Jane Doe, MRN RF-1")
    proxy.fail_next(2, 503, headers={"Retry-After": "1"})
    proxy.fail_next(1, 500, body=outcome)
    url = f"{proxy.base_url}/Patient?_count=1"
    answers = [httpx.get(url, timeout=5) for _ in range(4)]
    assert [a.status_code for a in answers] == [503, 503, 500, 200]
    assert answers[0].headers["Retry-After"] == "1"
    assert answers[0].json()["issue"][0]["code"] == "transient"
    assert answers[2].json() == outcome
    assert answers[3].json()["resourceType"] == "Bundle"
    assert [r.status for r in proxy.requests] == [503, 503, 500, 200]


def test_proxy_requires_a_bearer_token(fhir_proxy: Callable[..., FhirProxy]) -> None:
    proxy = fhir_proxy()
    proxy.require_bearer("s3cret")
    url = f"{proxy.base_url}/metadata"
    missing = httpx.get(url, timeout=5)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="fhir"'
    wrong = httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert wrong.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}, timeout=5).is_success
    assert proxy.requests[-1].headers["authorization"] == "Bearer s3cret"
    proxy.require_bearer(None)
    assert httpx.get(url, timeout=5).is_success


# --- the SMART token endpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, ClientKey]:
    """One key pair of each allowed kind, plus a stranger's RSA key with the same kid."""
    rsa = generate_client_key("RS384")
    return {
        "RS384": rsa,
        "ES384": generate_client_key("ES384"),
        "stranger": generate_client_key("RS384", kid=rsa.kid),
    }


def _token_request(endpoint: SmartTokenEndpoint, assertion: str, **form: str) -> httpx.Response:
    data = {
        "grant_type": "client_credentials",
        "scope": "system/*.read",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
        **form,
    }
    return httpx.post(endpoint.token_url, data=data, timeout=10)


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_token_endpoint_accepts_rs384_and_es384(
    smart_token_endpoint: SmartTokenEndpoint,
    keys: dict[str, ClientKey],
    fhir_proxy: Callable[..., FhirProxy],
    algorithm: str,
) -> None:
    smart_token_endpoint.register_client("radfusion", keys[algorithm])
    assertion = sign_assertion(
        keys[algorithm], client_id="radfusion", token_url=smart_token_endpoint.token_url
    )
    answer = _token_request(smart_token_endpoint, assertion)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 300
    assert body["scope"] == "system/*.read"
    assert answer.headers["Cache-Control"] == "no-store"
    assert smart_token_endpoint.validate(body["access_token"])

    proxy = fhir_proxy()
    proxy.require_bearer(smart_token_endpoint.validate)
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    assert httpx.get(f"{proxy.base_url}/metadata", headers=auth, timeout=5).is_success
    smart_token_endpoint.revoke_all()  # as if it had expired: the client must fetch another
    assert httpx.get(f"{proxy.base_url}/metadata", headers=auth, timeout=5).status_code == 401


def _bad_assertions() -> dict[str, Callable[[dict[str, ClientKey], str], str]]:
    """Assertions the endpoint must refuse, each given the keys and the token URL."""
    return {
        "wrong signature": lambda k, url: sign_assertion(
            k["stranger"], client_id="radfusion", token_url=url
        ),
        "wrong aud": lambda k, url: sign_assertion(
            k["RS384"], client_id="radfusion", token_url=url + "/other"
        ),
        "expired": lambda k, url: sign_assertion(
            k["RS384"], client_id="radfusion", token_url=url, now=time.time() - 600
        ),
        "exp over 5 minutes ahead": lambda k, url: sign_assertion(
            k["RS384"], client_id="radfusion", token_url=url, lifetime_s=600
        ),
        "no exp": lambda k, url: sign_assertion(
            k["ES384"], client_id="radfusion", token_url=url, exp=None
        ),
        "no jti": lambda k, url: sign_assertion(
            k["ES384"], client_id="radfusion", token_url=url, jti=None
        ),
        "sub differs from iss": lambda k, url: sign_assertion(
            k["RS384"], client_id="radfusion", token_url=url, sub="someone-else"
        ),
        "unknown client": lambda k, url: sign_assertion(
            k["RS384"], client_id="intruder", token_url=url
        ),
        "HS256": lambda k, url: jwt.encode(
            {
                "iss": "radfusion",
                "sub": "radfusion",
                "aud": url,
                "exp": int(time.time()) + 60,
                "jti": uuid.uuid4().hex,
            },
            "a-shared-secret-of-32-bytes-length!",
            algorithm="HS256",
            headers={"kid": k["RS384"].kid},
        ),
        "RS256": lambda k, url: sign_assertion(
            k["RS384"], client_id="radfusion", token_url=url, algorithm="RS256"
        ),
        "ES384 header on the RSA key's kid": lambda k, url: sign_assertion(
            k["ES384"], client_id="radfusion", token_url=url, header={"kid": k["RS384"].kid}
        ),
    }


@pytest.mark.parametrize("case", list(_bad_assertions()))
def test_token_endpoint_rejects(
    smart_token_endpoint: SmartTokenEndpoint, keys: dict[str, ClientKey], case: str
) -> None:
    smart_token_endpoint.register_client(
        "radfusion", {"keys": [keys["RS384"].public_jwk, keys["ES384"].public_jwk]}
    )
    assertion = _bad_assertions()[case](keys, smart_token_endpoint.token_url)
    answer = _token_request(smart_token_endpoint, assertion)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_client"
    assert smart_token_endpoint.issued == []
    assert smart_token_endpoint.requests[-1].error == "invalid_client"


def test_token_endpoint_rejects_a_reused_jti(
    smart_token_endpoint: SmartTokenEndpoint, keys: dict[str, ClientKey]
) -> None:
    smart_token_endpoint.register_client("radfusion", keys["ES384"])
    assertion = sign_assertion(
        keys["ES384"], client_id="radfusion", token_url=smart_token_endpoint.token_url
    )
    assert _token_request(smart_token_endpoint, assertion).status_code == 200
    replay = _token_request(smart_token_endpoint, assertion)
    assert replay.status_code == 400
    assert replay.json() == {"error": "invalid_client", "error_description": "jti already used"}


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"grant_type": "password"}, "unsupported_grant_type"),
        ({"client_assertion_type": "urn:example:other"}, "invalid_request"),
        ({"scope": "system/*.write"}, "invalid_scope"),
    ],
)
def test_token_endpoint_checks_the_request(
    smart_token_endpoint: SmartTokenEndpoint,
    keys: dict[str, ClientKey],
    form: dict[str, str],
    error: str,
) -> None:
    smart_token_endpoint.register_client("radfusion", keys["RS384"], scopes=["system/*.read"])
    assertion = sign_assertion(
        keys["RS384"], client_id="radfusion", token_url=smart_token_endpoint.token_url
    )
    answer = _token_request(smart_token_endpoint, assertion, **form)
    assert (answer.status_code, answer.json()["error"]) == (400, error)


def test_token_lifetime_and_failures(
    smart_token_endpoint: SmartTokenEndpoint, keys: dict[str, ClientKey]
) -> None:
    smart_token_endpoint.register_client("radfusion", keys["ES384"])

    def fetch() -> httpx.Response:
        assertion = sign_assertion(
            keys["ES384"], client_id="radfusion", token_url=smart_token_endpoint.token_url
        )
        return _token_request(smart_token_endpoint, assertion)

    smart_token_endpoint.expires_in = 0
    short = fetch().json()
    assert short["expires_in"] == 0 and not smart_token_endpoint.validate(short["access_token"])
    smart_token_endpoint.fail_next(1, 503)
    assert fetch().status_code == 503
    smart_token_endpoint.down = True
    with pytest.raises(httpx.ConnectError):
        fetch()
    smart_token_endpoint.down = False
    assert fetch().status_code == 200
    assert [r.status for r in smart_token_endpoint.requests] == [200, 503, 200]


def test_radfusion_smart_client_gets_a_token_it_can_use(
    smart_token_endpoint: SmartTokenEndpoint,
    keys: dict[str, ClientKey],
    fhir_proxy: Callable[..., FhirProxy],
) -> None:
    """The two JOSE implementations agree: radfusion's client (PyJWT) signs, joserfc checks."""
    from radfusion.integrations.fhir.auth import SmartBackendServices

    smart_token_endpoint.register_client("radfusion", keys["ES384"])
    proxy = fhir_proxy()
    proxy.require_bearer(smart_token_endpoint.validate)
    with httpx.Client(timeout=5) as http:
        auth = SmartBackendServices(
            token_url=smart_token_endpoint.token_url,
            client_id="radfusion",
            private_key=keys["ES384"].private_pem,
            algorithm="ES384",
            key_id=keys["ES384"].kid,
            scope="system/Patient.read",
            http=http,
        )
        assert http.get(f"{proxy.base_url}/metadata", headers=auth.headers()).is_success
        assert http.get(f"{proxy.base_url}/metadata", headers=auth.headers()).is_success
    assert len(smart_token_endpoint.issued) == 1  # cached
