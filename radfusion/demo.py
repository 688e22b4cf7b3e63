"""``radfusion demo``: the whole path on one machine, with nothing to configure.

A synthetic chest CT is generated, sent over C-STORE (pynetdicom plays the scanner) to a
radfusion node started in this process, completed after the quiet period, routed to the
``lung-ct`` app, and its DICOM SEG and SRs land in a folder destination. The demo then compares
the SEG with the phantom's ground truth and saves a PNG preview.

The network run has no FHIR server, so its fusion SR says that clinical and genomic data were
missing. The demo then runs the app again with a synthetic patient record (made up in this
file, not fetched) and shows the fused result with and without the record's genomics: the
progression risk with its interval, the EGFR estimate and the top contributions.
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
    from radfusion.patient_context import PatientContext
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
    from radfusion.operators.fusion_sr import SERIES_NUMBER as FUSION_SERIES
    from radfusion.operators.volume import assemble_volume
    from radfusion.preview import render_preview

    by_modality: dict[str, Path] = {}
    for p in results:
        head = pydicom.dcmread(p, stop_before_pixels=True)
        fusion = head.Modality == "SR" and head.get("SeriesNumber") == FUSION_SERIES
        by_modality["FUSION" if fusion else str(head.Modality)] = p
    if not {"SEG", "SR", "FUSION"} <= set(by_modality):
        console.print(f"[red]expected a SEG and two SRs, got {sorted(by_modality)}")
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
    notes = _show_fusion(files, workdir, console)
    volume = assemble_volume([pydicom.dcmread(f) for f in files])
    png = render_preview(volume.hu, labels, names, workdir / "preview.png", notes=notes)
    console.print(
        f"SEG: {by_modality['SEG']}\nSR:  {by_modality['SR']}\nfusion SR: {by_modality['FUSION']}"
    )
    console.print(f"preview: {png}")
    return bool(notes)


def demo_context(*, genomics: bool) -> PatientContext:
    """A made-up patient record (no FHIR server in the demo): stage IIIA adenocarcinoma, a
    former smoker; with ``genomics``, an NGS panel with KRAS and TP53 mutated and TMB 12."""
    import datetime as dt

    from radfusion.patient_context import Coded, Fact, GeneResult, PatientContext, Source

    record = (Source("Observation/demo-record", "1"),)
    panel = (Source("Observation/demo-ngs-panel", "1"),)
    calls = {"EGFR": "absent", "KRAS": "present", "ALK": "absent", "TP53": "present"}
    calls |= {"STK11": "absent"}
    return PatientContext(
        patient=Source("Patient/demo", "1"),
        study_date=dt.date(2026, 1, 1),
        age_years=Fact(64, record),
        sex=Fact("male", record),
        genes={g: GeneResult(g, c, sources=panel) for g, c in calls.items()} if genomics else {},
        tmb=Fact(12.0, panel) if genomics else Fact.unknown("no genomic report"),
        msi=Fact.unknown("not reported"),
        cancer=Fact.unknown("not used by the demo"),
        stage_group=Fact(Coded("http://cancerstaging.org", "3A", "IIIA"), record),
        ecog=Fact(1, record),
        karnofsky=Fact.unknown("not reported"),
        smoking=Fact(Coded("http://snomed.info/sct", "8517006", "Ex-smoker"), record),
        tumour_markers={"CEA": Fact(6.2, record)},
    )


def _show_fusion(files: list[Path], workdir: Path, console: Console) -> list[str]:
    """Run the app with the synthetic record, fuse with and without its genomics, print a
    table; returns the preview's lines (empty when the fusion did not run)."""
    import json

    from radfusion.apps.lung_ct.app import LungCTRunner
    from radfusion.operators.fusion import FusionResult, predict
    from radfusion.patient_context import ContextOutcome

    full = ContextOutcome("available", demo_context(genomics=True))
    without = ContextOutcome("available", demo_context(genomics=False))
    out = workdir / "fusion-with-record"
    with LungCTRunner(parse_config({}), lookup=lambda header: full) as runner:
        runner.process(files, out)
        loaded = runner.fusion
    radiomics = json.loads((out / "radiomics.json").read_text())
    tumours = [t["values"] for t in radiomics["tumours"] if not t.get("error")]
    if loaded is None:
        console.print("[red]fusion is off")
        return []
    results: dict[str, FusionResult | None] = {
        "with genomics": predict(loaded.model, loaded.config, tumours, None, full),
        "without genomics": predict(loaded.model, loaded.config, tumours, None, without),
    }
    table = Table(title="fusion: this study's tumours + a made-up patient record")
    for col in ("record", "progression ≤ 12 months", "risk", "EGFR mutation", "inputs"):
        table.add_column(col)
    notes = [f"fusion ({loaded.config.name} {loaded.config.version}, made-up record):"]
    tops = []
    for name, r in results.items():
        if r is None:
            continue
        egfr = (
            f"tested: {r.egfr.status}"
            if r.egfr.tested
            else f"{r.egfr.probability:.2f} ± {r.egfr.sd:.2f}"
        )
        top = ", ".join(f"{c.label} {c.log_odds:+.2f}" for c in r.top_features[:3])
        risk = f"{r.progression_probability:.2f} ± {r.progression_sd:.2f}"
        table.add_row(name, risk, r.risk_group, egfr, " + ".join(r.used))
        tops.append(f"  {name}: {top}")
        notes.append(f"  {name}: progression {risk} ({r.risk_group}); EGFR {egfr}; top: {top}")
    console.print(table)
    console.print("top contributions to the log-odds of progression:")
    for line in tops:
        console.print(line)
    console.print(f"fusion SR with the record: {out / 'fusion_sr.dcm'}")
    console.print(f"the same as an image for any viewer: {out / 'fusion_summary.dcm'}")
    return notes
