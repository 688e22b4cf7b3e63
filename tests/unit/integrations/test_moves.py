"""C-MOVE retrieval: the inbox keeps only what a retrieval waits for; the PACS's refusals and
a taken port are named. Against Orthanc (both through the node and with no node):
tests/integration/test_lung_ct_to_orthanc.py and test_lung_ct_priors.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelMove,
)

from radfusion.config import DicomDestination, NodeConfig
from radfusion.integrations.dicom.moves import MoveInbox, retrieve_series_by_move
from radfusion.integrations.dicom.query import QueryError
from tests.conftest import free_port


def test_only_an_expected_series_from_the_expected_sender_is_kept(tmp_path: Path) -> None:
    inbox = MoveInbox()
    assert not inbox.expecting
    with inbox.expect(["1.2.3"], tmp_path / "prior", "PACS", "RADFUSION") as files:
        assert inbox.expecting
        assert inbox.deliver("1.2.4", "PACS", "", b"other series") is None
        assert inbox.deliver("1.2.3", "SCANNER", "", b"another sender") is None
        first = inbox.deliver("1.2.3", "PACS", "", b"by the PACS")
        # A PACS may send from another AE title; the Move Originator says it is ours.
        second = inbox.deliver("1.2.3", "PACS-NODE-2", "RADFUSION", b"for our C-MOVE")
        assert files == [first, second]
        assert first is not None and first.read_bytes() == b"by the PACS"
    assert not inbox.expecting
    assert inbox.deliver("1.2.3", "PACS", "", b"too late") is None


def test_a_received_file_is_moved_into_the_retrievals_folder(tmp_path: Path) -> None:
    inbox = MoveInbox()
    received = tmp_path / "tmp-received"
    received.write_bytes(b"DICM")
    with inbox.expect(["1.2.3"], tmp_path / "prior", "PACS", "RADFUSION"):
        kept = inbox.deliver("1.2.3", "PACS", "", received)
    assert kept is not None and kept.parent == tmp_path / "prior"
    assert kept.read_bytes() == b"DICM" and not received.exists()


def test_a_second_retrieval_of_the_same_series_waits_for_the_first(tmp_path: Path) -> None:
    inbox = MoveInbox()
    order: list[str] = []
    with inbox.expect(["1.2.3"], tmp_path / "a", "PACS", "RADFUSION"):

        def second() -> None:
            with inbox.expect(["1.2.3"], tmp_path / "b", "PACS", "RADFUSION"):
                order.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]


_RELEASE = threading.Event()


def _unknown_destination(event: Event) -> Iterator[object]:
    yield 0xA801, None  # move destination unknown


def _stalling_move(event: Event) -> Iterator[object]:
    yield "127.0.0.1", free_port()  # where it would send the images...
    yield 1  # ...one sub-operation announced...
    _RELEASE.wait(60)  # ...and never performed while the test runs
    yield 0xA702, None


@pytest.fixture
def refusing_pacs() -> Iterator[DicomDestination]:
    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_MOVE, _unknown_destination)],
    )
    yield DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, timeout_s=5)
    server.shutdown()


@pytest.fixture
def stalling_pacs() -> Iterator[DicomDestination]:
    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_MOVE, _stalling_move)]
    )
    _RELEASE.clear()
    yield DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, timeout_s=1)
    _RELEASE.set()
    server.shutdown()


def test_a_c_move_that_stalls_fails_within_the_timeout_and_frees_the_port(
    stalling_pacs: DicomDestination, tmp_path: Path
) -> None:
    node = NodeConfig(host="127.0.0.1", port=free_port())
    started = time.monotonic()
    with pytest.raises(QueryError, match="pacs: C-MOVE"):
        retrieve_series_by_move(stalling_pacs, node, "1.2.3", ["1.2.3.4"], tmp_path / "prior")
    # Not a timing test: the 1 s timeout ended it, far short of the peer's 60 s stall.
    assert time.monotonic() - started < 30
    with socket.socket() as again:  # the retrieval's listener is gone
        again.bind(("127.0.0.1", node.port))


def test_a_pacs_that_does_not_know_the_node_says_what_to_register(
    refusing_pacs: DicomDestination, tmp_path: Path
) -> None:
    node = NodeConfig(host="127.0.0.1", port=free_port())
    with pytest.raises(QueryError, match=r"0xA801 \(move destination unknown \(register"):
        retrieve_series_by_move(refusing_pacs, node, "1.2.3", ["1.2.3.4"], tmp_path / "prior")


def test_a_node_port_taken_by_another_process_is_named(
    refusing_pacs: DicomDestination, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = NodeConfig(host="127.0.0.1", port=taken.getsockname()[1])
        with pytest.raises(QueryError, match="is `radfusion serve` running"):
            retrieve_series_by_move(refusing_pacs, node, "1.2.3", ["1.2.3.4"], tmp_path / "p")


def test_an_instance_that_cannot_be_written_is_not_counted(tmp_path: Path) -> None:
    inbox = MoveInbox()
    with inbox.expect(["1.2.3"], tmp_path / "prior", "PACS", "RADFUSION") as files:
        with pytest.raises(OSError):
            inbox.deliver("1.2.3", "PACS", "", tmp_path / "no-such-received-file")
        assert files == []
