"""Export: radfusion's DICOM export side by side with dcmtk storescu, and C-STORE vs STOW-RS.

1. Throughput: the same 300-slice 512×512 CT (synthetic) goes to the same kind of receiver, a
   ``storescp -B`` (bit-preserving, writes each instance to disk), from (a) dcmtk ``storescu``
   and (b) radfusion's ``deliver`` (one association, as the exporter uses it), in alternating
   rounds; prints images/s per round, the medians and ``export ratio radfusion/storescu: X.XX``.
2. Results into a PACS: the SEG and SR the lung-ct app writes for that CT go into a real
   Orthanc (emptied before each round) by dcmtk ``storescu`` (the peer), radfusion's C-STORE
   and radfusion's STOW-RS (DICOMweb plugin), in rotating order; the last line is
   ``export seconds c-store/stow: X.X/Y.Y`` (medians; storescu's median is printed above it).
3. Finding and fetching a prior: with the CT in that Orthanc, the seconds to find the patient's
   study (C-FIND, study level), list its CT series (C-FIND, series level) and retrieve them
   by C-GET and by C-MOVE, by radfusion (``integrations/dicom/query.py`` and ``moves.py``,
   what the lung-ct app's priors use) and by dcmtk ``findscu`` + ``getscu`` / ``movescu``, in
   alternating rounds; printed as ``prior fetch seconds radfusion/dcmtk: X.X/Y.Y (ratio
   R.RR)`` (C-GET) and ``prior fetch by C-MOVE seconds radfusion/dcmtk: ...`` before the last
   line.

    .venv/bin/python -m benchmarks.export [--rounds 5] [--slices 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.ingest import alternate, run_storescp
from radfusion.config import DicomDestination, DicomWebDestination, NodeConfig
from radfusion.integrations.dicom.export import deliver
from radfusion.integrations.dicom.moves import retrieve_series_by_move
from radfusion.integrations.dicom.query import find_ct_series, find_studies, retrieve_series
from radfusion.synth.ct_series import synth_ct
from tests.conftest import Orthanc, free_port


def run_storescu(files: list[Path], work: Path) -> float:
    return run_storescp(files, work)


def run_radfusion(files: list[Path], work: Path) -> float:
    def send(port: int) -> float:
        dest = DicomDestination(name="bench", ae_title="STORESCP", host="127.0.0.1", port=port)
        start = time.perf_counter()
        deliver(dest, files, "RADFUSION")
        return time.perf_counter() - start

    return run_storescp(files, work, send)


def empty(server: Orthanc) -> None:
    for study in server.get("/studies"):
        server.delete(f"/studies/{study}")


def lung_ct_results(ct: Path, out: Path) -> list[Path]:
    """The SEG and SR of the lung-ct app on ``ct`` (in process, the embedded defaults)."""
    subprocess.run(
        [sys.executable, "-m", "radfusion.cli", "run", "lung-ct", "--input", str(ct),
         "--output", str(out)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return sorted(out.glob("*.dcm"))


def results_round(files: list[Path], server: Orthanc, rounds: int) -> dict[str, float]:
    """Seconds to store ``files`` in ``server`` per sender (median of ``rounds``)."""
    store = DicomDestination(
        name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=server.dicom_port
    )
    web = DicomWebDestination(name="pacs-web", url=f"{server.url}/dicom-web")
    env = {**os.environ, "TCP_NODELAY": "1"}
    storescu = ["storescu", "-R", "-aec", "ORTHANC", "127.0.0.1", str(server.dicom_port)]
    senders: dict[str, Callable[[], object]] = {
        "storescu": lambda: subprocess.run(
            [*storescu, *map(str, files)], check=True, env=env, capture_output=True
        ),
        "c-store": lambda: deliver(store, files, "RADFUSION"),
        "stow": lambda: deliver(web, files, "RADFUSION"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in senders}
    names = list(senders)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            empty(server)
            start = time.perf_counter()
            senders[name]()
            elapsed = time.perf_counter() - start
            held = len(server.get("/instances"))
            if held != len(files):
                raise RuntimeError(f"{name}: Orthanc holds {held} of {len(files)}")
            seconds[name].append(elapsed)
            print(f"round {i + 1} {name:<9} {elapsed:6.2f} s")
    med = {k: statistics.median(v) for k, v in seconds.items()}
    for name, value in med.items():
        print(f"median {name:<9} {value:6.2f} s")
    return med


def prior_round(files: list[Path], server: Orthanc, work: Path, rounds: int) -> dict[str, float]:
    """Seconds to find and fetch the CT of ``files`` from ``server`` (medians of ``rounds``)."""
    empty(server)
    env = {**os.environ, "TCP_NODELAY": "1"}
    port = str(server.dicom_port)
    subprocess.run(
        ["storescu", "-aec", "ORTHANC", "127.0.0.1", port, *map(str, files)],
        check=True,
        env=env,
        capture_output=True,
    )
    # Orthanc answers AE titles it knows, and C-MOVEs to the address it knows for them.
    node = NodeConfig(host="127.0.0.1", port=free_port())
    movescu_port = free_port()
    for aet, listen in (("RADFUSION", node.port), ("MOVESCU", movescu_port)):
        server.put(f"/modalities/{aet.lower()}", {"AET": aet, "Host": "127.0.0.1", "Port": listen})
    for aet in ("GETSCU", "FINDSCU"):
        server.put(f"/modalities/{aet.lower()}", {"AET": aet, "Host": "127.0.0.1", "Port": 1})
    pacs = DicomDestination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=int(port))
    patient = "RF-0001"

    def radfusion(target: Path, move: bool = False) -> None:
        [study] = find_studies(pacs, "RADFUSION", patient)
        found = find_ct_series(pacs, "RADFUSION", study.StudyInstanceUID)
        series = [s.SeriesInstanceUID for s in found]
        if move:
            retrieve_series_by_move(pacs, node, study.StudyInstanceUID, series, target)
        else:
            retrieve_series(pacs, "RADFUSION", study.StudyInstanceUID, series, target)

    def dcmtk(target: Path, move: bool = False) -> None:
        target.mkdir(parents=True)
        find = ["findscu", "-S", "-aec", "ORTHANC", "127.0.0.1", port, "-k"]
        studies = subprocess.run(
            [*find, "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient}",
             "-k", "StudyInstanceUID"],
            check=True, env=env, capture_output=True, text=True,
        )  # fmt: skip
        study = _uid_in(studies.stderr + studies.stdout, "0020,000d")
        series = subprocess.run(
            [*find, "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
             "-k", "Modality=CT", "-k", "SeriesInstanceUID"],
            check=True, env=env, capture_output=True, text=True,
        )  # fmt: skip
        uid = _uid_in(series.stderr + series.stdout, "0020,000e")
        keys = ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
                "-k", f"SeriesInstanceUID={uid}"]  # fmt: skip
        retrieve = ["getscu", "-S", "-aec", "ORTHANC"]
        if move:
            retrieve = ["movescu", "-S", "-aet", "MOVESCU", "-aem", "MOVESCU", "-aec", "ORTHANC",
                        "--port", str(movescu_port)]  # fmt: skip
        subprocess.run(
            [*retrieve, "-od", str(target), "127.0.0.1", port, *keys],
            check=True, env=env, capture_output=True,
        )  # fmt: skip

    fetchers: dict[str, Callable[[Path], None]] = {
        "radfusion": radfusion,
        "dcmtk": dcmtk,
        "radfusion-move": lambda target: radfusion(target, move=True),
        "dcmtk-move": lambda target: dcmtk(target, move=True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in fetchers}
    order = list(fetchers)
    for i in range(rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            target = work / f"prior-{name}-{i}"
            start = time.perf_counter()
            fetchers[name](target)
            elapsed = time.perf_counter() - start
            got = len(list(target.glob("*")))
            if got != len(files):
                raise RuntimeError(f"{name}: fetched {got} of {len(files)} images")
            shutil.rmtree(target)
            seconds[name].append(elapsed)
            print(f"round {i + 1} prior {name:<14} {elapsed:6.2f} s")
    return {k: statistics.median(v) for k, v in seconds.items()}


def _uid_in(output: str, tag: str) -> str:
    """The first UID value of ``tag`` (e.g. "0020,000d") in findscu's response dump."""
    for line in output.splitlines():
        if f"({tag})" in line and "[" in line:
            return line.split("[", 1)[1].split("]", 1)[0].strip()
    raise RuntimeError(f"findscu returned no ({tag})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        sys.exit("dcmtk (storescu, storescp) is required: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="radfusion-bench-") as tmp:
        work = Path(tmp)
        files = list(synth_ct(work / "ct", slices=args.slices, seed=3, tumours=2).files)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"study: {len(files)} images, {mb:.0f} MB; {args.rounds} alternating rounds")
        med = alternate(
            {"storescu": run_storescu, "radfusion": run_radfusion}, files, work, args.rounds
        )
        print(f"export ratio radfusion/storescu: {med['radfusion'] / med['storescu']:.2f}")
        if shutil.which("Orthanc") is None:
            sys.exit("Orthanc (with orthanc-dicomweb) is required for the results round")
        results = lung_ct_results(work / "ct", work / "results")
        mb = sum(f.stat().st_size for f in results) / 1e6
        names = ", ".join(f.name for f in results)
        print(f"results: {names}, {mb:.1f} MB; {args.rounds} rounds into Orthanc")
        (work / "orthanc").mkdir()
        server = Orthanc(work / "orthanc", free_port(), free_port()).start()
        try:
            seconds = results_round(results, server, args.rounds)
            prior = prior_round(files, server, work, args.rounds)
        finally:
            server.stop()
        print(
            f"prior fetch seconds radfusion/dcmtk: {prior['radfusion']:.1f}/{prior['dcmtk']:.1f}"
            f" (ratio {prior['radfusion'] / prior['dcmtk']:.2f})"
        )
        moved, movescu = prior["radfusion-move"], prior["dcmtk-move"]
        print(
            f"prior fetch by C-MOVE seconds radfusion/dcmtk: {moved:.1f}/{movescu:.1f}"
            f" (ratio {moved / movescu:.2f})"
        )
        print(f"export seconds c-store/stow: {seconds['c-store']:.1f}/{seconds['stow']:.1f}")


if __name__ == "__main__":
    main()
