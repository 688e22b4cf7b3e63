"""The lung-ct app's prior: the patient's latest earlier CT in the PACS, analysed alike.

:class:`PriorFinder` is the app's :data:`~radfusion.operators.change.PriorLookup`: it asks the
PACS of ``apps.lung_ct.priors.pacs`` for the patient's studies (C-FIND, or QIDO-RS for a
DICOMweb destination, by Patient ID and Issuer of Patient ID), takes the latest CT study dated
before this one (within ``max_age_days``), retrieves its chest CT series (C-GET or C-MOVE to
the node, or WADO-RS) into a temporary folder, chooses a series by the app's own rule and
analyses it with the same model, detector and operating point as the current study.
Every way this can come to nothing returns the reason, for the SR; nothing is invented.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from radfusion.config import DicomDestination, DicomWebDestination, RadfusionConfig
from radfusion.integrations.dicom.moves import DimseMoveQuery
from radfusion.integrations.dicom.query import (
    DimseQuery,
    PriorSource,
    QueryError,
    chest_ct_series,
)
from radfusion.integrations.dicomweb.query import DicomWebQuery
from radfusion.operators.change import PriorAnalysis
from radfusion.operators.detection import Anatomy
from radfusion.operators.measurement import Measured
from radfusion.operators.series_selector import SelectionRule, read_headers, select_series
from radfusion.operators.volume import Volume, VolumeError, assemble_first_usable

__all__ = ["PriorFinder"]

log = logging.getLogger("radfusion.apps.lung_ct.priors")

Analyse = Callable[[Volume], tuple[Anatomy, Measured]]
"""A volume → its lungs and nodules, measured: the app's own analysis."""


def _date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


class PriorFinder:
    """Finds, retrieves and analyses the prior CT of the patient of a volume.

    Args:
        config: the configuration (``apps.lung_ct.priors``, its PACS destination, the node's
            AE title and the series rule).
        analyse: the app's analysis of a volume.
    """

    def __init__(self, config: RadfusionConfig, analyse: Analyse) -> None:
        settings = config.apps.lung_ct.priors
        peer = config.export.destination(settings.pacs)
        source: PriorSource
        if isinstance(peer, DicomDestination):
            if settings.retrieve == "c-move":
                source = DimseMoveQuery(peer, config.node.ae_title, config.node)
            else:
                source = DimseQuery(peer, config.node.ae_title)
        elif isinstance(peer, DicomWebDestination):
            source = DicomWebQuery(peer)
        else:  # the configuration checks this too
            raise ValueError(f"apps.lung_ct.priors.pacs: {settings.pacs!r} is a folder")
        self.source = source
        self.max_age_days = settings.max_age_days
        self.rule = SelectionRule.from_settings(config.apps.lung_ct)
        self.analyse = analyse

    def __call__(self, volume: Volume) -> PriorAnalysis | str:
        header = volume.source_images[0] if volume.source_images else None
        if header is None or not str(header.get("PatientID", "") or "").strip():
            return "the study has no Patient ID"
        today = _date(str(header.get("StudyDate", "") or ""))
        if today is None:
            return "the study has no Study Date"
        this_study = str(header.get("StudyInstanceUID", ""))
        try:
            matches = self.source.find_studies(
                str(header.PatientID).strip(),
                str(header.get("IssuerOfPatientID", "") or "").strip(),
            )
        except QueryError as err:
            log.warning("priors: %s", err)
            return f"the PACS could not be asked ({err})"
        issuer = str(header.get("IssuerOfPatientID", "") or "").strip()
        issuers = {m.IssuerOfPatientID for m in matches if m.IssuerOfPatientID}
        if not issuer and len(issuers) > 1:
            return (
                f"{self.source.name} holds {len(issuers)} patients with this Patient ID (their "
                "issuers differ) and this study names none"
            )
        born = str(header.get("PatientBirthDate", "") or "").strip()
        earlier = []
        others = 0
        for match in matches:
            when = _date(match.StudyDate)
            is_ct = "CT" in match.ModalitiesInStudy or not match.ModalitiesInStudy
            if match.StudyInstanceUID == this_study or when is None or not is_ct:
                continue
            if born and match.PatientBirthDate and match.PatientBirthDate != born:
                others += 1  # the same ID, another patient
                continue
            if when < today and (today - when).days <= self.max_age_days:
                earlier.append((when, match.StudyTime, match))
        if not earlier:
            also = f" ({others} study(ies) of another patient with this ID left out)"
            return (
                f"no earlier CT of this patient in {self.source.name} within the last "
                f"{self.max_age_days} days{also if others else ''}"
            )
        # Newest first; a study of another body part is passed over for the next older one.
        chosen = None
        not_chest = []
        for when, _, study in sorted(earlier, key=lambda e: (e[0], e[1]), reverse=True):
            found = self._analysable(study.StudyInstanceUID, when)
            if isinstance(found, str):
                return found
            if found is not None:
                chosen = (study, when, *found)
                break
            not_chest.append(when.isoformat())
        if chosen is None:
            return f"no earlier chest CT of this patient (other body parts: {', '.join(not_chest)})"
        study, when, prior, series = chosen
        anatomy, measured = self.analyse(prior)
        if measured.result is None:
            return (
                f"the prior CT of {when.isoformat()} could not be analysed "
                f"({measured.out_of_scope_reason})"
            )
        return PriorAnalysis(
            StudyInstanceUID=study.StudyInstanceUID,
            SeriesInstanceUID=series,
            StudyDate=when,
            volume=prior,
            lungs=anatomy.fields.right | anatomy.fields.left,
            nodules=tuple(f for f in measured.result.findings if f.kind == "tumour"),
        )

    def _analysable(
        self, study_instance_uid: str, when: dt.date
    ) -> tuple[Volume, str] | str | None:
        """The volume of the prior study's chest CT series the app would choose and its
        Series Instance UID; None when the study has no chest CT (another body part); the
        reason when it cannot be had."""
        day = when.isoformat()
        try:
            chest = chest_ct_series(self.source.find_ct_series(study_instance_uid))
            if not chest:
                return None
            with tempfile.TemporaryDirectory(prefix="radfusion-prior-") as folder:
                files = self.source.retrieve_series(study_instance_uid, chest, Path(folder))
                selection = select_series(read_headers(files), rule=self.rule)
                if selection is None or selection.refused:
                    return f"the prior CT of {day} has no series this app can analyse"
                try:
                    volume = assemble_first_usable(selection.candidates)
                except VolumeError as err:
                    return f"the prior CT of {day} cannot be read ({err})"
        except QueryError as err:
            log.warning("priors: %s", err)
            return f"the prior CT of {day} could not be retrieved ({err})"
        return volume, str(volume.source_images[0].SeriesInstanceUID)
