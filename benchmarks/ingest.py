"""Ingest throughput: radfusion's DICOM node side by side with dcmtk storescp.

The same dcmtk ``storescu`` sends the same 300-slice 512×512 CT (synthetic) to (a) ``storescp
-B`` (bit-preserving, writes each instance to disk) and (b) a ``radfusion serve`` node with its
spool and catalog on, both with TCP_NODELAY=1, in alternating rounds. Prints images/s per round
and the median for each, and as its last line ``ingest ratio radfusion/storescp: X.XX``.

    .venv/bin/python benchmarks/ingest.py [--rounds 5] [--slices 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from radfusion.synth.ct_series import synth_ct


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("receiver did not start listening")


def _send(port: int, called: str, files: list[Path]) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    r = subprocess.run(
        ["storescu", "-R", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr[-1000:]}")
    return elapsed


def run_storescp(
    files: list[Path], work: Path, send: Callable[[int], float] | None = None
) -> float:
    """Seconds to send ``files`` to a fresh ``storescp -B``: with dcmtk storescu, or with
    ``send(port)`` (which returns its own seconds)."""
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = _free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen(
        ["storescp", "-B", "-od", str(out), "-aet", "STORESCP", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc)
        elapsed = send(port) if send is not None else _send(port, "STORESCP", files)
    finally:
        proc.terminate()
        proc.wait(10)
    stored = len(list(out.iterdir()))
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)}")
    return elapsed


def run_radfusion(files: list[Path], work: Path) -> float:
    spool = work / "radfusion"
    shutil.rmtree(spool, ignore_errors=True)
    port = _free_port()
    config = work / "radfusion.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"host": "127.0.0.1", "port": port, "allowed_callers": [{"ae_title": "*"}]},
                "spool": {"path": str(spool), "min_free_mb": 256},
                "completion": {"quiet_period_s": 60},
            }
        )
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "radfusion.cli",
            "serve",
            "--config",
            str(config),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc)
        elapsed = _send(port, "RADFUSION", files)
    finally:
        proc.terminate()
        proc.wait(20)
    stored = len(list((spool / "studies").glob("*/*/*.dcm")))
    if stored != len(files):
        raise RuntimeError(f"radfusion stored {stored} of {len(files)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        sys.exit("dcmtk (storescu, storescp) is required: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="radfusion-bench-") as tmp:
        work = Path(tmp)
        study = synth_ct(work / "ct", slices=args.slices, seed=3, tumours=2)
        files = list(study.files)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"study: {len(files)} images, {mb:.0f} MB; {args.rounds} alternating rounds")
        med = alternate(
            {"storescp": run_storescp, "radfusion": run_radfusion}, files, work, args.rounds
        )
        print(f"ingest ratio radfusion/storescp: {med['radfusion'] / med['storescp']:.2f}")


def alternate(
    runners: dict[str, Callable[[list[Path], Path], float]],
    files: list[Path],
    work: Path,
    rounds: int,
) -> dict[str, float]:
    """Run each runner once per round, alternating which goes first; print each round's and
    the median rate; return the median images/s by runner."""
    mb = sum(f.stat().st_size for f in files) / 1e6
    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            elapsed = runners[name](files, work)
            rates[name].append(len(files) / elapsed)
            print(
                f"round {i + 1} {name:<9} {len(files) / elapsed:7.1f} images/s "
                f"({mb / elapsed:6.1f} MB/s)"
            )
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name, rate in med.items():
        print(f"median {name:<9} {rate:7.1f} images/s ({rate * mb / len(files):6.1f} MB/s)")
    return med


if __name__ == "__main__":
    main()
