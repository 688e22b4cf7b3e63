"""Fuzzing the volume assembly: a series whose geometry and pixel attributes a broken or
hostile sender got wrong must assemble or be refused with a VolumeError that says why,
never crash the app with an IndexError, ZeroDivisionError or a NaN volume."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from radfusion.errors import RadfusionError
from radfusion.operators.volume import assemble_volume
from tests.fuzz.fuzz_support import FUZZ


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    from radfusion.synth.ct_series import synth_ct

    study = synth_ct(tmp_path_factory.mktemp("fuzz-ct"), slices=12, rows=32, columns=32,
                     tumours=0, seed=5)  # fmt: skip
    return [pydicom.dcmread(p) for p in study.files]


_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1e-12, 1e12, -1.0]),
)
_ATTRIBUTES: dict[str, st.SearchStrategy[Any]] = {
    "ImageOrientationPatient": st.lists(_FLOATS, min_size=0, max_size=7),
    "ImagePositionPatient": st.lists(_FLOATS, min_size=0, max_size=4),
    "PixelSpacing": st.lists(_FLOATS, min_size=0, max_size=3),
    "SliceThickness": _FLOATS,
    "Rows": st.integers(0, 70000),
    "Columns": st.integers(0, 70000),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    "PixelRepresentation": st.integers(0, 3),
    "SamplesPerPixel": st.integers(0, 4),
    "NumberOfFrames": st.integers(-1, 5),
    "RescaleSlope": _FLOATS,
    "RescaleIntercept": _FLOATS,
    "PixelPaddingValue": st.integers(-70000, 70000),
    "PixelData": st.binary(max_size=64),
}
_EDITS = st.lists(
    st.tuples(
        st.integers(0, 11),  # which slice
        st.sampled_from(sorted(_ATTRIBUTES)),
        st.booleans(),  # delete instead of set
        st.data(),
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(edits=_EDITS, drop=st.sets(st.integers(0, 11), max_size=3), shuffle=st.randoms())
def test_broken_geometry_is_refused_with_a_reason(
    series: list[Dataset], edits: list[Any], drop: set[int], shuffle: Any
) -> None:
    datasets = [copy.deepcopy(ds) for i, ds in enumerate(series) if i not in drop]
    shuffle.shuffle(datasets)
    for index, name, delete, data in edits:
        if not datasets:
            break
        ds = datasets[index % len(datasets)]
        if delete:
            if name in ds:
                delattr(ds, name)
            continue
        value = data.draw(_ATTRIBUTES[name])
        try:
            setattr(ds, name, value)
        except (ValueError, TypeError, OverflowError):
            continue  # pydicom itself refuses to hold it: nothing a sender could encode
    try:
        volume = assemble_volume(datasets)
    except RadfusionError:
        return
    # What assembles is usable: finite HU, positive finite spacing, a finite affine.
    assert np.isfinite(volume.hu).all()
    assert all(math.isfinite(s) and s > 0 for s in volume.spacing_mm), volume.spacing_mm
    assert np.isfinite(volume.affine).all()


def test_the_unbroken_series_assembles(series: list[Dataset]) -> None:
    assemble_volume([copy.deepcopy(ds) for ds in series])


def test_seed_is_a_real_multi_slice_series(series: list[Dataset]) -> None:
    assert len(series) == 12
    assert len({tuple(ds.ImagePositionPatient) for ds in series}) == 12
