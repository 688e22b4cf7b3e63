"""Export throughput: radfusion's DICOM export side by side with dcmtk storescu.

The same 300-slice 512×512 CT (synthetic) goes to the same kind of receiver, a ``storescp -B``
(bit-preserving, writes each instance to disk), from (a) dcmtk ``storescu`` and (b) radfusion's
``deliver`` (one association, as the exporter uses it), in alternating rounds. Prints images/s
per round and the median for each, and as its last line ``export ratio radfusion/storescu: X.XX``.

    .venv/bin/python -m benchmarks.export [--rounds 5] [--slices 300]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.ingest import alternate, run_storescp
from radfusion.config import DicomDestination
from radfusion.integrations.dicom.export import deliver
from radfusion.synth.ct_series import synth_ct


def run_storescu(files: list[Path], work: Path) -> float:
    return run_storescp(files, work)


def run_radfusion(files: list[Path], work: Path) -> float:
    def send(port: int) -> float:
        dest = DicomDestination(name="bench", ae_title="STORESCP", host="127.0.0.1", port=port)
        start = time.perf_counter()
        deliver(dest, files, "RADFUSION")
        return time.perf_counter() - start

    return run_storescp(files, work, send)


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


if __name__ == "__main__":
    main()
