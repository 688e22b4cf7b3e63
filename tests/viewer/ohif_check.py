"""Look at radfusion's SEG and SR in the OHIF viewer, as a radiologist would (not run by CI).

Stores a CT series and the lung-ct app's ``seg.dcm``, ``sr.dcm`` and, when there is one, the
fusion summary image ``fusion_summary.dcm`` in a scratch Orthanc (with
its DICOMweb plugin), serves OHIF's built viewer (npm ``@ohif/app``) with a same-origin proxy to
Orthanc, and drives headless Chromium with Playwright: the study browser, the SEG overlay and
its segment names, the SR's measurements. Screenshots and ``report.json`` go to ``--out``.

    .venv/bin/python tests/viewer/ohif_check.py --ct DIR [--results DIR] [--out /tmp/ohif]

Without ``--results`` the lung-ct app is run on ``--ct`` first. Needs Debian ``orthanc``,
``orthanc-dicomweb``, ``chromium``, ``nodejs`` and ``npm``; ``@ohif/app`` and ``playwright-core``
are fetched with npm into ``--work`` unless already there. About a minute once they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom

HERE = Path(__file__).resolve().parent
OHIF_VERSION = "3.13.2"
PLAYWRIGHT_VERSION = "1.65.1"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    """A TCP port on the loopback interface that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, timeout: float) -> None:
    """Return once ``url`` answers; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def npm_packages(work: Path) -> tuple[Path, Path]:
    """OHIF's ``dist/`` and a folder whose node_modules holds playwright-core (npm fetches them
    into ``work`` the first time)."""
    dist = work / "package" / "dist"
    if not dist.is_dir():
        subprocess.run(["npm", "pack", f"@ohif/app@{OHIF_VERSION}"], cwd=work, check=True)
        subprocess.run(["tar", "xzf", f"ohif-app-{OHIF_VERSION}.tgz"], cwd=work, check=True)
    if not (work / "node_modules" / "playwright-core").is_dir():
        subprocess.run(
            ["npm", "install", "--no-save", "--no-audit", "--no-fund",
             f"playwright-core@{PLAYWRIGHT_VERSION}"],
            cwd=work, check=True,
        )  # fmt: skip
    return dist, work


def run_lung_ct(ct: Path, results: Path) -> None:
    """The lung-ct app once over ``ct`` (writes ``seg.dcm`` and ``sr.dcm`` into ``results``)."""
    exe = Path(sys.executable).with_name("radfusion")
    command = [str(exe), "run", "lung-ct", "--input", str(ct), "--output", str(results)]
    subprocess.run(command, check=True)


@contextmanager
def orthanc(storage: Path) -> Iterator[str]:
    """A scratch Orthanc with DICOMweb on loopback; yields its HTTP root."""
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "RADFUSION-OHIF-CHECK",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = storage / "orthanc.json"
    path.write_text(json.dumps(config))
    log = (storage / "orthanc.log").open("w")
    process = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        root = f"http://127.0.0.1:{http_port}"
        wait_for_http(f"{root}/system", 30)
        yield root
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@contextmanager
def viewer(dist: Path, dicomweb_root: str, log_path: Path) -> Iterator[str]:
    """OHIF served on loopback with ``/dicom-web`` proxied to ``dicomweb_root``; yields its URL."""
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["node", str(HERE / "ohif_serve.mjs"), str(dist), str(port), dicomweb_root],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/app-config.js", 30)
            yield url
        finally:
            process.terminate()
            process.wait(10)


def store(root: str, files: list[Path]) -> None:
    """POST each file to Orthanc's REST API; raise on any failure."""
    for path in files:
        request = urllib.request.Request(f"{root}/instances", data=path.read_bytes())
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 200:
                raise RuntimeError(f"Orthanc refused {path.name}: HTTP {response.status}")


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (others, such as truth.json, are skipped)."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and pydicom.misc.is_dicom(p)]


def sr_line_images(sr: Path, ct_files: list[Path]) -> list[str]:
    """For each SCOORD in ``sr`` (the findings' diameter lines, in order), the CT
    image it is selected from as OHIF's overlay names it ("I:<Instance Number>"), with the
    frame for a multi-frame image."""
    numbers = {}
    for path in ct_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        numbers[str(ds.SOPInstanceUID)] = ds.get("InstanceNumber")

    def walk(items: Any) -> Iterator[Any]:
        for item in items or []:
            yield item
            yield from walk(item.get("ContentSequence"))

    out = []
    for item in walk(pydicom.dcmread(sr).get("ContentSequence")):
        if item.get("ValueType") == "SCOORD":
            sop = item.ContentSequence[0].ReferencedSOPSequence[0]
            label = f"I:{numbers.get(str(sop.ReferencedSOPInstanceUID), '?')}"
            frame = sop.get("ReferencedFrameNumber")
            out.append(f"{label} frame {frame}" if frame else label)
    return out


def sr_findings(sr: Path) -> list[tuple[str, float]]:
    """Each finding's label (its TID 1501 Comment, as OHIF should list it) and long axis (mm,
    the group's NUM), in SR order."""
    found = []
    for item in pydicom.dcmread(sr).ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for group in item.ContentSequence:
            label = next(
                (str(c.TextValue) for c in group.ContentSequence if c.ValueType == "TEXT"
                 and c.ConceptNameCodeSequence[0].CodeValue == "121106"),
                None,
            )  # fmt: skip
            if label is not None:
                (num,) = (c for c in group.ContentSequence if c.ValueType == "NUM")
                found.append((label, float(num.MeasuredValueSequence[0].NumericValue)))
    return found


def missing_from_panel(report: dict[str, Any]) -> list[str]:
    """The SR's finding labels OHIF's Measurements panel does not list (all of them when it
    did not offer to track the SR's measurements)."""
    shown = {line.strip() for line in report.get("measurementsPanel", [])}
    return [label for label in report.get("srLabels", []) if label not in shown]


def summarise(report: dict[str, Any]) -> str:
    """A few lines for the terminal: what OHIF listed, loaded and drew."""
    lines = [f"series listed: {report['series']}", f"segments: {report['segments']}"]
    lines += [f"SR measurement parsed: {m}" for m in report["srMeasurements"]]
    lines += [f"step {s['name']}: {s['slice']} -> {s['file']}" for s in report["steps"]]
    if "srLineImages" in report:
        images = ", ".join(report["srLineImages"]) or "none (no 2D SCOORD)"
        lines.append(f"SR lines are on: {images}")
        shown = [s["slice"] for s in report["steps"] if s["name"].startswith("04-sr-")]
        landed = [str(s or "").split(" ")[0] for s in shown]
        lines.append(f"SR steps landed on: {', '.join(landed)}")
    lines += [f"SR annotation not drawn: {u}" for u in report.get("undrawn", [])]
    if "srLabels" in report:
        lines.append(f"tracking the SR's measurements offered: {report['trackingOffered']}")
        missing = missing_from_panel(report)
        listed = len(report["srLabels"]) - len(missing)
        lines.append(f"Measurements panel lists {listed} of {len(report['srLabels'])} findings")
        lines += [f"not in the Measurements panel: {label}" for label in missing]
    lines += [f"console error: {e}" for e in report["errors"]]
    lines += report.get("failedRequests", [])
    return "\n".join(lines)


def check(ct: Path, results: Path | None, out: Path, work: Path) -> dict[str, Any]:
    """Store ``ct`` and the lung-ct results (run first when ``results`` is None) in a scratch
    Orthanc, look at them in OHIF, and return the report (also written to
    ``out/report.json``, with the screenshots)."""
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    dist, node_dir = npm_packages(work)
    if results is None:
        results = out / "results"
        run_lung_ct(ct, results)
    names = ("seg.dcm", "sr.dcm", "fusion_summary.dcm")
    outputs = [results / name for name in names if (results / name).exists()]
    files = dicom_files(ct) + outputs
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with tempfile.TemporaryDirectory() as storage, orthanc(Path(storage)) as root:
        store(root, files)
        with viewer(dist, f"{root}/dicom-web", out / "serve.log") as url:
            subprocess.run(
                ["node", str(HERE / "ohif_shoot.mjs"), url, study, str(out)],
                cwd=node_dir, check=True, timeout=300,
            )  # fmt: skip
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    served = (out / "serve.log").read_text(errors="replace").splitlines()
    report["failedRequests"] = [ln for ln in served if ln.startswith("failed request:")]
    if (results / "sr.dcm").exists():
        report["srLineImages"] = sr_line_images(results / "sr.dcm", dicom_files(ct))
        report["srLabels"] = [label for label, _ in sr_findings(results / "sr.dcm")]
        (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """What makes the check fail: an SR annotation not drawn, a finding not in the
    Measurements panel, a request of the viewer that failed, the script itself failing."""
    return [
        *(f"not drawn: {u}" for u in report.get("undrawn", [])),
        *report.get("failedRequests", []),
        *(e for e in report["errors"] if e.startswith("Failed to load resource")),
        *(f"not in the Measurements panel: {m}" for m in missing_from_panel(report)),
        *(e for e in report["errors"] if e.startswith(("script:", "viewer:"))),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, required=True, help="folder of the CT series")
    parser.add_argument("--results", type=Path, help="folder with seg.dcm and sr.dcm")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ohif"), help="screenshots")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ohif-work"), help="npm cache")
    args = parser.parse_args()
    for tool in ("Orthanc", "node", "npm", "chromium"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    report = check(args.ct, args.results, args.out, args.work)
    print(summarise(report))
    return 1 if problems(report) else 0


if __name__ == "__main__":
    sys.exit(main())
