"""The lung-ct app's prior: the patient's latest earlier CT in the PACS, analysed alike.

:class:`PriorFinder` is the app's :data:`~radfusion.operators.change.PriorLookup`: it asks the
PACS of ``apps.lung_ct.priors.pacs`` for the patient's studies (C-FIND by Patient ID and Issuer
of Patient ID), takes the latest CT study dated before this one (within ``max_age_days``),
retrieves its CT series (C-GET) into a temporary folder, chooses a series by the app's own
rule and analyses it with the same model, detector and operating point as the current study.
Every way this can come to nothing returns the reason, for the SR; nothing is invented.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from radfusion.config import DicomDestination, RadfusionConfig
from radfusion.integrations.dicom.query import (
    QueryError,
    find_ct_series,
    find_studies,
    retrieve_series,
)
from radfusion.logs import uid_tag
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
        if not isinstance(peer, DicomDestination):  # the configuration checks this too
            raise ValueError(f"apps.lung_ct.priors.pacs: {settings.pacs!r} is not DICOM")
        self.peer = peer
        self.max_age_days = settings.max_age_days
        self.calling_ae_title = config.node.ae_title
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
            matches = find_studies(
                self.peer,
                self.calling_ae_title,
                str(header.PatientID).strip(),
                str(header.get("IssuerOfPatientID", "") or "").strip(),
            )
        except QueryError as err:
            log.warning("priors: %s", err)
            return f"the PACS could not be asked ({err})"
        earlier = []
        for match in matches:
            when = _date(match.StudyDate)
            is_ct = "CT" in match.ModalitiesInStudy or not match.ModalitiesInStudy
            if match.StudyInstanceUID == this_study or when is None or not is_ct:
                continue
            if when < today and (today - when).days <= self.max_age_days:
                earlier.append((when, match.StudyTime, match))
        if not earlier:
            return (
                f"no earlier CT of this patient in {self.peer.name} within the last "
                f"{self.max_age_days} days"
            )
        when, _, latest = max(earlier, key=lambda e: (e[0], e[1]))
        log.info("priors: comparing with study %s of %s", uid_tag(latest.StudyInstanceUID), when)
        with tempfile.TemporaryDirectory(prefix="radfusion-prior-") as folder:
            try:
                series = find_ct_series(self.peer, self.calling_ae_title, latest.StudyInstanceUID)
                if not series:
                    return f"the prior study of {when.isoformat()} has no CT series"
                files = retrieve_series(
                    self.peer,
                    self.calling_ae_title,
                    latest.StudyInstanceUID,
                    series,
                    Path(folder),
                )
            except QueryError as err:
                log.warning("priors: %s", err)
                return f"the prior CT of {when.isoformat()} could not be retrieved ({err})"
            selection = select_series(read_headers(files), rule=self.rule)
            if selection is None or selection.refused:
                return f"the prior CT of {when.isoformat()} has no series this app can analyse"
            try:
                prior = assemble_first_usable(selection.candidates)
            except VolumeError as err:
                return f"the prior CT of {when.isoformat()} cannot be read ({err})"
        anatomy, measured = self.analyse(prior)
        if measured.result is None:
            return (
                f"the prior CT of {when.isoformat()} could not be analysed "
                f"({measured.out_of_scope_reason})"
            )
        header = prior.source_images[0]
        return PriorAnalysis(
            StudyInstanceUID=latest.StudyInstanceUID,
            SeriesInstanceUID=str(header.SeriesInstanceUID),
            StudyDate=when,
            volume=prior,
            lungs=anatomy.fields.right | anatomy.fields.left,
            nodules=tuple(f for f in measured.result.findings if f.kind == "tumour"),
        )
