"""``radfusion demo``: the whole path on one machine, with nothing to configure.

A synthetic chest CT is generated, sent over C-STORE (pynetdicom plays the scanner) to a
radfusion node started in this process, completed after the quiet period, routed to the
``lung-ct`` app, and its DICOM SEG and SR land in a folder destination. The demo then compares
the SEG with the phantom's ground truth and saves a PNG preview.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pynetdicom import AE
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from radfusion.config import parse_config
from radfusion.logs import uid_tag
from radfusion.service import Service

if TYPE_CHECKING:  # imported where used, as the demo runs
    from radfusion.synth.ct_series import SynthStudy

__all__ = ["run_demo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _send(files: list[Path], port: int, acked: list[int], errors: list[str]) -> None:
    ae = AE(ae_title="DEMO_CT")
    contexts: dict[str, str] = {}
    for f in files[:1]:
        head = pydicom.dcmread(f, stop_before_pixels=True)
        contexts[str(head.SOPClassUID)] = str(head.file_meta.TransferSyntaxUID)
    for sop_class, ts in contexts.items():
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFUSION")
    if not assoc.is_established:
        errors.append("association failed")
        return
    try:
        for f in files:
            status = assoc.send_c_store(f)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                errors.append(f"{f.name}: status {code}")
                return
            acked.append(1)
    finally:
        assoc.release()


def run_demo(workdir: Path | None, *, slices: int = 120, console: Console | None = None) -> int:
    """Run the demo; returns a process exit code (0 when the study was received and routed)."""
    from radfusion.synth.ct_series import synth_ct

    console = console or Console()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="radfusion-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "radfusion.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    port = _free_port()
    config = parse_config(
        {
            "node": {
                "host": "127.0.0.1",
                "port": port,
                "allowed_callers": [{"ae_title": "DEMO_CT", "addresses": ["127.0.0.1"]}],
            },
            "spool": {"path": str(workdir / "spool"), "min_free_mb": 64},
            "completion": {"quiet_period_s": 2},
            "routing": {
                "rules": [
                    {
                        "name": "chest-ct",
                        "when": {
                            "all": [
                                {"Modality": "CT"},
                                {"BodyPartExamined": ["CHEST", "LUNG"]},
                                {"slices": {"min": 10}},
                            ]
                        },
                        "apps": ["lung-ct"],
                    }
                ]
            },
            "export": {
                "destinations": [
                    {"name": "results", "type": "folder", "path": str(workdir / "results")}
                ]
            },
        }
    )
    console.rule("[bold]radfusion demo")
    console.print(f"work folder: {workdir}   (log: {log_file.name})")

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console) as progress:
        t = progress.add_task("generate synthetic chest CT", total=1, note="")
        study = synth_ct(workdir / "scanner", slices=slices, seed=1, patient_id="DEMO-0001")
        progress.update(t, completed=1, note=f"{len(study.files)} images 512×512")

        service = Service(config)
        service.start()
        files = list(study.files)
        acked: list[int] = []
        errors: list[str] = []
        sender = threading.Thread(target=_send, args=(files, port, acked, errors))
        started = time.monotonic()
        sender.start()
        send_task = progress.add_task("C-STORE DEMO_CT → RADFUSION", total=len(files), note="")
        recv_task = progress.add_task("received (spool + catalog)", total=len(files), note="")
        uid = study.StudyInstanceUID
        while sender.is_alive():
            row = service.catalog.study(uid)
            progress.update(send_task, completed=len(acked))
            progress.update(recv_task, completed=row.instances if row else 0)
            time.sleep(0.1)
        sender.join()
        elapsed = time.monotonic() - started
        row = service.catalog.study(uid)
        progress.update(
            send_task, completed=len(acked), note=f"{len(acked) / elapsed:.0f} images/s"
        )
        progress.update(recv_task, completed=row.instances if row else 0)
        wait_task = progress.add_task("quiet period → complete → route", total=1, note="")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = service.catalog.study(uid)
            if row is not None and row.state.value in ("done", "failed", "unrouted"):
                break
            time.sleep(0.1)
        progress.update(wait_task, completed=1, note=row.state.value if row else "?")
        service.stop()

    if errors:
        console.print(f"[red]sending failed: {errors[0]}")
        return 1
    table = Table(title="radfusion status")
    for col in ("study", "state", "from", "series", "instances", "apps"):
        table.add_column(col)
    assert row is not None
    table.add_row(
        uid_tag(uid),
        row.state.value,
        row.calling_ae,
        str(row.series),
        str(row.instances),
        ", ".join(row.apps) or "-",
    )
    console.print(table)
    console.print("study events: " + " → ".join(e for e, _ in service.catalog.events_of(uid)))
    results = sorted((workdir / "results").rglob("*.dcm"))
    console.print(f"results: {len(results)} file(s) in {workdir / 'results'}")
    ok = row.state.value == "done" and row.instances == len(files)
    if ok:
        ok = _show_results(results, study, workdir, console)
    console.print("[green]demo complete" if ok else "[red]demo failed: see the log")
    return 0 if ok else 1


def _show_results(results: list[Path], study: SynthStudy, workdir: Path, console: Console) -> bool:
    from radfusion.evaluation import compare_with_truth, seg_label_volume
    from radfusion.operators.volume import assemble_volume
    from radfusion.preview import render_preview

    by_modality = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality): p for p in results}
    if "SEG" not in by_modality or "SR" not in by_modality:
        console.print(f"[red]expected a SEG and an SR, got {sorted(by_modality)}")
        return False
    files = list(study.files)
    labels, names = seg_label_volume(by_modality["SEG"], files)
    table = Table(title="findings vs ground truth (synthetic phantom)")
    for col in ("structure", "segment", "truth mL", "found mL", "volume error", "Dice"):
        table.add_column(col, justify="right" if col != "structure" else "left")
    for c in compare_with_truth(labels, names, study.directory):
        error = (c.found_ml - c.truth_ml) / c.truth_ml * 100 if c.truth_ml else 0.0
        table.add_row(
            c.structure,
            c.segment,
            f"{c.truth_ml:.1f}",
            f"{c.found_ml:.1f}",
            f"{error:+.1f} %",
            f"{c.dice:.3f}",
        )
    console.print(table)
    volume = assemble_volume([pydicom.dcmread(f) for f in files])
    png = render_preview(volume.hu, labels, names, workdir / "preview.png")
    console.print(f"SEG: {by_modality['SEG']}\nSR:  {by_modality['SR']}")
    console.print(f"preview: {png}")
    return True
