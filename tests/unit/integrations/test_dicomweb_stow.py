"""STOW-RS delivery against a scripted HTTP server (our own logic: which answers are stored,
pending, retryable; what is sent; that secrets never reach a message). The same delivery
against a real Orthanc is in tests/integration/test_stow.py."""

from __future__ import annotations

import email.parser
import email.policy
import http.server
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radfusion.config import DicomWebDestination, parse_config
from radfusion.integrations.dicom.export import Exporter
from radfusion.integrations.dicomweb.stow import StowError, failure_is_retryable, stow
from radfusion.integrations.store.catalog import Catalog

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
TOKEN = "tok-3c1f-never-logged"


def _instance(folder: Path, study: str) -> Path:
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    uids: list[str]


@dataclass
class Script:
    """Answers, in order (the last one repeats): (status, body or None). A body is a
    function of the UIDs sent, returning the DICOM JSON response."""

    answers: list[tuple[int, Any]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


def _parts(content_type: str, body: bytes) -> list[str]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    uids = []
    for part in message.iter_parts():  # type: ignore[attr-defined]
        ds = pydicom.dcmread(io.BytesIO(part.get_payload(decode=True)))
        uids.append(str(ds.SOPInstanceUID))
    return uids


def response(stored: list[str], failed: dict[str, int], warning: int | None = None) -> Any:
    """A STOW-RS response body (DICOM JSON) for these instances."""
    ds = Dataset()
    ds.ReferencedSOPSequence = []
    for uid in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = BASIC_TEXT_SR
        item.ReferencedSOPInstanceUID = uid
        if warning is not None:
            item.WarningReason = warning
        ds.ReferencedSOPSequence.append(item)
    ds.FailedSOPSequence = []
    for uid, reason in failed.items():
        item = Dataset()
        item.ReferencedSOPClassUID = BASIC_TEXT_SR
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        ds.FailedSOPSequence.append(item)
    return ds.to_json_dict()


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            if self.headers.get("Transfer-Encoding") == "chunked":
                body = b""
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            else:
                body = self.rfile.read(length)
            uids = _parts(self.headers["Content-Type"], body)
            script.requests.append(Request(self.path, dict(self.headers), uids))
            status, make_body = script.answers[min(len(script.requests), len(script.answers)) - 1]
            payload = b"" if make_body is None else json.dumps(make_body(uids)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web", script
    httpd.shutdown()
    httpd.server_close()


def _dest(url: str, **extra: Any) -> DicomWebDestination:
    return DicomWebDestination(name="web", url=url, timeout_s=5, **extra)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    study = generate_uid()
    (tmp_path / "in").mkdir()
    return [_instance(tmp_path / "in", study) for _ in range(3)]


def test_all_stored_posts_once_to_the_study(server: Any, files: list[Path]) -> None:
    url, script = server
    script.answers = [(200, lambda uids: response(uids, {}))]
    stow(_dest(url), files)
    [request] = script.requests
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert request.path == f"/dicom-web/studies/{study}"
    assert sorted(request.uids) == sorted(_uid(f) for f in files)
    assert "Authorization" not in request.headers


def test_instances_of_two_studies_go_in_two_requests(server: Any, tmp_path: Path) -> None:
    url, script = server
    script.answers = [(200, lambda uids: response(uids, {}))]
    (tmp_path / "x").mkdir()
    a, b = generate_uid(), generate_uid()
    stow(_dest(url), [_instance(tmp_path / "x", a), _instance(tmp_path / "x", b)])
    assert sorted(r.path.rsplit("/", 1)[1] for r in script.requests) == sorted([a, b])


def test_a_warning_is_stored(
    server: Any, files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    url, script = server
    script.answers = [(202, lambda uids: response(uids, {}, warning=0xB000))]
    stow(_dest(url), files)
    assert "warning 0xB000" in caplog.text


def test_202_with_a_shortage_leaves_that_instance_pending_and_retryable(
    server: Any, files: list[Path]
) -> None:
    url, script = server
    short = _uid(files[1])
    script.answers = [
        (202, lambda uids: response([u for u in uids if u != short], {short: 0xA700}))
    ]
    with pytest.raises(StowError, match=r"1 of 3 instance.* failed 0xA700") as caught:
        stow(_dest(url), files)
    assert caught.value.pending == (files[1],) and caught.value.retryable


def test_202_with_a_refusal_is_not_retryable(server: Any, files: list[Path]) -> None:
    url, script = server
    bad = _uid(files[0])
    script.answers = [(202, lambda uids: response([u for u in uids if u != bad], {bad: 0xC000}))]
    with pytest.raises(StowError) as caught:
        stow(_dest(url), files)
    assert caught.value.pending == (files[0],) and not caught.value.retryable


def test_202_without_a_body_stores_nothing_known(server: Any, files: list[Path]) -> None:
    url, script = server
    script.answers = [(202, None)]  # "some failed", and not which
    with pytest.raises(StowError, match=r"3 of 3 instance.*202 Accepted without saying") as caught:
        stow(_dest(url), files)
    assert caught.value.pending == tuple(files) and caught.value.retryable


def test_200_without_a_body_stores_everything(server: Any, files: list[Path]) -> None:
    url, script = server
    script.answers = [(200, None)]
    stow(_dest(url), files)


def test_409_is_not_retryable_and_says_so(server: Any, files: list[Path]) -> None:
    url, script = server
    script.answers = [(409, lambda uids: response([], dict.fromkeys(uids, 0xA900)))]
    with pytest.raises(StowError, match="HTTP 409 Conflict") as caught:
        stow(_dest(url), files)
    assert caught.value.pending == tuple(files) and not caught.value.retryable


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
def test_overload_and_server_errors_are_retryable(
    server: Any, files: list[Path], status: int
) -> None:
    url, script = server
    script.answers = [(status, None)]
    with pytest.raises(StowError, match=f"HTTP {status}") as caught:
        stow(_dest(url), files)
    assert caught.value.pending == tuple(files) and caught.value.retryable


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 415])
def test_client_errors_are_not_retryable(server: Any, files: list[Path], status: int) -> None:
    url, script = server
    script.answers = [(status, None)]
    with pytest.raises(StowError, match=f"HTTP {status}") as caught:
        stow(_dest(url), files)
    assert not caught.value.retryable


def test_an_unreachable_server_is_retryable(files: list[Path]) -> None:
    from tests.conftest import free_port

    with pytest.raises(StowError, match="unreachable") as caught:
        stow(_dest(f"http://127.0.0.1:{free_port()}/dicom-web"), files)
    assert caught.value.retryable and caught.value.pending == tuple(files)


def test_bearer_token_from_the_environment_is_sent_and_never_shown(
    server: Any, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = server
    monkeypatch.setenv("RADFUSION_TEST_TOKEN", TOKEN)
    script.answers = [(401, None)]
    dest = _dest(url, auth={"type": "bearer", "token_env": "RADFUSION_TEST_TOKEN"})
    with pytest.raises(StowError, match="credentials") as caught:
        stow(dest, files)
    assert script.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(caught.value)


def test_a_missing_secret_is_a_clear_error(server: Any, files: list[Path], tmp_path: Path) -> None:
    url, _ = server
    dest = _dest(url, auth={"type": "basic", "username": "u", "password_file": tmp_path / "nope"})
    with pytest.raises(ValueError, match=r"cannot read .*nope"):
        stow(dest, files)


# -- through the exporter: retry only what is pending, and only when it can help ----------------


def _exporter(tmp_path: Path, url: str, attempts: int = 3) -> tuple[Exporter, Catalog]:
    config = parse_config(
        {
            "export": {
                "destinations": [{"name": "web", "type": "dicomweb", "url": url, "timeout_s": 5}],
                "retry": {"attempts": attempts, "initial_backoff_s": 0},
            }
        }
    )
    catalog = Catalog(tmp_path / "catalog.sqlite")
    return Exporter(
        config.export, catalog, tmp_path / "outbox", "RADFUSION", sleep=lambda _: None
    ), catalog


def test_a_retry_sends_only_what_was_not_stored(
    server: Any, files: list[Path], tmp_path: Path
) -> None:
    url, script = server
    short = _uid(files[2])
    script.answers = [
        (202, lambda uids: response([u for u in uids if u != short], {short: 0xA702})),
        (200, lambda uids: response(uids, {})),
    ]
    exporter, catalog = _exporter(tmp_path, url)
    [result] = exporter.export(files)
    assert result.delivered and result.attempts == 2
    assert [r.uids for r in script.requests][1] == [short]
    assert catalog.dead_letters() == []
    assert list((tmp_path / "outbox").iterdir()) == []


def test_a_conflict_is_dead_lettered_at_once_with_the_reason(
    server: Any, files: list[Path], tmp_path: Path
) -> None:
    url, script = server
    script.answers = [(409, None)]
    exporter, catalog = _exporter(tmp_path, url, attempts=5)
    [result] = exporter.export(files)
    assert not result.delivered and result.attempts == 1 and len(script.requests) == 1
    [dead] = catalog.dead_letters()
    assert "HTTP 409 Conflict" in dead.error and dead.attempts == 1 and dead.files == 3


def test_a_partial_failure_dead_letters_only_the_failed_instance(
    server: Any, files: list[Path], tmp_path: Path
) -> None:
    url, script = server
    bad = _uid(files[0])
    script.answers = [(202, lambda uids: response([u for u in uids if u != bad], {bad: 0xA900}))]
    exporter, catalog = _exporter(tmp_path, url)
    [result] = exporter.export(files)
    assert not result.delivered and result.attempts == 1
    [dead] = catalog.dead_letters()
    assert dead.files == 1 and "0xA900" in dead.error
    assert [_uid(f) for f in dead.outbox.iterdir()] == [bad]


def test_retryable_failures_are_retried_then_dead_lettered(
    server: Any, files: list[Path], tmp_path: Path
) -> None:
    url, script = server
    script.answers = [(503, None)]
    exporter, catalog = _exporter(tmp_path, url, attempts=3)
    [result] = exporter.export(files)
    assert not result.delivered and result.attempts == 3 and len(script.requests) == 3
    [dead] = catalog.dead_letters()
    assert "HTTP 503 Service Unavailable" in dead.error and dead.files == 3


# -- configuration -----------------------------------------------------------------------------


def test_failure_reasons_that_may_pass() -> None:
    assert failure_is_retryable(0xA700) and failure_is_retryable(0xA7FF)
    assert failure_is_retryable(0x0213)
    assert not any(failure_is_retryable(r) for r in (0xA900, 0xC000, 0x0110, 0x0122, 0x0124))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"url": "ftp://pacs/dicom-web"}, "http"),
        ({"url": "https://user:pw@pacs/dicom-web"}, "credentials"),
        (
            {"url": "http://pacs.example/dicom-web", "auth": {"type": "bearer", "token_env": "T"}},
            "plain http",
        ),
        ({"auth": {"type": "basic", "password_env": "P"}}, "username"),
        ({"auth": {"type": "basic", "username": "u"}}, "exactly one"),
        ({"auth": {"type": "bearer", "token_env": "T", "token_file": "/t"}}, "exactly one"),
        ({"auth": {"type": "none", "token_env": "T"}}, "token_env given"),
        ({"client_certificate": "/c.pem"}, "both"),
    ],
)
def test_bad_destinations_are_refused(extra: dict[str, Any], message: str) -> None:
    raw = {"name": "web", "type": "dicomweb", "url": "https://pacs/dicom-web", **extra}
    with pytest.raises(ValueError, match=message):
        DicomWebDestination(**raw)


def test_credentials_over_plain_http_to_this_host_are_allowed() -> None:
    dest = DicomWebDestination(
        name="web",
        url="http://127.0.0.1:8042/dicom-web/",
        auth={"type": "bearer", "token_env": "T"},
    )
    assert dest.url == "http://127.0.0.1:8042/dicom-web"
