"""Export throughput: radfusion's DICOM export side by side with dcmtk storescu.

The same 300-slice 512×512 CT (synthetic) goes to the same kind of receiver, a ``storescp -B``
(bit-preserving, writes each instance to disk), from (a) dcmtk ``storescu`` and (b) radfusion's
``deliver`` (one association, as the exporter uses it), in alternating rounds. Prints images/s
per round and the median for each, and as its last line ``export ratio radfusion/storescu: X.XX``.

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
from pathlib import Path

from benchmarks.ingest import _free_port, _send, _wait_listening
from radfusion.config import DicomDestination
from radfusion.integrations.dicom.export import deliver
from radfusion.synth.ct import synth_ct


def _receive(work: Path, files: list[Path], send: object) -> float:
    out = work / "received"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = _free_port()
    proc = subprocess.Popen(
        ["storescp", "-B", "-od", str(out), "-aet", "STORESCP", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},  # else ~40 ms per response (Nagle)
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc)
        elapsed = send(port)  # type: ignore[operator]
    finally:
        proc.terminate()
        proc.wait(10)
    stored = len(list(out.iterdir()))
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)}")
    return float(elapsed)


def run_storescu(files: list[Path], work: Path) -> float:
    return _receive(work, files, lambda port: _send(port, "STORESCP", files))


def run_radfusion(files: list[Path], work: Path) -> float:
    def send(port: int) -> float:
        dest = DicomDestination(name="bench", ae_title="STORESCP", host="127.0.0.1", port=port)
        start = time.perf_counter()
        deliver(dest, files, "RADFUSION")
        return time.perf_counter() - start

    return _receive(work, files, send)


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
        rates: dict[str, list[float]] = {"storescu": [], "radfusion": []}
        runners = {"storescu": run_storescu, "radfusion": run_radfusion}
        for i in range(args.rounds):
            order = ["storescu", "radfusion"] if i % 2 == 0 else ["radfusion", "storescu"]
            for name in order:
                elapsed = runners[name](files, work)
                rates[name].append(len(files) / elapsed)
                print(f"round {i + 1} {name:<9} {len(files) / elapsed:7.1f} images/s")
        med = {k: statistics.median(v) for k, v in rates.items()}
        for name, rate in med.items():
            print(f"median {name:<9} {rate:7.1f} images/s ({rate * mb / len(files):6.1f} MB/s)")
        print(f"export ratio radfusion/storescu: {med['radfusion'] / med['storescu']:.2f}")


if __name__ == "__main__":
    main()
