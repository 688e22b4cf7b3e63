"""The error vocabulary: what happens next is decided by the type."""

from __future__ import annotations

import pytest

from radfusion.config import ConfigError
from radfusion.errors import DatasetError, RadfusionError, Unavailable
from radfusion.evaluation.grid import ReferenceMismatchError
from radfusion.evaluation.lidc import LidcFormatError
from radfusion.evaluation.lung_ct import UnmatchedReferenceError
from radfusion.integrations.dicom.export import DeliveryError
from radfusion.integrations.dicom.header import HeaderError, read_header
from radfusion.integrations.dicom.spool import SpoolFullError
from radfusion.integrations.fhir.auth import AuthError, AuthUnavailable
from radfusion.integrations.fhir.client import FhirError, FhirUnavailable
from radfusion.integrations.fhir.provider import ContextUnavailable
from radfusion.integrations.inference.repository import RepositoryError
from radfusion.integrations.inference.triton import (
    TritonError,
    TritonModelNotReady,
    TritonUnavailable,
)
from radfusion.operators.nodules import ScorerError
from radfusion.operators.segmentation_model import ModelConfigError
from radfusion.operators.series_selector import NoSeriesQualifies
from radfusion.operators.volume import VolumeError

RETRYABLE = (AuthUnavailable, FhirUnavailable, ContextUnavailable, TritonUnavailable)
PERMANENT = (
    AuthError,
    ConfigError,
    DeliveryError,
    FhirError,
    HeaderError,
    LidcFormatError,
    ModelConfigError,
    NoSeriesQualifies,
    ReferenceMismatchError,
    RepositoryError,
    ScorerError,
    SpoolFullError,
    TritonError,
    TritonModelNotReady,
    UnmatchedReferenceError,
    VolumeError,
)


@pytest.mark.parametrize("kind", RETRYABLE, ids=lambda k: k.__name__)
def test_services_that_are_down_are_retryable(kind: type[Exception]) -> None:
    assert issubclass(kind, Unavailable) and issubclass(kind, RadfusionError)


@pytest.mark.parametrize("kind", PERMANENT, ids=lambda k: k.__name__)
def test_everything_else_is_a_permanent_radfusion_error(kind: type[Exception]) -> None:
    assert issubclass(kind, RadfusionError) and not issubclass(kind, Unavailable)


def test_a_header_error_carries_its_dimse_status() -> None:
    with pytest.raises(HeaderError) as garbage:
        read_header(b"not deflated at all", "1.2.840.10008.1.2.1.99")  # Deflated Explicit VR
    assert garbage.value.status == 0xC000  # Error: Cannot Understand
    with pytest.raises(HeaderError) as missing:
        read_header(b"", "1.2.840.10008.1.2.1")  # no Study Instance UID
    assert missing.value.status == 0xA900  # Data Set Does Not Match SOP Class
    assert isinstance(missing.value, DatasetError)
