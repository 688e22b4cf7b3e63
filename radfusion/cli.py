"""The ``radfusion`` command line."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from radfusion import __version__
from radfusion.config import ConfigError, RadfusionConfig, example_config, load_config
from radfusion.logs import configure_logging, uid_tag

if TYPE_CHECKING:  # imported where used: the Triton client loads slowly
    from radfusion.integrations.inference.repository import Backend

console = Console()

_CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RADFUSION_CONFIG",
    help="Configuration YAML (default: embedded defaults; env RADFUSION_CONFIG).",
)


def _load(config_path: Path | None) -> RadfusionConfig:
    try:
        return load_config(config_path)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="radfusion")
def main() -> None:
    """radfusion: AI results for the studies your scanners and PACS send.

    \b
    Typical use:
      radfusion config example > radfusion.yaml   # write a commented configuration
      radfusion config check radfusion.yaml       # validate it
      radfusion serve --config radfusion.yaml     # run the DICOM node and the apps
      radfusion status --config radfusion.yaml    # what arrived and what happened to it
      radfusion deadletter list                   # work that failed after its retries
    Try it without a network: radfusion demo
    """
    # Everything radfusion writes (spool, catalog, results, exports, logs it opens) holds
    # patient data: readable by its own user only.
    os.umask(0o077)


# -- config -----------------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Write or check configuration files."""


@config.command("example")
def config_example() -> None:
    """Print a commented example configuration."""
    click.echo(example_config(), nl=False)


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def config_check(path: Path) -> None:
    """Validate PATH; errors name each bad key."""
    cfg = _load(path)
    click.echo(
        f"{path}: valid ({len(cfg.routing.rules)} routing rule(s), "
        f"{len(cfg.export.destinations)} destination(s))"
    )


# -- serve ------------------------------------------------------------------------------------


@main.command()
@_CONFIG_OPTION
@click.option("--log-level", default="INFO", show_default=True)
def serve(config_path: Path | None, log_level: str) -> None:
    """Run the DICOM node: receive studies, route them to apps, export the results."""
    from radfusion.service import Service

    cfg = _load(config_path)
    configure_logging(log_level)
    service = Service(cfg)

    def _stop(signum: int, frame: FrameType | None) -> None:
        service._stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service.run_forever()


# -- status -----------------------------------------------------------------------------------


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


@main.command()
@_CONFIG_OPTION
@click.option("--limit", default=20, show_default=True, help="How many recent studies.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path | None, limit: int, as_json: bool) -> None:
    """List recent studies and their state (receiving, routed, unrouted, done, failed).

    Studies are shown by a short hash of their Study Instance UID, never by patient data.
    """
    from radfusion.service import open_catalog

    catalog = open_catalog(_load(config_path))
    studies = catalog.recent_studies(limit)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "study": uid_tag(s.StudyInstanceUID),
                        "state": s.state.value,
                        "generation": s.generation,
                        "calling_ae": s.calling_ae,
                        "instances": s.instances,
                        "series": s.series,
                        "apps": list(s.apps),
                        "last_received": s.last_received,
                        "handed_on_at": s.handed_on_at,
                        "detail": s.detail,
                    }
                    for s in studies
                ],
                indent=2,
            )
        )
        return
    table = Table(title=f"recent studies ({len(studies)})")
    for col in ("study", "state", "from", "series", "instances", "last received", "apps", "detail"):
        table.add_column(col)
    for s in studies:
        table.add_row(
            uid_tag(s.StudyInstanceUID),
            s.state.value + (f" (#{s.generation})" if s.generation > 1 else ""),
            s.calling_ae,
            str(s.series),
            str(s.instances),
            _when(s.last_received),
            ", ".join(s.apps) or "-",
            s.detail,
        )
    console.print(table)
    awaiting = catalog.commitments()
    if awaiting:
        oldest = min(c.requested for c in awaiting)
        console.print(
            f"{len(awaiting)} delivery(ies) awaiting the destination's storage commitment "
            f"(oldest requested {_when(oldest)})"
        )
    pending = len(catalog.dead_letters())
    if pending:
        console.print(f"[yellow]{pending} dead letter(s): radfusion deadletter list[/yellow]")


# -- dead letters -----------------------------------------------------------------------------


@main.group()
def deadletter() -> None:
    """Work that failed after all its retries: list it, retry it."""


@deadletter.command("list")
@_CONFIG_OPTION
@click.option("--all", "include_resolved", is_flag=True, help="Include resolved ones.")
def deadletter_list(config_path: Path | None, include_resolved: bool) -> None:
    """List dead letters (undelivered exports, failed jobs)."""
    from radfusion.service import open_catalog

    letters = open_catalog(_load(config_path)).dead_letters(include_resolved=include_resolved)
    if not letters:
        click.echo("no dead letters")
        return
    table = Table()
    for col in (
        "id",
        "kind",
        "study",
        "target",
        "files",
        "attempts",
        "created",
        "resolved",
        "last error",
    ):
        table.add_column(col)
    for d in letters:
        table.add_row(
            str(d.id),
            d.kind,
            uid_tag(d.StudyInstanceUID) if d.StudyInstanceUID else "-",
            d.destination or (f"job {d.job_id}" if d.job_id else "-"),
            str(d.files),
            str(d.attempts),
            _when(d.created),
            _when(d.resolved),
            d.error,
        )
    console.print(table)


@deadletter.command("retry")
@_CONFIG_OPTION
@click.argument("dead_letter_id", type=int)
def deadletter_retry(config_path: Path | None, dead_letter_id: int) -> None:
    """Retry dead letter DEAD_LETTER_ID: re-send an export, or re-queue a failed job."""
    from radfusion.service import open_catalog, open_exporter

    cfg = _load(config_path)
    catalog = open_catalog(cfg)
    letter = catalog.dead_letter(dead_letter_id)
    if letter is None:
        raise click.ClickException(f"no dead letter #{dead_letter_id}")
    if letter.resolved is not None:
        raise click.ClickException(f"dead letter #{dead_letter_id} is already resolved")
    if letter.kind == "job":
        catalog.requeue_job(letter.job_id or 0)
        catalog.update_dead_letter(dead_letter_id, resolved=True)
        click.echo(f"job {letter.job_id} re-queued; the running service will pick it up")
        return
    try:
        result = open_exporter(cfg, catalog).retry_dead_letter(dead_letter_id)
    except KeyError as err:
        raise click.ClickException(str(err.args[0])) from None
    if not result.delivered:
        raise click.ClickException(f"still failing: {result.error}")
    click.echo(f"dead letter #{dead_letter_id} delivered to {result.destination}")


# -- synthetic data ---------------------------------------------------------------------------


@main.group()
def synth() -> None:
    """Generate synthetic test data (no real patient data involved)."""


@synth.command("ct")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--slices", default=120, show_default=True, type=click.IntRange(1, 2000))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--patient-id", default="RF-0001", show_default=True)
@click.option("--tumours", default=2, show_default=True, type=click.IntRange(0, 20))
@click.option(
    "--size",
    default=512,
    show_default=True,
    type=click.IntRange(32, 1024),
    help="Rows and columns.",
)
@click.option("--no-chest", is_flag=True, help="An abdomen-like body without lungs.")
@click.option(
    "--style",
    type=click.Choice(["simple", "realistic"]),
    default="realistic",
    show_default=True,
    help="realistic: vessels, airways, ribs, nodule types, kernels, partial volume.",
)
@click.option(
    "--vendor",
    type=click.Choice(["generic", "ge", "siemens", "philips", "canon"]),
    default="generic",
    show_default=True,
    help="Header style, transfer syntax, rescale and padding of that vendor.",
)
@click.option(
    "--kernel",
    type=click.Choice(["soft", "sharp"]),
    default=None,
    help="Reconstruction kernel (realistic; default: by seed).",
)
@click.option("--slice-thickness", default=2.5, show_default=True, type=click.FloatRange(0.5, 10))
@click.option(
    "--slice-spacing",
    default=None,
    type=click.FloatRange(0.3, 10),
    help="Between slice centres (realistic; default: the thickness).",
)
@click.option("--emphysema", is_flag=True, help="Emphysema patches (realistic).")
@click.option("--effusion", is_flag=True, help="Pleural effusion (realistic).")
def synth_ct(
    out: Path,
    slices: int,
    seed: int,
    patient_id: str,
    tumours: int,
    size: int,
    no_chest: bool,
    style: str,
    vendor: str,
    kernel: str | None,
    slice_thickness: float,
    slice_spacing: float | None,
    emphysema: bool,
    effusion: bool,
) -> None:
    """Write a synthetic chest CT series with ground truth (labels.npz, truth.json)."""
    from radfusion.synth.ct_series import synth_ct as make

    if no_chest:
        style = "simple"  # the abdomen exists in the simple style only
    try:
        study = make(
            out,
            slices=slices,
            seed=seed,
            patient_id=patient_id,
            tumours=tumours,
            rows=size,
            columns=size,
            chest=not no_chest,
            style=style,
            vendor=vendor,
            kernel=kernel,
            slice_thickness=slice_thickness,
            slice_spacing=slice_spacing,
            emphysema=emphysema,
            effusion=effusion,
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {len(study.files)} CT images to {out}")
    click.echo(f"ground truth: {study.ground_truth}, {study.truth_json}")


@synth.command("cohort")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--patients", default=10, show_default=True, type=click.IntRange(1, 100_000), help="How many."
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Same seed, same files.",
)
@click.option(
    "--slices", default=64, show_default=True, type=click.IntRange(8, 2000), help="CT slices."
)
@click.option(
    "--size", default=128, show_default=True, type=click.IntRange(32, 1024), help="CT rows/columns."
)
def synth_cohort(out: Path, patients: int, seed: int, slices: int, size: int) -> None:
    """Write a synthetic lung-cancer cohort: per patient a chest CT, a FHIR R4 transaction
    Bundle and ground truth (see radfusion.synth.cohort for the rules). Synthetic only."""
    from radfusion.synth.cohort import CohortPatient
    from radfusion.synth.cohort import synth_cohort as make

    def report(patient: CohortPatient) -> None:
        click.echo(
            f"{patient.patient_id}: {len(patient.ct.files)} CT images, stage "
            f"{patient.stage_group}, {patient.bundle.name}, {patient.ground_truth.name}"
        )

    try:
        cohort = make(out, patients=patients, seed=seed, slices=slices, size=size, progress=report)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {len(cohort.patients)} patient(s) to {out}; index: {cohort.index}")


# -- run ------------------------------------------------------------------------------------


@main.command("run")
@click.argument("app", type=click.Choice(["lung-ct"]))
@click.option(
    "--input",
    "input_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder with the study's DICOM files (searched recursively).",
)
@click.option(
    "--output",
    "output_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder the SEG and SR are written to.",
)
@_CONFIG_OPTION
def run_app(app: str, input_dir: Path, output_dir: Path, config_path: Path | None) -> None:
    """Run an app once over a folder, like a MONAI Deploy app (no network, no spool).

    The same as the MAP's HOLOSCAN_INPUT_PATH → HOLOSCAN_OUTPUT_PATH convention. Writes SEG and
    SR into --output; prints the files written. Exit status 1 when no series could be analysed
    (the error names every series and why; the refusal SR, if written, is printed first) or
    nothing could be written.
    """
    settings = _load(config_path)
    configure_logging("INFO")
    from radfusion.apps.lung_ct.app import run_folder
    from radfusion.operators.series_selector import NoSeriesQualifies

    try:
        written = run_folder(input_dir, output_dir, settings)
    except NoSeriesQualifies as err:
        for path in err.written:
            click.echo(str(path))
        outcome = "a refusal SR was written" if err.written else "nothing written"
        reasons = err.reasons or ("no DICOM image could be read",)
        raise click.ClickException(
            f"{app}: no usable CT series in {input_dir} ({outcome}):\n"
            + "\n".join(f"  {reason}" for reason in reasons)
        ) from None
    except Exception as err:  # any app failure becomes a CLI error, not a traceback
        raise click.ClickException(f"{app} failed: {err}") from None
    for path in written:
        click.echo(str(path))
    if not written:
        raise click.ClickException(f"{app}: no usable CT series in {input_dir}: nothing written")


# -- eval -------------------------------------------------------------------------------------


@main.group("eval")
def eval_group() -> None:
    """Evaluate an app against reference annotations (LIDC XML, DICOM SEG)."""


@eval_group.command("lung-ct")
@click.option(
    "--input",
    "input_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder with the CT series (searched recursively).",
)
@click.option(
    "--reference",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A LIDC reader XML or reference DICOM SEG, or a folder of them.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as JSON here.",
)
@click.option(
    "--min-diameter-mm",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Reference nodules smaller than this (longest axial diameter) do not count.",
)
@click.option(
    "--min-readers",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="LIDC nodules marked by fewer readers do not count.",
)
@_CONFIG_OPTION
def eval_lung_ct(
    input_dir: Path,
    reference: Path,
    json_out: Path | None,
    min_diameter_mm: float,
    min_readers: int,
    config_path: Path | None,
) -> None:
    """Run lung-ct on each referenced series and score it: nodules found, false positives per
    scan, Dice and volume error per nodule, lung volumes; overall and per kernel class.

    Exit status 1 when a reference matches no series under --input, or a case failed.
    """
    settings = _load(config_path)
    configure_logging("WARNING")
    from radfusion.evaluation.lidc import LidcFormatError
    from radfusion.evaluation.lung_ct import (
        CaseResult,
        UnmatchedReferenceError,
        evaluate_lung_ct,
        format_report,
    )

    def progress(case: CaseResult) -> None:
        click.echo(f"evaluated {case.case}", err=True)

    try:
        evaluation = evaluate_lung_ct(
            input_dir,
            reference,
            settings,
            min_diameter_mm=min_diameter_mm,
            min_readers=min_readers,
            progress=progress,
        )
    except (UnmatchedReferenceError, LidcFormatError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_report(evaluation))
    if json_out is not None:
        json_out.write_text(json.dumps(evaluation.to_json(), indent=2) + "\n")
        click.echo(f"JSON: {json_out}")
    failed = sum(1 for c in evaluation.cases if c.error is not None)
    if failed:
        raise click.ClickException(f"{failed} of {len(evaluation.cases)} case(s) failed")


# -- triton -----------------------------------------------------------------------------------


@main.group()
def triton() -> None:
    """Triton Inference Server: write the model repository a site's server serves."""


@triton.command("repo")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--cpu", is_flag=True, help="CPU instances (KIND_CPU) instead of GPU.")
@click.option(
    "--backend",
    type=click.Choice(["pytorch", "python"]),
    default="pytorch",
    show_default=True,
    help="pytorch: Triton's LibTorch backend (NVIDIA's containers); python: the Python "
    "backend with torch in the stub's environment.",
)
def triton_repo(out: Path, cpu: bool, backend: Backend) -> None:
    """Write a ready Triton model repository (configs + TorchScript weights) into OUT.

    \b
    Serve it with NVIDIA's container on a GPU host, e.g.:
      docker run --gpus=1 -p8001:8001 -v $PWD/OUT:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
    then set `triton: {url: HOST:8001}` in radfusion's configuration.
    """
    from radfusion.integrations.inference.repository import RepositoryError, write_repository

    try:
        written = write_repository(out, cpu=cpu, backend=backend)
    except RepositoryError as err:
        raise click.ClickException(str(err)) from None
    for model in written:
        click.echo(f"{model.name}: {model.config.parent}")


# -- demo -------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's files here (default: a temporary folder).",
)
@click.option("--slices", default=120, show_default=True, type=click.IntRange(10, 1000))
def demo(workdir: Path | None, slices: int) -> None:
    """Run the whole path on this machine: synthetic CT → C-STORE → node → route → results."""
    from radfusion.demo import run_demo

    sys.exit(run_demo(workdir, slices=slices, console=console))


if __name__ == "__main__":
    main()
