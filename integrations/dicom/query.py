"""Query/retrieve from a PACS: a patient's earlier studies (C-FIND) and their images (C-GET).

Study Root Query/Retrieve (PS3.4 Annex C). C-GET brings the images back on the same
association (the PACS needs no route to us, unlike C-MOVE), into a folder the caller owns.
The peer is a configured DICOM destination: the archive radfusion stores its results in is the
one it asks for priors. :class:`DimseQuery` here and
:class:`radfusion.integrations.dicomweb.query.DicomWebQuery` (QIDO-RS, WADO-RS) are the two
:class:`PriorSource` implementations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from radfusion import audit
from radfusion.config import DicomDestination
from radfusion.errors import RadfusionError
from radfusion.integrations.dicom.association import NoAssociation, associate

__all__ = [
    "RETRIEVED_SOP_CLASSES",
    "DimseQuery",
    "PriorSource",
    "QueryError",
    "SeriesMatch",
    "StudyMatch",
    "archive_participant",
    "chest_ct_series",
    "find_ct_series",
    "find_studies",
    "retrieve_series",
    "series_identifier",
]

log = logging.getLogger("radfusion.query")

_PENDING = {0xFF00, 0xFF01}
_CHEST = re.compile(r"CHEST|LUNG|THORAX|TORSO|WHOLE.?BODY")
RETRIEVED_SOP_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)
"""What a prior retrieval accepts (C-GET or C-MOVE): the CT Image Storage classes."""
_SYNTAXES = [
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
]


class QueryError(RadfusionError, RuntimeError):
    """The PACS could not be asked, or refused; the message names it and says why."""


@dataclass(frozen=True)
class StudyMatch:
    """A study the PACS holds for the patient."""

    StudyInstanceUID: str
    StudyDate: str  # YYYYMMDD, "" when the PACS does not say
    StudyTime: str
    ModalitiesInStudy: tuple[str, ...]
    StudyDescription: str
    IssuerOfPatientID: str = ""  # "" when the PACS does not say
    PatientBirthDate: str = ""


@dataclass(frozen=True)
class SeriesMatch:
    """A CT series of a study."""

    SeriesInstanceUID: str
    BodyPartExamined: str  # "" when the PACS does not say


def _associate(
    peer: DicomDestination,
    calling_ae_title: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    roles: Sequence[SCP_SCU_RoleSelectionNegotiation] = (),
) -> Association:
    try:
        return associate(peer, calling_ae_title, contexts, roles)
    except NoAssociation as err:
        raise QueryError(str(err)) from None


def archive_participant(peer: DicomDestination) -> dict[str, str]:
    """The PACS as a participant of an audit record."""
    return {
        "role": "archive",
        "name": peer.name,
        "ae_title": peer.ae_title,
        "address": f"{peer.host}:{peer.port}",
    }


def _find(peer: DicomDestination, calling_ae_title: str, query: Dataset) -> list[Dataset]:
    # The query's keys identify the patient: the trail names the level only.
    level = {"QueryRetrieveLevel": str(query.QueryRetrieveLevel)}
    try:
        found = _find_once(peer, calling_ae_title, query)
    except QueryError as err:
        audit.record(
            audit.QUERY,
            outcome=8,
            participants=[archive_participant(peer)],
            objects=[level],
            detail=str(err),
        )
        raise
    audit.record(
        audit.QUERY,
        participants=[archive_participant(peer)],
        objects=[level],
        detail=f"C-FIND: {len(found)} match(es)",
    )
    return found


def _find_once(peer: DicomDestination, calling_ae_title: str, query: Dataset) -> list[Dataset]:
    assoc = _associate(
        peer, calling_ae_title, [(StudyRootQueryRetrieveInformationModelFind, _SYNTAXES[:2])]
    )
    found = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = getattr(status, "Status", None)
            if code in _PENDING and identifier is not None:
                found.append(identifier)
            elif code != 0x0000:
                shown = "no response" if code is None else f"status 0x{code:04X}"
                raise QueryError(f"{peer.name}: C-FIND failed: {shown}")
    finally:
        if assoc.is_established:
            assoc.release()
    return found


def find_studies(
    peer: DicomDestination, calling_ae_title: str, patient_id: str, issuer: str = ""
) -> list[StudyMatch]:
    """The studies ``peer`` holds for the patient (Patient ID and, when known, its issuer).

    Raises:
        QueryError: no association, or the query failed.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    if issuer:
        query.IssuerOfPatientID = issuer
    keys = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "PatientBirthDate")
    for keyword in keys:
        setattr(query, keyword, "")
    if not issuer:
        query.IssuerOfPatientID = ""  # returned, to tell patients who share the ID apart
    query.ModalitiesInStudy = ""
    out = []
    for ds in _find(peer, calling_ae_title, query):
        # A PACS that ignores the issuer key answers for other domains' patients too.
        if issuer and str(ds.get("IssuerOfPatientID", issuer) or issuer) != issuer:
            continue
        modalities = ds.get("ModalitiesInStudy", "")
        values = [modalities] if isinstance(modalities, str) else list(modalities)
        out.append(
            StudyMatch(
                StudyInstanceUID=str(ds.get("StudyInstanceUID", "")),
                StudyDate=str(ds.get("StudyDate", "") or ""),
                StudyTime=str(ds.get("StudyTime", "") or ""),
                ModalitiesInStudy=tuple(str(v) for v in values if v),
                StudyDescription=str(ds.get("StudyDescription", "") or ""),
                IssuerOfPatientID=str(ds.get("IssuerOfPatientID", "") or "").strip(),
                PatientBirthDate=str(ds.get("PatientBirthDate", "") or "").strip(),
            )
        )
    return [m for m in out if m.StudyInstanceUID]


def find_ct_series(
    peer: DicomDestination, calling_ae_title: str, study_instance_uid: str
) -> list[SeriesMatch]:
    """The CT series of a study.

    Raises:
        QueryError: no association, or the query failed.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = ""
    query.Modality = "CT"
    query.BodyPartExamined = ""
    return [
        SeriesMatch(str(ds.SeriesInstanceUID), str(ds.get("BodyPartExamined", "") or "").strip())
        for ds in _find(peer, calling_ae_title, query)
        if str(ds.get("Modality", "CT")) == "CT" and ds.get("SeriesInstanceUID")
    ]


def series_identifier(study_instance_uid: str, series_instance_uid: str) -> Dataset:
    """The identifier of a series-level retrieval (C-GET, C-MOVE)."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_instance_uid
    query.SeriesInstanceUID = series_instance_uid
    return query


def retrieve_series(
    peer: DicomDestination,
    calling_ae_title: str,
    study_instance_uid: str,
    series_instance_uids: Sequence[str],
    folder: Path,
) -> list[Path]:
    """C-GET the series into ``folder``; returns the files written.

    Raises:
        QueryError: no association, the peer does not offer C-GET, or a retrieval failed or
            brought nothing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def on_store(event: Event) -> int:
        # The bytes as received, with their File Meta: nothing decoded or encoded again.
        path = folder / f"{len(written):05d}.dcm"
        path.write_bytes(event.encoded_dataset(include_meta=True))
        written.append(path)
        return 0x0000

    # One context per syntax: the PACS sends each image in the syntax it holds it in, with
    # no need to transcode (a context with several syntaxes is accepted with one).
    contexts = [(StudyRootQueryRetrieveInformationModelGet, _SYNTAXES[:2])] + [
        (sop_class, [syntax]) for sop_class in RETRIEVED_SOP_CLASSES for syntax in _SYNTAXES
    ]
    roles = [build_role(sop_class, scp_role=True) for sop_class in RETRIEVED_SOP_CLASSES]
    assoc = _associate(peer, calling_ae_title, contexts, roles)
    assoc.bind(evt.EVT_C_STORE, on_store)
    try:
        for series in series_instance_uids:
            query = series_identifier(study_instance_uid, series)
            last = None
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                last = getattr(status, "Status", None)
            if last not in (0x0000, 0xB000):
                shown = "no response" if last is None else f"status 0x{last:04X}"
                raise QueryError(f"{peer.name}: C-GET of a series failed: {shown}")
    finally:
        if assoc.is_established:
            assoc.release()
    if not written:
        raise QueryError(f"{peer.name}: C-GET brought no CT images")
    audit.record(
        audit.INSTANCES_TRANSFERRED,
        action="R",
        participants=[archive_participant(peer)],
        objects=[{"StudyInstanceUID": study_instance_uid, "retrieved": len(written)}],
        detail="C-GET of a prior",
    )
    return written


class PriorSource(Protocol):
    """Where a patient's earlier studies are found and fetched from."""

    @property
    def name(self) -> str:
        """The destination's name, for reports."""
        ...

    def find_studies(self, patient_id: str, issuer: str = "") -> list[StudyMatch]:
        """The patient's studies. Raises QueryError."""
        ...

    def find_ct_series(self, study_instance_uid: str) -> list[SeriesMatch]:
        """A study's CT series. Raises QueryError."""
        ...

    def retrieve_series(
        self, study_instance_uid: str, series_instance_uids: Sequence[str], folder: Path
    ) -> list[Path]:
        """The series' images into ``folder``. Raises QueryError."""
        ...


@dataclass(frozen=True)
class DimseQuery:
    """A DICOM peer as a :class:`PriorSource`: C-FIND and C-GET, calling as ``calling_ae_title``
    (the PACS must allow both to that AE title)."""

    peer: DicomDestination
    calling_ae_title: str

    @property
    def name(self) -> str:
        return self.peer.name

    def find_studies(self, patient_id: str, issuer: str = "") -> list[StudyMatch]:
        return find_studies(self.peer, self.calling_ae_title, patient_id, issuer)

    def find_ct_series(self, study_instance_uid: str) -> list[SeriesMatch]:
        return find_ct_series(self.peer, self.calling_ae_title, study_instance_uid)

    def retrieve_series(
        self, study_instance_uid: str, series_instance_uids: Sequence[str], folder: Path
    ) -> list[Path]:
        return retrieve_series(
            self.peer, self.calling_ae_title, study_instance_uid, series_instance_uids, folder
        )


def chest_ct_series(series: Sequence[SeriesMatch]) -> list[str]:
    """The Series Instance UIDs of those whose Body Part Examined covers the chest (unstated:
    assumed to)."""
    return [
        s.SeriesInstanceUID
        for s in series
        if not s.BodyPartExamined or _CHEST.search(s.BodyPartExamined.upper())
    ]
