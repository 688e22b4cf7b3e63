"""The lung CT app run once over a folder: SEG + SR that validate, link up and match the truth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from radfusion.apps.lung_ct.app import run_folder
from radfusion.config import parse_config
from radfusion.evaluation import compare_with_truth, seg_label_volume
from radfusion.operators.series_selector import NoSeriesQualifies
from radfusion.synth.ct_series import synth_ct
from tests.conftest import REPO, evidence_uids, require_tool

CONFIG = parse_config({})
OUTPUTS = ("seg.dcm", "sr.dcm", "fusion_sr.dcm", "fusion_summary.dcm")


def chest(root: Path, seed: int = 5200, **kw: Any) -> Any:
    # 256² at 1.4 mm: the same anatomy the model sees at 512² (it resamples to 1.5 mm), at a
    # quarter of the cost.
    args = {"slices": 64, "rows": 256, "columns": 256, "slice_thickness": 5.0, "tumours": 3}
    return synth_ct(root, seed=seed, **{**args, **kw})


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[Path]]:
    root = tmp_path_factory.mktemp("lung_ct")
    study = chest(root / "in")
    return study, run_folder(root / "in", root / "out", CONFIG)


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


def sr_text(ds: pydicom.Dataset) -> str:
    """Every TEXT value of an SR content tree, joined."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out.append(sr_text(item))
    return " ".join(t for t in out if t)


def test_writes_a_seg_an_sr_a_fusion_sr_and_its_image_in_the_source_study(
    processed: tuple[Any, list[Path]],
) -> None:
    study, written = processed
    assert [p.name for p in written] == list(OUTPUTS)
    seg, sr, fusion, summary = (pydicom.dcmread(p) for p in written)
    source = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
    assert fusion.StudyInstanceUID == summary.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    series = {
        seg.SeriesInstanceUID,
        sr.SeriesInstanceUID,
        fusion.SeriesInstanceUID,
        summary.SeriesInstanceUID,
    }
    assert len(series | {source.SeriesInstanceUID}) == 5
    # Each says what it is and that it is a demonstration, whole (not cut to 64 characters).
    for ds in (seg, sr, fusion, summary):
        assert ds.SeriesDescription.endswith("(demonstration, not for clinical use)")
        assert "..." not in ds.SeriesDescription, ds.SeriesDescription
    assert [ds.SeriesNumber for ds in (seg, sr, fusion)] == [901, 902, 903]
    for ds in (seg, sr, fusion):
        assert ds.SeriesInstanceUID.startswith(CONFIG.uid_root)
        assert "not for clinical use" in ds.SeriesDescription
    # Without a FHIR server the fusion used the image only, and says why.
    text = sr_text(fusion)
    assert "clinical: no clinical data source is configured" in text
    evidence = evidence_uids(fusion)
    assert sr.SOPInstanceUID in evidence


def test_seg_and_sr_validate(processed: tuple[Any, list[Path]]) -> None:
    _, written = processed
    for path in written:
        assert dciodvfy_errors(path) == [], path.name
    dump = subprocess.run(
        [require_tool("dsrdump"), str(written[1])], capture_output=True, text=True, check=True
    ).stdout
    assert "Imaging Measurement Report" in dump and "Volume" in dump


def test_sr_references_resolve_to_seg_segments(processed: tuple[Any, list[Path]]) -> None:
    _, written = processed
    seg = hd.seg.segread(written[0])
    sr = hd.sr.srread(written[1])
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(labels)
    for group in groups:
        sop = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert sop.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert labels[int(sop.ReferencedSegmentNumber)] == group.tracking_identifier
    assert sorted(labels.values())[:2] == ["Left lung", "Right lung"]


def test_seg_matches_the_ground_truth(processed: tuple[Any, list[Path]]) -> None:
    study, written = processed
    labels, names = seg_label_volume(written[0], study.files)
    rows = compare_with_truth(labels, names, study.directory)
    for row in rows:
        if row.structure.endswith("lung"):
            assert row.segment == row.structure and row.dice >= 0.95, row
        elif row.diameter_mm >= 10:
            assert row.dice >= 0.85 and abs(row.found_ml / row.truth_ml - 1) <= 0.15, row


def test_radiomics_are_recorded_beside_the_results_under_the_sr_tracking_uids(
    processed: tuple[Any, list[Path]],
) -> None:
    study, written = processed
    record = json.loads((written[0].parent / "radiomics.json").read_text())
    source = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    assert record["SeriesInstanceUID"] == source.SeriesInstanceUID
    assert record["library"] == "mirp 2.7.0"
    assert record["settings"]["bin_width_hu"] == 25.0 and record["settings"]["resampling_mm"] == 1.0
    assert record["features"]["sphericity"]["ibsi"] == "QCFX"
    sr = hd.sr.srread(written[1])
    tumours = {
        str(g.tracking_uid): g
        for g in sr.content.get_volumetric_roi_measurement_groups()
        if not str(g.tracking_identifier).endswith("lung")
    }
    assert tumours and {t["tracking_uid"] for t in record["tumours"]} == set(tumours)
    for tumour in record["tumours"]:
        group = tumours[tumour["tracking_uid"]]
        volume = next(m for m in group.get_measurements() if m.name.meaning == "Volume")
        assert volume.unit.value == "mm3"
        # The SR counts voxels, radiomics measures the mesh: the same region, about.
        assert tumour["values"]["volume"] == pytest.approx(float(volume.value), rel=0.15)
        assert 0 < tumour["values"]["sphericity"] <= 1.0
        assert 0 <= tumour["values"]["ground_glass_fraction"] <= 1.0


def test_radiomics_can_be_turned_off(tmp_path: Path) -> None:
    chest(tmp_path / "in", tumours=1)
    config = parse_config({"apps": {"lung_ct": {"radiomics": {"enabled": False}}}})
    written = run_folder(tmp_path / "in", tmp_path / "out", config)
    assert [p.name for p in written] == ["seg.dcm", "sr.dcm"]
    assert not (tmp_path / "out" / "radiomics.json").exists()


def test_same_input_gives_identical_files(
    processed: tuple[Any, list[Path]], tmp_path: Path
) -> None:
    study, written = processed
    again = run_folder(study.directory, tmp_path / "again", CONFIG)
    for first, second in zip(written, again, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name


def test_abdomen_gives_an_out_of_scope_sr_and_no_seg(tmp_path: Path) -> None:
    chest(tmp_path / "in", seed=5201, chest=False)
    [sr_path] = run_folder(tmp_path / "in", tmp_path / "out", CONFIG)
    assert sr_path.name == "sr.dcm" and dciodvfy_errors(sr_path) == []
    sr = hd.sr.srread(sr_path)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    assert "no lungs found" in sr_text(pydicom.dcmread(sr_path))


def test_irregular_series_is_reported_not_processed(tmp_path: Path) -> None:
    study = chest(tmp_path / "in", seed=5202, slices=60)
    study.files[30].unlink()  # a missing slice: irregular spacing
    [sr_path] = run_folder(tmp_path / "in", tmp_path / "out", CONFIG)
    text = sr_text(pydicom.dcmread(sr_path))
    assert "not processed" in text and "spacing" in text
    assert dciodvfy_errors(sr_path) == []


def test_too_short_a_series_is_refused_with_its_values_and_a_refusal_sr(tmp_path: Path) -> None:
    chest(tmp_path / "in", seed=5203, slices=20)
    with pytest.raises(NoSeriesQualifies) as err:
        run_folder(tmp_path / "in", tmp_path / "out", CONFIG)
    assert err.value.reasons == (
        "series 2 (Chest 5mm STANDARD): z coverage 100 mm < 150 mm (20 slice(s) 5 mm apart)",
    )
    assert [p.name for p in err.value.written] == ["sr.dcm"]
    texts = [str(item.TextValue) for item in _items(pydicom.dcmread(err.value.written[0]))]
    assert any("z coverage 100 mm < 150 mm" in text for text in texts), texts


def _items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every TEXT content item of an SR, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(item)
        out.extend(_items(item))
    return out


def test_cli_run_and_the_monai_deploy_entry_point(
    processed: tuple[Any, list[Path]], tmp_path: Path
) -> None:
    study, written = processed
    cli = shutil.which("radfusion", path=str(Path(sys.executable).parent))
    assert cli is not None
    out = subprocess.run(
        [cli, "run", "lung-ct", "--input", str(study.directory), "--output", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / "a" / name) for name in OUTPUTS]
    env = {
        **os.environ,
        "HOLOSCAN_INPUT_PATH": str(study.directory),
        "HOLOSCAN_OUTPUT_PATH": str(tmp_path / "b"),
    }
    subprocess.run(
        [sys.executable, "-m", "radfusion.apps.lung_ct.app"],
        env=env,
        cwd=REPO,
        timeout=300,
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "b" / "sr.dcm").read_bytes() == written[1].read_bytes()
    assert (tmp_path / "b" / "fusion_sr.dcm").read_bytes() == written[2].read_bytes()
    assert (tmp_path / "b" / "fusion_summary.dcm").read_bytes() == written[3].read_bytes()


def test_cli_run_on_a_folder_without_ct_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    cli = shutil.which("radfusion", path=str(Path(sys.executable).parent))
    out = subprocess.run(
        [
            str(cli),
            "run",
            "lung-ct",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 1 and "no usable CT series" in out.stderr


def test_map_metadata_names_the_app_and_its_version() -> None:
    import yaml

    from radfusion import __version__

    meta = yaml.safe_load((REPO / "apps" / "lung_ct" / "app.yaml").read_text())
    assert str(meta["application"]["version"]) == __version__
    assert "demonstration" in meta["application"]["title"]
    assert meta["application"]["inputFormats"] == ["file"]
    assert {"cpu", "gpu", "memory"} <= meta["resources"].keys()


def test_enhanced_ct_source_gives_the_same_findings(
    processed: tuple[Any, list[Path]], tmp_path: Path
) -> None:
    """One multi-frame (Legacy Converted Enhanced CT) object instead of 64 single frames."""
    study, written = processed
    slices = [pydicom.dcmread(f) for f in study.files]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        list(reversed(slices)),  # frames in the opposite order to the slices' positions
        series_instance_uid=CONFIG.uid_root + "77.1",
        series_number=2,
        sop_instance_uid=CONFIG.uid_root + "77.2",
        instance_number=1,
    )
    (tmp_path / "in").mkdir()
    enhanced.save_as(tmp_path / "in" / "enhanced.dcm")
    seg_path, sr_path, *_ = run_folder(tmp_path / "in", tmp_path / "out", CONFIG)
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []
    single = hd.sr.srread(written[1]).content.get_volumetric_roi_measurement_groups()
    multi = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in multi] == [g.tracking_identifier for g in single]
    for a, b in zip(single, multi, strict=True):
        volume_a = a.get_measurements()[0].value
        volume_b = b.get_measurements()[0].value
        assert volume_b == pytest.approx(volume_a)
    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == enhanced.SeriesInstanceUID


def test_the_demonstration_notice_follows_the_model_not_its_folder(tmp_path: Path) -> None:
    from radfusion.apps.lung_ct.app import algorithm_info
    from radfusion.operators.segmentation_model import (
        SegmentationModelConfig,
        default_model_config_path,
    )

    reference = default_model_config_path().parent
    shutil.copy(reference / "model.ts", tmp_path / "model.ts")
    text = (reference / "model.yaml").read_text()
    (tmp_path / "model.yaml").write_text(text)  # the reference model, moved (as into a MAP)
    moved = algorithm_info(SegmentationModelConfig.from_yaml(tmp_path / "model.yaml"))
    assert moved.demonstration and "not for clinical use" in moved.series_description
    assert dict(moved.parameters)["model_sha256"]
    (tmp_path / "model.yaml").write_text(
        text.replace("demonstration: true", "demonstration: false")
    )
    own = algorithm_info(SegmentationModelConfig.from_yaml(tmp_path / "model.yaml"))
    assert not own.demonstration and "clinical" not in own.series_description


def test_the_process_command_line_is_not_read_as_a_holoscan_config(
    processed: tuple[Any, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`radfusion serve --config FILE` must not make Holoscan load FILE as its own config."""
    study, written = processed
    monkeypatch.setattr(sys, "argv", ["radfusion", "serve", "--config", str(tmp_path / "gone")])
    again = run_folder(study.directory, tmp_path / "out", CONFIG)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]


# -- series selection robustness: fall back to another series; leave stray images out -------


def copy_series(
    files: Sequence[Path],
    out: Path,
    *,
    series: tuple[str, int] | None = None,
    change: Callable[[int, pydicom.Dataset], None] | None = None,
) -> list[Path]:
    """Write ``files`` into ``out``; with ``series`` (UID, number) as another series with
    its own SOP Instance UIDs; ``change(k, ds)`` edits slice k first."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if series is not None:
            ds.SeriesInstanceUID, ds.SeriesNumber = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series[0]}.{k + 1}"
        if change is not None:
            change(k, ds)
        path = out / f"{series[1] if series else 'src'}-{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def test_a_larger_broken_series_falls_back_to_the_good_one(
    processed: tuple[Any, list[Path]], tmp_path: Path
) -> None:
    """The preferred series (more slices) cannot be assembled; the SEG is that of the other
    series, byte for byte as if it had come alone, and the SR says why that series was used."""
    study, written = processed
    copy_series(study.files, tmp_path / "in")
    # 65 images: the 64 slices again plus one re-sent under a new SOP Instance UID.
    copy_series(
        [*study.files, study.files[10]], tmp_path / "in", series=(CONFIG.uid_root + "88.1", 3)
    )
    again = run_folder(tmp_path / "in", tmp_path / "out", CONFIG)
    assert [p.name for p in again] == list(OUTPUTS)
    seg = hd.seg.segread(again[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.SeriesInstanceUID
    assert again[0].read_bytes() == written[0].read_bytes()
    text = "\n".join(str(item.TextValue) for item in _items(pydicom.dcmread(again[1])))
    assert "1 series preferred to it could not be assembled" in text
    assert "Series analysed: series 3" not in text


def test_a_localizer_and_a_screen_capture_inside_the_series_are_left_out(
    processed: tuple[Any, list[Path]], tmp_path: Path
) -> None:
    """One scout and one secondary capture share the axial series' UID: the series is still
    processed, from its 64 axial slices, with the same results as without them."""
    study, written = processed
    copy_series(study.files, tmp_path / "in")

    def scout(k: int, ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = CONFIG.uid_root + "1"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]

    def screen(k: int, ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = CONFIG.uid_root + "2"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"

    # In sub-folders of the input (it is read recursively), so no file name clashes.
    copy_series(study.files[:1], tmp_path / "in" / "scout", change=scout)
    copy_series(study.files[:1], tmp_path / "in" / "screen", change=screen)
    again = run_folder(tmp_path / "in", tmp_path / "out", CONFIG)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]
    seg = hd.seg.segread(again[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.SeriesInstanceUID
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert len(referenced) == 64
    assert not {CONFIG.uid_root + "1", CONFIG.uid_root + "2"} & referenced


def test_when_no_series_assembles_the_sr_gives_every_reason(
    processed: tuple[Any, list[Path]], tmp_path: Path
) -> None:
    study, _ = processed
    # Series 2 with a slice missing (63 slices) and series 3, tilted (64 slices, preferred).
    copy_series([f for k, f in enumerate(study.files) if k != 30], tmp_path / "in")

    def tilt(k: int, ds: pydicom.Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.10g}", f"{y + 0.75 * k:.10g}", f"{z:.10g}"]

    tilted_uid = CONFIG.uid_root + "88.2"
    copy_series(study.files, tmp_path / "in", series=(tilted_uid, 3), change=tilt)
    [sr_path] = run_folder(tmp_path / "in", tmp_path / "out", CONFIG)
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    text = sr_text(sr)
    tilted_at = text.index("series 3 (64 slices): slice positions drift")
    gap_at = text.index("series 2 (63 slices): irregular slice spacing")
    assert "not processed" in text and tilted_at < gap_at and text.isascii()
    assert tilted_uid not in text and study.SeriesInstanceUID not in text
    # The SR references the preferred series' images.
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [item.SeriesInstanceUID for item in evidence] == [tilted_uid]


def test_missing_optional_attributes_still_give_results(
    processed: tuple[Any, list[Path]], tmp_path: Path
) -> None:
    """No Image Type, Series Number, Series Description or Slice Thickness (often absent in
    the wild): the same findings, and objects that validate."""
    study, written = processed

    def bare(k: int, ds: pydicom.Dataset) -> None:
        for keyword in ("ImageType", "SeriesNumber", "SeriesDescription", "SliceThickness"):
            delattr(ds, keyword)

    copy_series(study.files, tmp_path / "in", change=bare)
    seg_path, sr_path, *_ = run_folder(tmp_path / "in", tmp_path / "out", CONFIG)
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []
    measures = pydicom.dcmread(seg_path).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    assert float(measures[0].SliceThickness) == pytest.approx(5.0)  # the slice spacing
    before = hd.sr.srread(written[1]).content.get_volumetric_roi_measurement_groups()
    after = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in after] == [g.tracking_identifier for g in before]
    for a, b in zip(before, after, strict=True):
        assert b.get_measurements()[0].value == pytest.approx(a.get_measurements()[0].value)


def test_a_failing_patient_context_lookup_never_fails_the_study(tmp_path: Path) -> None:
    from radfusion.integrations.fhir.provider import ContextUnavailable
    from radfusion.operators.patient_context import look_up
    from radfusion.operators.series_selector import SelectionRule, read_headers, select_series
    from radfusion.patient_context import ContextOutcome

    study = synth_ct(tmp_path / "ct", slices=16, rows=64, columns=64, seed=5, tumours=0)
    (tmp_path / "notes.txt").write_text("not DICOM")
    dicomdir = pydicom.Dataset()
    dicomdir.SOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.StudyInstanceUID = "1.2.3"
    dicomdir.save_as(tmp_path / "DICOMDIR", implicit_vr=True, little_endian=True)
    files = [tmp_path / "notes.txt", tmp_path / "DICOMDIR", *study.files]
    rule = SelectionRule(min_z_coverage_mm=10)
    selection = select_series(read_headers(files), rule=rule)
    assert selection is not None and not selection.refused
    seen: list[str] = []

    def provider(header: pydicom.Dataset) -> ContextOutcome:
        seen.append(str(header.SeriesInstanceUID))
        raise ValueError(f"bad data for {header.PatientID}")

    outcome = look_up(provider, selection)
    assert outcome is not None
    assert seen == [str(pydicom.dcmread(study.files[0]).SeriesInstanceUID)]  # the CT series
    assert (outcome.status, outcome.reason) == ("refused", "the lookup failed (ValueError)")

    def holding(header: pydicom.Dataset) -> ContextOutcome:
        raise ContextUnavailable("FHIR server down")

    with pytest.raises(ContextUnavailable):  # hold: the study waits for the server
        look_up(holding, selection)
    refused = select_series(read_headers(files), rule=SelectionRule(min_z_coverage_mm=1000))
    assert refused is not None and refused.refused
    assert look_up(holding, refused) is None  # nothing analysed: nothing looked up, no failure
    assert look_up(holding, None) is None


def test_the_patient_context_operator_feeds_the_sr_and_the_result(tmp_path: Path) -> None:
    """The graph's patient_context operator: its outcome is in the SR and, when no context
    was found, in the app's result notes; a lookup that is Unavailable fails the study with
    nothing written."""
    from radfusion.apps.lung_ct.app import LungCTApp, make_predictor, model_config
    from radfusion.errors import Unavailable
    from radfusion.patient_context import ContextOutcome

    study = chest(tmp_path / "in", slices=36, rows=128, columns=128)
    model = model_config(CONFIG.apps.lung_ct)
    predictor = make_predictor(CONFIG, model)
    headers: list[pydicom.Dataset] = []

    def not_found(header: pydicom.Dataset) -> ContextOutcome:
        headers.append(header)
        return ContextOutcome("no-patient", reason="no Patient matched")

    def down(header: pydicom.Dataset) -> ContextOutcome:
        raise Unavailable("FHIR server down")

    def app(out: Path, lookup: Any) -> LungCTApp:
        return LungCTApp(
            files=study.files,
            output_dir=out,
            settings=CONFIG.apps.lung_ct,
            uid_root=CONFIG.uid_root,
            model=model,
            predictor=predictor,
            lookup=lookup,
        )

    found = app(tmp_path / "a", not_found)
    found.run()
    result = found.result()
    sentence = "Clinical and genomic data (FHIR): none, the patient was not identified"
    assert result.notes == (f"{sentence} (no Patient matched)",)
    assert [h.StudyInstanceUID for h in headers] == [study.StudyInstanceUID]
    assert [p.name for p in result.files] == ["seg.dcm", "sr.dcm"]
    text = sr_text(pydicom.dcmread(result.files[1]))
    assert sentence in text and "This algorithm uses imaging only." in text
    assert {"patient_context", "load", "inference", "sr_encode"} <= set(result.timings)

    held = app(tmp_path / "b", down)
    with pytest.raises(Unavailable, match="FHIR server down"):
        held.run()
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())

    without = app(tmp_path / "c", None)
    without.run()
    assert without.result().notes == ()
    assert "FHIR" not in sr_text(pydicom.dcmread(without.result().files[1]))
