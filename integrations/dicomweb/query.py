"""QIDO-RS and WADO-RS (PS3.18 §10.6, §10.4): a patient's earlier studies and their images
from a DICOMweb server, as :class:`~radfusion.integrations.dicom.query.PriorSource`.

The destination's URL, TLS and credentials are the ones STOW-RS uses
(:func:`~radfusion.integrations.dicomweb.session.session_for`). Each retrieved instance is
written from the server's ``application/dicom`` part with its File Meta and transfer syntax
(pixel data is not decoded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from radfusion import audit
from radfusion.config import DicomWebDestination
from radfusion.integrations.dicom.query import QueryError, SeriesMatch, StudyMatch
from radfusion.integrations.dicomweb.session import session_for
from radfusion.logs import uid_tag

__all__ = ["DicomWebQuery"]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


@dataclass(frozen=True)
class DicomWebQuery:
    """A DICOMweb server as a prior source: QIDO-RS searches, WADO-RS series retrieval."""

    peer: DicomWebDestination

    @property
    def name(self) -> str:
        return self.peer.name

    def _call(self, what: str, action: Any, event: audit.Code = audit.QUERY) -> Any:
        where = [{"role": "archive", "name": self.peer.name, "url": self.peer.url}]
        try:
            result = self._call_once(what, action)
        except QueryError as err:
            audit.record(event, outcome=8, participants=where, detail=str(err))
            raise
        audit.record(event, participants=where, detail=what)
        return result

    def _call_once(self, what: str, action: Any) -> Any:
        try:
            session = session_for(self.peer)
        except ValueError as err:
            raise QueryError(f"{self.peer.name}: {err}") from None
        client = DICOMwebClient(url=self.peer.url, session=session, timeout=self.peer.timeout_s)
        client.set_http_retry_params(retry=False)
        try:
            return action(client)
        except requests.exceptions.HTTPError as err:
            code = err.response.status_code if err.response is not None else 0
            try:
                shown = f"HTTP {code} {HTTPStatus(code).phrase}"
            except ValueError:
                shown = f"HTTP {code}"
            raise QueryError(f"{self.peer.name}: {what} failed: {shown}") from None
        except requests.exceptions.RequestException as err:
            kind = "timed out" if isinstance(err, requests.exceptions.Timeout) else "unreachable"
            raise QueryError(f"{self.peer.name}: {what} failed: server {kind}") from None
        finally:
            session.close()

    def find_studies(self, patient_id: str, issuer: str = "") -> list[StudyMatch]:
        filters = {"PatientID": patient_id}
        if issuer:
            filters["IssuerOfPatientID"] = issuer
        fields = [
            "StudyDate",
            "StudyTime",
            "ModalitiesInStudy",
            "StudyDescription",
            "IssuerOfPatientID",
            "PatientBirthDate",
        ]
        found = self._call(
            "QIDO-RS study search",
            lambda client: client.search_for_studies(search_filters=filters, fields=fields),
        )
        out = []
        for item in found:
            ds = Dataset.from_json(item)
            if issuer and _text(ds, "IssuerOfPatientID") not in ("", issuer):
                continue
            modalities = _text(ds, "ModalitiesInStudy")
            out.append(
                StudyMatch(
                    StudyInstanceUID=_text(ds, "StudyInstanceUID"),
                    StudyDate=_text(ds, "StudyDate"),
                    StudyTime=_text(ds, "StudyTime"),
                    ModalitiesInStudy=tuple(m for m in modalities.split("\\") if m),
                    StudyDescription=_text(ds, "StudyDescription"),
                    IssuerOfPatientID=_text(ds, "IssuerOfPatientID"),
                    PatientBirthDate=_text(ds, "PatientBirthDate"),
                )
            )
        return [m for m in out if m.StudyInstanceUID]

    def find_ct_series(self, study_instance_uid: str) -> list[SeriesMatch]:
        found = self._call(
            "QIDO-RS series search",
            lambda client: client.search_for_series(
                study_instance_uid,
                search_filters={"Modality": "CT"},
                fields=["BodyPartExamined"],
            ),
        )
        out = []
        for item in found:
            ds = Dataset.from_json(item)
            if _text(ds, "Modality") in ("", "CT") and _text(ds, "SeriesInstanceUID"):
                out.append(
                    SeriesMatch(_text(ds, "SeriesInstanceUID"), _text(ds, "BodyPartExamined"))
                )
        return out

    def retrieve_series(
        self, study_instance_uid: str, series_instance_uids: Sequence[str], folder: Path
    ) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []

        def fetch(client: DICOMwebClient) -> None:
            for series in series_instance_uids:
                for ds in client.iter_series(study_instance_uid, series):
                    path = folder / f"{len(written):05d}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    written.append(path)

        self._call(
            f"WADO-RS retrieval of study {uid_tag(study_instance_uid)}",
            fetch,
            audit.INSTANCES_TRANSFERRED,
        )
        if not written:
            raise QueryError(f"{self.peer.name}: WADO-RS brought no CT images")
        return written
