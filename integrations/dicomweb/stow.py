"""STOW-RS: store result instances on a DICOMweb origin server (PS3.18 §10.5).

Each study's files go in one ``POST {url}/studies/{StudyInstanceUID}``, so the server checks
that every instance belongs to the study. What the server answers decides, per instance,
whether it was stored and, when not, whether sending it again can help:

- 200: every instance stored (a Warning Reason is logged);
- 202 and any error answer with a DICOM JSON body: the Referenced SOP Sequence was stored
  (servers such as Orthanc list what they stored even in a 400), the Failed SOP Sequence was
  not, with its Failure Reason; an instance in neither is not known to be stored;
- 202 without a body: some instances were not stored and the server does not say which, so
  none is known to be stored (sent again, which a server takes as the same instances);
- 408, 429, 5xx, a dropped connection or a timeout: worth retrying;
- 400, 401, 403, 404, 409, 413, 415, a TLS failure: not worth retrying; a person must act.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from radfusion.config import DicomWebDestination
from radfusion.errors import RadfusionError
from radfusion.integrations.dicomweb.session import session_for
from radfusion.logs import uid_tag

__all__ = ["StowError", "stow"]

log = logging.getLogger("radfusion.export")

# HTTP statuses after which the same request may well succeed later.
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class StowError(RadfusionError, RuntimeError):
    """Some instances were not stored.

    Attributes:
        pending: the files not known to be stored (the others were).
        retryable: whether sending ``pending`` again may succeed (a timeout, a 5xx, a
            resource shortage) or cannot without a person acting (refused, a conflict,
            wrong credentials, an untrusted certificate).
    """

    def __init__(self, message: str, pending: Sequence[Path], retryable: bool) -> None:
        super().__init__(message)
        self.pending = tuple(pending)
        self.retryable = retryable


def failure_is_retryable(reason: int) -> bool:
    """Whether a Failure Reason (0008,1197) is a shortage that may pass: 0xA7xx (Out of
    Resources) and 0x0213 (Resource Limitation). Refusals, SOP classes not supported,
    data set errors and processing failures are not."""
    return 0xA700 <= reason <= 0xA7FF or reason == 0x0213


@dataclass
class _Answer:
    """What one POST came to: instances stored, failed (with reason), and how to go on."""

    stored: set[str]
    failed: dict[str, int]
    problem: str  # "" when the request as a whole succeeded
    retryable: bool


def _read_body(response: requests.Response) -> Dataset | None:
    kind = response.headers.get("Content-Type", "")
    if not response.content or ("json" not in kind and not response.content.startswith(b"{")):
        return None
    try:
        return Dataset.from_json(response.content.decode("utf-8"))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None


def _outcome(body: Dataset | None) -> tuple[set[str], dict[str, int]]:
    stored: set[str] = set()
    failed: dict[str, int] = {}
    if body is None:
        return stored, failed
    for item in body.get("ReferencedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        stored.add(uid)
        warning = item.get("WarningReason")
        if warning is not None:
            log.warning("stored %s with warning 0x%04X", uid_tag(uid), int(warning))
    for item in body.get("FailedSOPSequence", []):
        failed[str(item.get("ReferencedSOPInstanceUID", ""))] = int(item.get("FailureReason", 0))
    return stored, failed


def _post(
    client: DICOMwebClient, session: requests.Session, study: str, datasets: list[Dataset]
) -> _Answer:
    statuses: list[int] = []  # dicomweb-client returns the body only; the status decides

    def record(response: requests.Response, *args: object, **kwargs: object) -> None:
        statuses.append(response.status_code)

    hooks = session.hooks.setdefault("response", [])
    hooks.append(record)
    try:
        return _answer(client, study, datasets, statuses)
    finally:
        hooks.remove(record)


def _answer(
    client: DICOMwebClient, study: str, datasets: list[Dataset], statuses: list[int]
) -> _Answer:
    try:
        body = client.store_instances(datasets, study_instance_uid=study or None)
    except requests.exceptions.SSLError as err:
        reason = getattr(err.args[0], "reason", err) if err.args else err
        return _Answer(set(), {}, f"TLS failed: {str(reason)[:200]}", False)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        kind = "timed out" if isinstance(err, requests.exceptions.Timeout) else "unreachable"
        return _Answer(set(), {}, f"server {kind}", True)
    except requests.exceptions.HTTPError as err:
        response = err.response
        code = response.status_code if response is not None else 0
        try:
            problem = f"HTTP {code} {HTTPStatus(code).phrase}"
        except ValueError:
            problem = f"HTTP {code}"
        if code in (401, 403):
            problem += ": check the destination's credentials"
        stored, failed = _outcome(_read_body(response) if response is not None else None)
        return _Answer(stored, failed, problem, code in RETRYABLE_HTTP)
    stored, failed = _outcome(body if len(body) else None)
    if not failed and not stored:
        if statuses and statuses[-1] == 202:
            return _Answer(set(), {}, "HTTP 202 Accepted without saying what was stored", True)
        stored = {str(ds.get("SOPInstanceUID", "")) for ds in datasets}  # 200, no body: all stored
    return _Answer(stored, failed, "", True)


def stow(dest: DicomWebDestination, files: Sequence[Path]) -> None:
    """Store ``files`` (DICOM Part 10) on ``dest``, one request per study.

    Raises:
        StowError: some files were not stored; names them, why, and whether a retry can help.
        ValueError: the destination's secret, CA bundle or client certificate cannot be read.
    """
    session = session_for(dest)
    client = DICOMwebClient(url=dest.url, session=session, timeout=dest.timeout_s)
    # Retries, with their backoff and dead letter, are the exporter's: one policy, not two.
    client.set_http_retry_params(retry=False)
    by_study: dict[str, list[tuple[Path, Dataset]]] = {}
    for f in files:
        ds = pydicom.dcmread(f)
        by_study.setdefault(str(ds.get("StudyInstanceUID", "")), []).append((f, ds))
    pending: list[Path] = []
    problems: list[str] = []
    retryable = True
    try:
        for study, members in by_study.items():
            answer = _post(client, session, study, [ds for _, ds in members])
            if answer.problem:
                problems.append(answer.problem)
            retryable = retryable and answer.retryable
            for f, member in members:
                uid = str(member.get("SOPInstanceUID", ""))
                reason = answer.failed.get(uid)
                if reason is not None:
                    problems.append(f"{uid_tag(uid)} failed 0x{reason:04X}")
                    retryable = retryable and failure_is_retryable(reason)
                if uid not in answer.stored or reason is not None:
                    pending.append(f)
    finally:
        session.close()
    if pending:
        shown = "; ".join(dict.fromkeys(problems)) or "not confirmed stored"
        raise StowError(
            f"{dest.name}: {len(pending)} of {len(files)} instance(s) not stored: {shown}",
            pending,
            retryable,
        )
