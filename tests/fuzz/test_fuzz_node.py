"""Fuzzing the PDU/DIMSE path of a real ``radfusion serve``: noise, mutated association
requests, and mutated C-STORE conversations on an accepted association. Whatever arrives, the
node answers or closes that connection, logs one line, keeps serving, leaves no temporary file
and never logs a traceback."""

from __future__ import annotations

import socket
from typing import Any

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import echoscu, storescu, wait_for
from tests.dicom_support import associate_rq, c_store_pdus, dataset_bytes, read_pdu
from tests.fuzz.fuzz_support import FUZZ, mutated

pytestmark = pytest.mark.integration


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:  # timed out waiting, or reset: either way the node has its answer
        pass


def test_the_node_survives_mutated_conversations(node_factory: Any, ct_study: Any) -> None:
    node = node_factory({"node": {"acse_timeout_s": 2, "max_associations_per_address": 64}})
    rq = associate_rq(sop_class=CTImageStorage)
    source = ct_study.files[0]
    sop = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    store = b"".join(c_store_pdus(dataset_bytes(source), sop, max_pdu=4096))
    conversations = st.one_of(
        st.tuples(st.binary(min_size=1, max_size=512), st.none()),  # noise
        st.tuples(mutated(rq), st.none()),  # a broken association request
        st.tuples(st.just(rq), mutated(store)),  # accepted, then a broken C-STORE
    )
    sent = {"examples": 0}

    @FUZZ
    @given(conversation=conversations)
    def talk(conversation: tuple[bytes, bytes | None]) -> None:
        first, then = conversation
        sent["examples"] += 1
        with socket.create_connection(("127.0.0.1", node.port), timeout=2) as sock:
            sock.settimeout(0.2)
            try:
                sock.sendall(first)
                if then is not None:
                    read_pdu(sock)  # the A-ASSOCIATE-AC
                    sock.sendall(then)
            except OSError:
                return  # the node closed on us mid-send: an answer too
            _drain(sock)

    talk()
    assert sent["examples"] >= 1
    assert echoscu(node.port)
    assert storescu(node.port, [source]).returncode == 0
    wait_for(lambda: not any((node.spool / "tmp").iterdir()), 10, "no temporary files left")
    log = node.log()
    assert node.proc.poll() is None
    assert "Traceback" not in log, log[-4000:]
    # a few lines per conversation, not one per 6 bytes of noise (was 50,000 for 150)
    assert len(log.splitlines()) < 10 * sent["examples"] + 50
