"""A raw DICOM upper layer for tests that must send what no well-behaved library would:
half PDUs, wrong lengths, mutated requests."""

from __future__ import annotations

import socket
import struct
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, Verification

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> bytes:
    head = recv_exactly(sock, 6)
    return head + recv_exactly(sock, struct.unpack(">I", head[2:])[0])


def associate_rq(
    calling: str = "ATTACKER",
    called: str = "RADFUSION",
    sop_class: str = Verification,
    transfer_syntax: str = EXPLICIT_LE,
) -> bytes:
    """The A-ASSOCIATE-RQ PDU pynetdicom sends for one context (``sop_class`` in
    ``transfer_syntax``, context ID 1), captured by a listener that never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    captured: dict[str, bytes] = {}

    def capture() -> None:
        conn, _ = server.accept()
        with conn:
            captured["pdu"] = read_pdu(conn)

    thread = threading.Thread(target=capture)
    thread.start()
    ae = AE(ae_title=calling)
    ae.acse_timeout = 5
    ae.add_requested_context(sop_class, transfer_syntax)
    ae.associate("127.0.0.1", server.getsockname()[1], ae_title=called)
    thread.join(10)
    server.close()
    return captured["pdu"]


def connect_raw(port: int, rq: bytes) -> socket.socket:
    """A raw connection with an association accepted on it (asserted)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(rq)
    ac = read_pdu(sock)
    assert ac[0] == 0x02, f"association not accepted: PDU type {ac[0]:#x}"
    return sock


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def c_store_pdus(
    dataset: bytes, sop_instance: str, sop_class: str = CTImageStorage, max_pdu: int = 16384
) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE request on context 1."""
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = BytesIO(dataset)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    pdus = []
    for primitive in msg.encode_msg(1, max_pdu):
        assert isinstance(primitive, P_DATA)
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def store_raw(
    port: int,
    dataset: bytes,
    sop_instance: str,
    sop_class: str = CTImageStorage,
    transfer_syntax: str = EXPLICIT_LE,
) -> int:
    """Send ``dataset`` (encoded bytes, as they are) by C-STORE; returns the status."""
    sock = connect_raw(port, associate_rq(sop_class=sop_class, transfer_syntax=transfer_syntax))
    with sock:
        for pdu in c_store_pdus(dataset, sop_instance, sop_class):
            sock.sendall(pdu)
        command = b""
        while True:  # the C-STORE-RSP command set, in one or more PDVs
            pdu = read_pdu(sock)
            assert pdu[0] == 0x04, f"PDU type {pdu[0]:#x} instead of P-DATA-TF"
            pos = 6
            while pos < len(pdu):
                (length,) = struct.unpack_from(">I", pdu, pos)
                control = pdu[pos + 5]
                command += pdu[pos + 6 : pos + 4 + length]
                pos += 4 + length
            if control & 0x02:
                break
        sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4)  # A-RELEASE-RQ
    rsp = pydicom.filereader.read_dataset(BytesIO(command), True, True)
    return int(rsp.Status)


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True when the node closes ``sock`` within ``within_s`` seconds."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def node_cpu_s(node: Any) -> float:
    """CPU seconds (user + system) the node process has used so far."""
    import psutil

    times = psutil.Process(node.proc.pid).cpu_times()
    return float(times.user + times.system)


def dataset_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]
