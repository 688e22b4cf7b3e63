"""OHIF 3.13 shows radfusion's results as a radiologist gets them: a CT and the lung-ct app's
SEG and SR in a real Orthanc (DICOMweb), the real ``@ohif/app`` build, headless Chromium driven
by Playwright (``ohif_check.py``). Asserted: the study's series listed, the SEG's segments by
name, OHIF offering to track the SR's measurements, and every finding in its Measurements panel
with the SR's label and long axis. Screenshots go to ``.viewer/out`` (npm packages are cached
in ``.viewer``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import REPO, require_tool
from tests.viewer.ohif_check import check, problems, run_lung_ct, sr_findings

pytestmark = pytest.mark.integration

WORK = REPO / ".viewer"


@pytest.fixture(scope="module")
def looked_at(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    from radfusion.synth.ct_series import synth_ct

    for tool in ("Orthanc", "node", "npm", "chromium"):
        require_tool(tool)
    root = tmp_path_factory.mktemp("ohif")
    synth_ct(root / "ct", slices=60, rows=128, columns=128, seed=3)
    run_lung_ct(root / "ct", root / "results")
    report = check(root / "ct", root / "results", WORK / "out", WORK)
    return report, root / "results"


def test_the_study_and_the_seg_segments_are_shown(looked_at: tuple[dict[str, Any], Path]) -> None:
    report, results = looked_at
    assert {"CT", "SEG", "SR"} <= set(report["series"]), report["series"]
    # The fusion summary image (a Secondary Capture, "OT"), for viewers that cannot open the
    # fusion SR; its thumbnail loads like the others (no failed request: the next test).
    assert (results / "fusion_summary.dcm").exists()
    assert "OT" in report["series"], report["series"]
    seg = pydicom.dcmread(results / "seg.dcm", stop_before_pixels=True)
    assert report["segments"] == [str(s.SegmentLabel) for s in seg.SegmentSequence]


def test_every_finding_is_in_the_measurements_panel_with_its_long_axis(
    looked_at: tuple[dict[str, Any], Path],
) -> None:
    report, results = looked_at
    assert report["trackingOffered"], "OHIF did not offer to track the SR (not rehydratable)"
    assert problems(report) == []
    findings = sr_findings(results / "sr.dcm")
    lines = [line.strip() for line in report["measurementsPanel"] if line.strip()]
    assert f"Measurements ({len(findings)})" in lines
    for label, long_axis in findings:
        at = lines.index(label)
        size = re.fullmatch(r"([\d.]+) mm", lines[at + 1])
        assert size, (label, lines[at : at + 3])
        assert float(size.group(1)) == pytest.approx(long_axis, rel=0.005, abs=0.01), label
