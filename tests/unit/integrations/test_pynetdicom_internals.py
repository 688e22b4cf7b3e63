"""The pynetdicom internals the node relies on: still there, and missed when gone."""

from __future__ import annotations

import pytest
from pynetdicom import _config

from radfusion.integrations.dicom import pynetdicom_internals


def test_the_internals_the_node_relies_on_are_still_there() -> None:
    """If this fails after a pynetdicom upgrade, see integrations/dicom/pynetdicom_internals.py:
    the node would still work, but hold each dataset in memory or poll 5x slower."""
    assert pynetdicom_internals.check() == []


def test_a_missing_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(_config, "STORE_RECV_CHUNKED_DATASET")
    assert pynetdicom_internals.check() == ["pynetdicom._config.STORE_RECV_CHUNKED_DATASET"]
