"""Query/retrieve against a PACS that misbehaves: it must fail with a reason, never hang.

Orthanc (tests/integration/test_lung_ct_priors.py) answers properly; a pynetdicom peer here
stalls in the middle of a C-GET, as a PACS fetching from slow storage can.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from radfusion.config import DicomDestination
from radfusion.integrations.dicom.query import QueryError, find_studies, retrieve_series
from tests.conftest import free_port

_RELEASE = threading.Event()


def _stalling_get(event: Event) -> Iterator[object]:
    yield 1  # one sub-operation announced...
    _RELEASE.wait(60)  # ...and not delivered until the test is over
    yield 0xA702, None


def _no_find(event: Event) -> Iterator[object]:
    yield 0xC000, None  # "unable to process"


@pytest.fixture
def pacs() -> Iterator[DicomDestination]:
    ae = AE(ae_title="SLOWPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(CTImageStorage, scu_role=False, scp_role=True)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_GET, _stalling_get), (evt.EVT_C_FIND, _no_find)],
    )
    _RELEASE.clear()
    yield DicomDestination(
        name="pacs", ae_title="SLOWPACS", host="127.0.0.1", port=port, timeout_s=1
    )
    _RELEASE.set()
    server.shutdown()


def test_a_retrieval_that_stalls_fails_within_the_timeout(
    pacs: DicomDestination, tmp_path: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(QueryError, match="pacs: C-GET"):
        retrieve_series(pacs, "RADFUSION", "1.2.3", ["1.2.3.4"], tmp_path / "prior")
    # Not a timing test: the 1 s timeout ended it, far short of the peer's 60 s stall.
    assert time.monotonic() - started < 30


def test_a_refused_query_names_the_status(pacs: DicomDestination) -> None:
    with pytest.raises(QueryError, match="C-FIND failed: status 0xC000"):
        find_studies(pacs, "RADFUSION", "RF-0001")


def test_an_unreachable_pacs_says_so() -> None:
    nobody = DicomDestination(name="pacs", ae_title="X", host="127.0.0.1", port=free_port())
    with pytest.raises(QueryError, match="unreachable"):
        find_studies(nobody, "RADFUSION", "RF-0001")
