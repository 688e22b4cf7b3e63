"""Associations radfusion requests from a configured DICOM peer (exports, commitment, priors).

One place sets what every outgoing association needs: the peer's timeouts, short polling,
TCP_NODELAY (:func:`on_connection_open`), DICOM TLS when configured, and a reason when none
is established.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import build_context

from radfusion.config import DicomDestination
from radfusion.errors import RadfusionError
from radfusion.integrations.dicom.pynetdicom_internals import on_connection_open, shorten_polling
from radfusion.integrations.dicom.tls import client_context

__all__ = ["NoAssociation", "associate"]


class NoAssociation(RadfusionError, ConnectionError):
    """The peer rejected the association, or none could be made; the message says which."""


def associate(
    peer: DicomDestination,
    calling_ae_title: str,
    contexts: Iterable[tuple[str, Sequence[str]]],
    roles: Sequence[SCP_SCU_RoleSelectionNegotiation] = (),
) -> Association:
    """An established association to ``peer`` proposing ``contexts`` (abstract syntax,
    transfer syntaxes) and SCP/SCU ``roles``, calling as ``peer.calling_ae_title`` or else
    ``calling_ae_title``.

    Raises:
        NoAssociation: rejected, unreachable, TLS refused or aborted.
    """
    ae = AE(ae_title=peer.calling_ae_title or calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_s
    ae.requested_contexts = [build_context(c, list(ts)) for c, ts in contexts]
    shorten_polling()
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=list(roles) or None,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)],
        tls_args=(client_context(peer.tls), peer.host) if peer.tls else None,
    )
    if not assoc.is_established:
        lost = (
            "peer unreachable, TLS refused or aborted"
            if peer.tls
            else "peer unreachable or aborted"
        )
        why = "rejected" if assoc.is_rejected else f"no association ({lost})"
        raise NoAssociation(f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port}): {why}")
    return assoc
