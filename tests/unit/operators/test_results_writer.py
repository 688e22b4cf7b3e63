"""The results writer's refusal: when no series of a study qualifies, an SR says the study was
received and not analysed and why (every series' reason), with no measurements and no SEG; it
references the images of the series that came closest, validates (dciodvfy) and is
deterministic; with ``report_refusals: false`` nothing is written. The lung CT app and
``radfusion run`` then fail with every series' reason."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import pydicom
import pytest
from monai.deploy.core import Fragment

from radfusion.apps.lung_ct.app import run_folder
from radfusion.config import parse_config
from radfusion.operators.results import AlgorithmInfo
from radfusion.operators.results_writer import write_results
from radfusion.operators.series_selector import (
    NoSeriesQualifies,
    SelectionRule,
    SeriesSelection,
    SeriesSelectorOperator,
    read_headers,
    select_series,
)
from radfusion.operators.volume import VolumeError
from radfusion.synth.ct import make_phantom
from radfusion.synth.ct_series import SynthStudy, write_ct_series
from tests.conftest import require_tool

ALGORITHM = AlgorithmInfo(name="radfusion-lung-ct", version="0.1.0")
UID_ROOT = "1.2.826.0.1.3680043.10.1234."
SLICES = 24  # x 5 mm = 120 mm: short of the default 150 mm
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def short_study(tmp_path_factory: pytest.TempPathFactory) -> SynthStudy:
    """A 120 mm axial CT series and, in the same study, a two-image localizer series."""
    phantom = make_phantom(
        slices=SLICES, rows=64, columns=64, pixel_spacing=5.0, slice_thickness=5, tumours=0
    )
    ct = write_ct_series(phantom, tmp_path_factory.mktemp("short") / "in")
    for k, source in enumerate(ct.files[:2]):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = UID_ROOT + "9.5"
        ds.SeriesNumber = 1
        ds.SeriesDescription = "Topogram"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}9.5.{k + 1}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.save_as(ct.directory / f"scout{k + 1}.dcm", enforce_file_format=True)
    return ct


def files_of(study: SynthStudy) -> list[Path]:
    return sorted(p for p in study.directory.iterdir() if p.suffix == ".dcm")


def refusal(study: SynthStudy) -> SeriesSelection:
    selection = select_series(read_headers(files_of(study)))
    assert selection is not None and selection.refused
    return selection


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    report = out.stdout + out.stderr
    print(report)
    return [line for line in report.splitlines() if "Error" in line]


def texts(ds: pydicom.Dataset) -> list[str]:
    """Every TEXT value of an SR content tree, in order."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out.extend(texts(item))
    return out


REASONS = [
    "series 1 (Topogram STANDARD): localizer (scout/topogram)",
    "series 2 (Chest 5mm STANDARD): z coverage 120 mm < 150 mm (24 slice(s) 5 mm apart)",
]


def test_a_refusal_writes_an_sr_that_says_why_and_no_seg(
    short_study: SynthStudy, tmp_path: Path
) -> None:
    selection = refusal(short_study)
    assert selection.reasons() == REASONS
    written = write_results(selection, None, None, ALGORITHM, tmp_path, uid_root=UID_ROOT)
    assert [p.name for p in written] == ["sr.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sr.dcm"]  # no SEG
    assert dciodvfy_errors(written[0]) == []
    sr = pydicom.dcmread(written[0])
    assert sr.StudyInstanceUID == short_study.StudyInstanceUID
    assert sr.SOPInstanceUID.startswith(UID_ROOT)
    said = texts(sr)
    start = said.index(
        "No findings reported: the study was received and not analysed: none of its 2 series "
        "qualifies"
    )
    assert said[start + 1 :] == REASONS  # each series' reason, a TEXT item each
    assert hd.sr.srread(written[0]).content.get_volumetric_roi_measurement_groups() == []
    # The evidence: the images of the axial series that came closest, every one of them.
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    [series] = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == short_study.SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence}
    expected = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in short_study.files
    }
    assert referenced == expected


def test_a_refusal_is_deterministic_and_not_an_analysis(
    short_study: SynthStudy, tmp_path: Path
) -> None:
    selection = refusal(short_study)
    first = write_results(selection, None, None, ALGORITHM, tmp_path / "a", uid_root=UID_ROOT)
    again = write_results(selection, None, None, ALGORITHM, tmp_path / "b", uid_root=UID_ROOT)
    assert first[0].read_bytes() == again[0].read_bytes()
    # The same images analysed (a site with a laxer rule): other UIDs, for other content.
    lax = select_series(
        read_headers(files_of(short_study)), rule=SelectionRule(min_z_coverage_mm=100)
    )
    assert lax is not None and not lax.refused
    [analysed] = write_results(
        lax, VolumeError("broken"), None, ALGORITHM, tmp_path / "c", uid_root=UID_ROOT
    )
    refused_sr, analysed_sr = pydicom.dcmread(first[0]), pydicom.dcmread(analysed)
    assert refused_sr.SOPInstanceUID != analysed_sr.SOPInstanceUID
    assert refused_sr.SeriesInstanceUID != analysed_sr.SeriesInstanceUID


def test_a_refusal_of_captures_only_references_them(
    short_study: SynthStudy, tmp_path: Path
) -> None:
    headers = []
    for path, ds in read_headers(short_study.files[:3]):
        ds = copy.deepcopy(ds)
        ds.SOPClassUID = SECONDARY_CAPTURE
        headers.append((path, ds))
    selection = select_series(headers)
    assert selection is not None and selection.refused
    [sr_path] = write_results(selection, None, None, ALGORITHM, tmp_path, uid_root=UID_ROOT)
    assert dciodvfy_errors(sr_path) == []
    [series] = (
        pydicom.dcmread(sr_path)
        .CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence
    )
    assert {i.ReferencedSOPClassUID for i in series.ReferencedSOPSequence} == {SECONDARY_CAPTURE}


def test_no_selection_writes_nothing(tmp_path: Path) -> None:
    assert write_results(None, None, None, ALGORITHM, tmp_path / "out", uid_root=UID_ROOT) == []
    assert not (tmp_path / "out").exists()


class Ports:
    """Stands in for Holoscan's input and output ports."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.emitted: dict[str, object] = {}

    def receive(self, name: str) -> object:
        return self.files

    def emit(self, value: object, name: str) -> None:
        self.emitted[name] = value


@pytest.mark.parametrize("report_refusals", [True, False])
def test_the_selector_passes_a_refusal_on_only_when_reported(
    short_study: SynthStudy, report_refusals: bool
) -> None:
    operator = SeriesSelectorOperator(
        Fragment(), report_refusals=report_refusals, name="select_series"
    )
    ports = Ports(files_of(short_study))
    operator.compute(ports, ports, SimpleNamespace())
    selection = ports.emitted["selection"]
    if report_refusals:
        assert isinstance(selection, SeriesSelection) and selection.reasons() == REASONS
    else:
        assert selection is None


def test_the_app_writes_the_refusal_and_fails_with_every_reason(
    short_study: SynthStudy, tmp_path: Path
) -> None:
    with pytest.raises(NoSeriesQualifies) as err:
        run_folder(short_study.directory, tmp_path / "out", parse_config({}))
    assert err.value.reasons == tuple(REASONS)
    assert err.value.written == (tmp_path / "out" / "sr.dcm",)
    assert dciodvfy_errors(tmp_path / "out" / "sr.dcm") == []
    assert "z coverage 120 mm < 150 mm" in str(err.value)


def test_report_refusals_false_writes_nothing(short_study: SynthStudy, tmp_path: Path) -> None:
    config = parse_config({"apps": {"lung_ct": {"report_refusals": False}}})
    with pytest.raises(NoSeriesQualifies) as err:
        run_folder(short_study.directory, tmp_path / "out", config)
    assert err.value.reasons == tuple(REASONS) and err.value.written == ()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_cli_lists_every_series_reason(short_study: SynthStudy, tmp_path: Path) -> None:
    cli = shutil.which("radfusion", path=str(Path(sys.executable).parent))
    assert cli is not None
    out = subprocess.run(
        [cli, "run", "lung-ct", "--input", str(short_study.directory), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 1
    assert out.stdout.split() == [str(tmp_path / "sr.dcm")]
    assert "no usable CT series" in out.stderr and "a refusal SR was written" in out.stderr
    for reason in REASONS:
        assert f"  {reason}" in out.stderr
    assert short_study.SeriesInstanceUID not in out.stderr
