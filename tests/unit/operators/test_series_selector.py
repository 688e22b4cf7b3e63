"""Series selection: the axial CT series is chosen among localizers, secondary captures, short
and non-axial series; each other series is skipped with its reason (naming the series and the
values); nothing qualifying gives a refusal that references the closest series' images (None
only without images); z coverage and slice spacing decide, not a slice count; qualifying series
come in preference order; of several reconstructions of one acquisition one is chosen by the
configured preference and the others skipped with the reason; stray images inside a good
series (a scout, a reformat, another matrix, a secondary capture, a duplicate) are left out and
counted instead of costing the series; malformed or missing attributes never crash the
selector."""

from __future__ import annotations

import copy
import dataclasses
import logging
import zlib
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from radfusion.logs import uid_tag
from radfusion.operators.series_names import kernel_class, series_name
from radfusion.operators.series_selector import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    NoSeriesQualifies,
    SelectionRule,
    SeriesCandidate,
    SeriesSelection,
    SkippedSeries,
    read_headers,
    select_series,
)
from radfusion.operators.volume import assemble_volume
from radfusion.synth.ct import make_phantom
from radfusion.synth.ct_series import SynthStudy, write_ct_series

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SLICES = 24
THICKNESS = 5.0  # mm: the synthetic series' slice thickness and spacing
UID_BASE = "1.2.826.0.1.3680043.10.1234.9.66."
SAGITTAL = ["0", "1", "0", "0", "0", "-1"]
CORONAL = ["1", "0", "0", "0", "0", "-1"]

Item = tuple[Path, Dataset]


@dataclasses.dataclass(frozen=True)
class Study:
    ct: SynthStudy
    headers: tuple[Item, ...]  # read_headers of the axial CT series

    def axial(self) -> list[Item]:
        """Fresh copies of the axial series' headers."""
        return [(p, copy.deepcopy(ds)) for p, ds in self.headers]

    def other(self, name: str, count: int, **changes: object) -> list[Item]:
        """A different series made from the first ``count`` axial headers, with ``changes``."""
        series_uid = UID_BASE + str(zlib.crc32(name.encode()) + 1)
        out = []
        for i, (_, ds) in enumerate(self.headers[:count]):
            ds = copy.deepcopy(ds)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = f"{series_uid}.{i + 1}"
            for keyword, value in changes.items():
                setattr(ds, keyword, value)
            out.append((Path(f"/study/{name}/{i + 1:04d}.dcm"), ds))
        return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    phantom = make_phantom(
        slices=SLICES, rows=64, columns=64, pixel_spacing=5.0, slice_thickness=5, tumours=0
    )
    ct = write_ct_series(phantom, tmp_path_factory.mktemp("ct"))
    return Study(ct, tuple(read_headers(ct.files)))


def uid_of(items: list[Item]) -> str:
    return str(items[0][1].SeriesInstanceUID)


def covering(slices: int) -> SelectionRule:
    """The rule that asks for the coverage of ``slices`` of the synthetic series (5 mm each)."""
    return SelectionRule(min_z_coverage_mm=slices * THICKNESS)


def reasons(selection: SeriesSelection) -> dict[str, str]:
    return {s.SeriesInstanceUID: s.reason for s in selection.skipped}


def refused(selection: SeriesSelection | None) -> SeriesSelection:
    """The selection, checked to be a refusal (no candidates, images to reference)."""
    assert selection is not None and selection.refused and not selection.candidates
    assert selection.evidence
    return selection


def chosen(selection: SeriesSelection | None) -> SeriesCandidate:
    assert selection is not None
    return selection.preferred


# -- read_headers ----------------------------------------------------------------------------


def test_read_headers_reads_headers_without_pixels(study: Study) -> None:
    assert [p for p, _ in study.headers] == list(study.ct.files)
    for _, ds in study.headers:
        assert "PixelData" not in ds
        assert ds.SeriesInstanceUID == study.ct.SeriesInstanceUID
        assert "Rows" in ds


def test_read_headers_skips_unreadable_files(
    study: Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a DICOM file\n" * 20)
    missing = tmp_path / "gone.dcm"
    files = [study.ct.files[0], junk, missing, tmp_path, study.ct.files[1]]
    with caplog.at_level(logging.WARNING, logger="radfusion.operators.series_selector"):
        out = read_headers(files)
    assert [p for p, _ in out] == [study.ct.files[0], study.ct.files[1]]
    assert all(isinstance(p, Path) for p, _ in out)
    # File names are SOP Instance UIDs in the spool: logged as tags, never as they are.
    assert uid_tag("notes.txt") in caplog.text and uid_tag("gone.dcm") in caplog.text
    assert "notes.txt" not in caplog.text


# -- the choice ------------------------------------------------------------------------------


def test_picks_the_axial_ct_among_distractors(study: Study) -> None:
    localizer = study.other(
        "localizer",
        2,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=CORONAL,
    )
    # Distractors with more slices than the axial series: only their kind excludes them.
    secondary = study.other("secondary", SLICES, SOPClassUID=SECONDARY_CAPTURE)
    sagittal = study.other("sagittal", SLICES, ImageOrientationPatient=SAGITTAL)
    short = study.other("short", 10)
    axial = study.axial()
    everything = localizer + sagittal + secondary + axial[:12] + short + axial[12:]

    selection = select_series(everything, rule=covering(20))

    assert selection is not None and len(selection.candidates) == 1
    axial_series = selection.preferred
    assert axial_series.SeriesInstanceUID == study.ct.SeriesInstanceUID
    assert axial_series.files == tuple(study.ct.files)  # in the order they came
    assert [ds.SOPInstanceUID for ds in axial_series.headers] == [
        ds.SOPInstanceUID for _, ds in study.headers
    ]
    assert axial_series.slices == SLICES
    assert axial_series.dropped == ()
    why = reasons(selection)
    assert set(why) == {uid_of(x) for x in (localizer, secondary, sagittal, short)}
    assert "localizer" in why[uid_of(localizer)]
    assert "secondary capture" in why[uid_of(secondary)]
    assert "not axial" in why[uid_of(sagittal)] and "90 degrees" in why[uid_of(sagittal)]
    assert why[uid_of(short)] == "z coverage 50 mm < 100 mm (10 slice(s) 5 mm apart)"


def test_localizer_is_skipped_even_with_enough_images(study: Study) -> None:
    # A localizer that looks axial and has many images is still a localizer.
    localizer = study.other("scout", SLICES, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    selection = select_series(localizer + study.axial()[:22], rule=covering(20))
    assert chosen(selection).slices == 22
    assert selection is not None and len(selection.candidates) == 1
    assert "localizer" in reasons(selection)[uid_of(localizer)]


def test_localizer_image_type_is_case_insensitive(study: Study) -> None:
    localizer = study.other("scout", SLICES, ImageType=["ORIGINAL", "PRIMARY", "localizer"])
    assert "localizer" in refused(select_series(localizer, rule=covering(1))).reasons()[0]


def test_coronal_reformat_is_skipped(study: Study) -> None:
    coronal = study.other("coronal", SLICES, ImageOrientationPatient=CORONAL)
    assert "not axial" in refused(select_series(coronal, rule=covering(1))).reasons()[0]


def test_tilted_axial_series_still_qualifies(study: Study) -> None:
    # 20° gantry tilt: within the 30° tolerance for "axial".
    tilted = study.other(
        "tilted",
        SLICES,
        ImageOrientationPatient=["1", "0", "0", "0", "0.9396926208", "0.3420201433"],
    )
    assert chosen(select_series(tilted, rule=covering(20))).SeriesInstanceUID == uid_of(tilted)


def test_oblique_beyond_tolerance_is_skipped(study: Study) -> None:
    # 40° from axial.
    oblique = study.other(
        "oblique",
        SLICES,
        ImageOrientationPatient=["1", "0", "0", "0", "0.7660444431", "0.6427876097"],
    )
    assert "40 degrees" in refused(select_series(oblique, rule=covering(20))).reasons()[0]


def test_other_modality_is_skipped(study: Study) -> None:
    mr = study.other("mr", SLICES, Modality="MR")
    axial = study.axial()
    selection = select_series(mr + axial, rule=covering(20))
    assert chosen(selection).SeriesInstanceUID == study.ct.SeriesInstanceUID
    assert selection is not None and reasons(selection)[uid_of(mr)] == "modality MR, not CT"


def test_series_of_secondary_captures_only_is_skipped(study: Study) -> None:
    secondary = study.other("secondary", SLICES, SOPClassUID=SECONDARY_CAPTURE)
    selection = select_series(secondary + study.axial(), rule=covering(20))
    assert chosen(selection).SeriesInstanceUID == study.ct.SeriesInstanceUID
    assert selection is not None and "secondary capture" in reasons(selection)[uid_of(secondary)]


def test_images_without_series_uid_are_skipped(study: Study) -> None:
    loose = study.other("loose", SLICES)
    for _, ds in loose:
        del ds.SeriesInstanceUID
    assert select_series(loose, rule=covering(1)) is None


def test_nothing_qualifies_is_a_refusal_with_every_reason(
    study: Study, caplog: pytest.LogCaptureFixture
) -> None:
    localizer = study.other("localizer", 3, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    secondary = study.other("secondary", SLICES, SOPClassUID=SECONDARY_CAPTURE)
    short = study.other("short", 10, SeriesNumber=7, SeriesDescription="Thorax 5.0 B70f")
    with caplog.at_level(logging.INFO, logger="radfusion.operators.series_selector"):
        selection = refused(select_series(localizer + secondary + short, rule=covering(20)))
    assert selection.reasons() == [
        "series 2 (Chest 5mm STANDARD): localizer (scout/topogram)",
        "series 2 (Chest 5mm STANDARD): not CT image storage (e.g. secondary capture, dose report)",
        "series 7 (Thorax 5.0 B70f STANDARD): z coverage 50 mm < 100 mm (10 slice(s) 5 mm apart)",
    ]
    # The closest series is referenced: the axial CT one that came short, not the captures.
    assert [ds.SOPInstanceUID for ds in selection.evidence] == [
        ds.SOPInstanceUID for _, ds in short
    ]
    with pytest.raises(ValueError, match="no series qualifies"):
        _ = selection.preferred
    for reason in selection.reasons():
        assert reason in caplog.text
    assert study.ct.SeriesInstanceUID not in caplog.text and UID_BASE not in caplog.text
    error = NoSeriesQualifies(selection)
    assert error.reasons == tuple(selection.reasons()) and "z coverage 50 mm" in str(error)


def test_a_refusal_falls_back_to_any_referenceable_image(study: Study) -> None:
    secondary = study.other("secondary", 2, SOPClassUID=SECONDARY_CAPTURE)
    localizer = study.other("localizer", 3, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    selection = refused(select_series(secondary + localizer))
    # Both are nothing usable; the localizer's images are at least CT images.
    assert {ds.SeriesInstanceUID for ds in selection.evidence} == {uid_of(localizer)}
    # Without SOP Class UID nothing could be referenced: no selection at all.
    for _, ds in secondary:
        del ds.SOPClassUID
    assert select_series(secondary) is None
    assert select_series([]) is None


def test_default_rule_needs_150_mm_and_at_most_10_mm_spacing(study: Study) -> None:
    assert SelectionRule() == SelectionRule(150.0, 10.0, ("thinnest", "soft_kernel"), False)
    selection = refused(select_series(study.axial()))  # 24 x 5 mm = 120 mm
    assert selection.reasons() == [
        "series 2 (Chest 5mm STANDARD): z coverage 120 mm < 150 mm (24 slice(s) 5 mm apart)"
    ]


@pytest.mark.parametrize(
    ("coverage_mm", "expected"), [(115.0, True), (120.0, True), (120.5, False)]
)
def test_min_z_coverage_is_respected(study: Study, coverage_mm: float, expected: bool) -> None:
    selection = select_series(study.axial(), rule=SelectionRule(min_z_coverage_mm=coverage_mm))
    assert selection is not None and selection.refused != expected


def stretched(study: Study, name: str, count: int, spacing: float, **changes: object) -> list[Item]:
    """A series of ``count`` slices ``spacing`` mm apart (Slice Thickness the same), made from
    the axial headers (repeated as needed), with ``changes``."""
    series_uid = UID_BASE + str(zlib.crc32(name.encode()) + 1)
    z0 = float(study.headers[0][1].ImagePositionPatient[2])
    out = []
    for k in range(count):
        ds = copy.deepcopy(study.headers[k % SLICES][1])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = f"{series_uid}.{k + 1}"
        ds.SliceThickness = f"{spacing:g}"
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, f"{z0 + k * spacing:g}"]
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        out.append((Path(f"/study/{name}/{k + 1:04d}.dcm"), ds))
    return out


def test_thirty_slices_of_8_mm_qualify_by_default(study: Study) -> None:
    """The Siemens chest that a 50-slice minimum refused: 30 x 8 mm = 240 mm."""
    siemens = stretched(study, "siemens", 30, 8.0, ConvolutionKernel="B70f")
    series = chosen(select_series(siemens))
    assert series.slices == 30
    assert series.z_coverage_mm == pytest.approx(240.0)
    assert series.slice_spacing_mm == pytest.approx(8.0)


def test_a_90_mm_series_is_refused_with_the_values(study: Study) -> None:
    short = stretched(
        study,
        "short",
        18,
        5.0,
        SeriesNumber=3,
        SeriesDescription="ThoraxRoutine",
        ConvolutionKernel="B70f",
    )
    [skipped] = refused(select_series(short)).skipped
    assert skipped == SkippedSeries(
        uid_of(short),
        "series 3 (ThoraxRoutine B70f)",
        "z coverage 90 mm < 150 mm (18 slice(s) 5 mm apart)",
    )
    assert str(skipped) == (
        "series 3 (ThoraxRoutine B70f): z coverage 90 mm < 150 mm (18 slice(s) 5 mm apart)"
    )


def test_wide_slice_spacing_is_refused_with_the_values(study: Study) -> None:
    sparse = stretched(study, "sparse", 20, 12.5)  # 250 mm, but 12.5 mm apart
    assert reasons(refused(select_series(sparse)))[uid_of(sparse)] == (
        "slice spacing 12.5 mm > 10 mm"
    )
    relaxed = SelectionRule(max_slice_spacing_mm=12.5)
    assert chosen(select_series(sparse, rule=relaxed)).z_coverage_mm == pytest.approx(250.0)


def test_the_limits_are_inclusive(study: Study) -> None:
    # 60 slices 2.5 mm apart from a float-unfriendly origin: exactly 150 mm, exactly 2.5 mm.
    thin = stretched(study, "thin", 60, 2.5)
    for k, (_, ds) in enumerate(thin):
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, f"{-163.7 + k * 2.5:.10g}"]
    rule = SelectionRule(max_slice_spacing_mm=2.5)
    assert chosen(select_series(thin, rule=rule)).z_coverage_mm == pytest.approx(150.0)


def test_one_slice_covers_its_thickness(study: Study) -> None:
    [skipped] = refused(select_series(study.axial()[:1])).skipped
    assert skipped.reason == "z coverage 5 mm < 150 mm (1 slice(s))"


def test_a_slice_sent_twice_adds_no_coverage(study: Study) -> None:
    axial = study.axial()
    again = copy.deepcopy(axial[3][1])
    again.SOPInstanceUID = UID_BASE + "77.1"  # another instance, the same position
    series = chosen(select_series([*axial, (Path("/again.dcm"), again)], rule=covering(SLICES)))
    assert series.slices == SLICES + 1 and series.z_coverage_mm == pytest.approx(120.0)


def test_too_little_coverage_reason_names_the_values(study: Study) -> None:
    short = study.other("short", 5)
    selection = select_series(short + study.axial(), rule=covering(SLICES))
    assert selection is not None
    assert reasons(selection)[uid_of(short)] == (
        "z coverage 25 mm < 120 mm (5 slice(s) 5 mm apart)"
    )
    assert [c.SeriesInstanceUID for c in selection.candidates] == [study.ct.SeriesInstanceUID]
    assert selection.choice == (
        "series 2 (5 mm, STANDARD, soft kernel): the only series that qualifies "
        "(z coverage 120 mm, slices 5 mm apart)"
    )


def test_rule_checks_its_values() -> None:
    with pytest.raises(ValueError, match="min_z_coverage_mm"):
        SelectionRule(min_z_coverage_mm=0)
    with pytest.raises(ValueError, match="max_slice_spacing_mm"):
        SelectionRule(max_slice_spacing_mm=float("nan"))
    for preference in ((), ("thinnest", "thinnest"), ("newest",)):
        with pytest.raises(ValueError, match="reconstruction_preference"):
            SelectionRule(reconstruction_preference=preference)  # type: ignore[arg-type]


# -- several qualifying series ---------------------------------------------------------------


def test_the_series_with_more_slices_comes_first_the_others_follow(study: Study) -> None:
    thick = study.other("thick", 21)
    thin = study.axial()
    middle = study.other("middle", 22)
    for items in (thick + thin + middle, middle + thin + thick):
        selection = select_series(items, rule=covering(20))
        assert selection is not None
        assert [(c.SeriesInstanceUID, c.slices) for c in selection.candidates] == [
            (study.ct.SeriesInstanceUID, SLICES),
            (uid_of(middle), 22),
            (uid_of(thick), 21),
        ]
        assert selection.skipped == ()  # the others are fallbacks, not skipped
        assert selection.candidate(uid_of(thick)).files == tuple(p for p, _ in thick)


def test_tie_is_broken_by_series_uid_whatever_the_input_order(study: Study) -> None:
    a = study.other("a", SLICES)
    b = study.other("b", SLICES)
    expected = sorted([uid_of(a), uid_of(b)], reverse=True)
    assert uid_of(a) != uid_of(b)
    for items in (a + b, b + a):
        selection = select_series(items, rule=covering(20))
        assert selection is not None
        assert [c.SeriesInstanceUID for c in selection.candidates] == expected


# -- several reconstructions of one acquisition ----------------------------------------------


def test_of_two_kernels_the_soft_one_is_analysed_by_default(study: Study) -> None:
    soft = stretched(study, "soft", 40, 5.0, SeriesNumber=2, ConvolutionKernel="B30f")
    sharp = stretched(study, "sharp", 40, 5.0, SeriesNumber=3, ConvolutionKernel="B70f")
    sharp_uid = uid_of(sharp)
    for items in (soft + sharp, sharp + soft):
        selection = select_series(items)
        assert selection is not None
        assert [c.SeriesInstanceUID for c in selection.candidates] == [uid_of(soft)]
        assert reasons(selection) == {
            sharp_uid: "another reconstruction of the same acquisition was chosen (series 2: "
            "softer kernel, B30f (soft) vs B70f (sharp))"
        }
        assert selection.choice == (
            "series 2 (5 mm, B30f, soft kernel): softest-kernel of 2 reconstructions of one "
            "acquisition (z coverage 200 mm, slices 5 mm apart)"
        )
    sharp_first = SelectionRule(reconstruction_preference=("sharp_kernel", "thinnest"))
    assert chosen(select_series(soft + sharp, rule=sharp_first)).SeriesInstanceUID == sharp_uid


def test_of_two_thicknesses_the_thinnest_is_analysed_by_default(study: Study) -> None:
    thin = stretched(study, "thin", 120, 1.25, SeriesNumber=2)  # 150 mm
    thick = stretched(study, "thick", 40, 5.0, SeriesNumber=3)  # 200 mm, more coverage
    selection = select_series(thick + thin)
    assert selection is not None
    assert [c.SeriesInstanceUID for c in selection.candidates] == [uid_of(thin)]
    assert reasons(selection)[uid_of(thick)] == (
        "another reconstruction of the same acquisition was chosen (series 2: thinner slices, "
        "1.25 mm vs 5 mm)"
    )
    assert selection.choice.startswith(
        "series 2 (1.25 mm, STANDARD, soft kernel): thinnest of 2 reconstructions of one "
        "acquisition"
    )
    thickest = SelectionRule(reconstruction_preference=("thickest",))
    assert chosen(select_series(thin + thick, rule=thickest)).SeriesInstanceUID == uid_of(thick)


def test_thickness_before_kernel_and_three_reconstructions(study: Study) -> None:
    thin_sharp = stretched(study, "a", 160, 1.0, SeriesNumber=4, ConvolutionKernel="LUNG")
    thin_soft = stretched(study, "b", 160, 1.0, SeriesNumber=5, ConvolutionKernel="STANDARD")
    thick_soft = stretched(study, "c", 32, 5.0, SeriesNumber=6, ConvolutionKernel="STANDARD")
    selection = select_series(thick_soft + thin_sharp + thin_soft)
    assert selection is not None
    assert chosen(selection).SeriesInstanceUID == uid_of(thin_soft)
    why = reasons(selection)
    assert why[uid_of(thin_sharp)].endswith(
        "(series 5: softer kernel, STANDARD (soft) vs LUNG (sharp))"
    )
    assert why[uid_of(thick_soft)].endswith("(series 5: thinner slices, 1 mm vs 5 mm)")
    assert "thinnest, then softest-kernel of 3 reconstructions" in selection.choice


def test_other_reconstructions_can_be_kept_as_fallbacks(study: Study) -> None:
    soft = stretched(study, "soft", 40, 5.0, ConvolutionKernel="B30f")
    sharp = stretched(study, "sharp", 40, 5.0, ConvolutionKernel="B70f")
    rule = SelectionRule(fallback_to_other_reconstructions=True)
    selection = select_series(sharp + soft, rule=rule)
    assert selection is not None and selection.skipped == ()
    assert [c.SeriesInstanceUID for c in selection.candidates] == [uid_of(soft), uid_of(sharp)]


def test_other_acquisitions_are_not_reconstructions(study: Study) -> None:
    soft = stretched(study, "soft", 40, 5.0, ConvolutionKernel="B30f")
    # Another frame of reference (the patient moved), or another part of the body.
    moved = stretched(
        study, "moved", 40, 5.0, ConvolutionKernel="B70f", FrameOfReferenceUID="1.2.3"
    )
    below = stretched(study, "below", 40, 5.0, ConvolutionKernel="B70f")
    for _, ds in below:
        x, y, z = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, f"{float(z) - 180:g}"]  # overlaps by 20 mm only
    for other in (moved, below):
        selection = select_series(soft + other)
        assert selection is not None and selection.skipped == ()
        assert [c.SeriesInstanceUID for c in selection.candidates] == [
            uid_of(soft),
            uid_of(other),
        ]
        assert "first of 2 qualifying series in preference order" in selection.choice


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ("STANDARD", "soft"),
        ("SOFT", "soft"),
        ("LUNG", "sharp"),
        ("BONE", "sharp"),
        ("BONEPLUS", "sharp"),
        ("B30f", "soft"),
        ("Br40d", "soft"),
        ("I31f", "soft"),
        ("B70f", "sharp"),
        ("Bl57d", "sharp"),
        ("B", "soft"),
        ("C", "soft"),
        ("L", "sharp"),
        ("YA", "soft"),
        ("YB", "soft"),
        ("YD", "sharp"),
        ("FC03", "soft"),
        ("FC18", "soft"),
        ("FC51", "sharp"),
        ("FC86", "sharp"),
        ("", "unknown"),
        ("MYSTERY", "unknown"),
    ],
)
def test_kernel_class(kernel: str, expected: str) -> None:
    assert kernel_class(kernel) == expected
    ds = Dataset()
    if kernel:
        ds.ConvolutionKernel = kernel
    assert kernel_class(ds) == expected


def test_kernel_class_reads_the_first_of_several_values() -> None:
    ds = Dataset()
    ds.ConvolutionKernel = ["Br64d", "3"]  # Siemens: kernel and strength
    assert kernel_class(ds) == "sharp"


def test_series_name_never_shows_the_uid() -> None:
    ds = Dataset()
    assert series_name(ds, UID_BASE + "5") == f"series {uid_tag(UID_BASE + '5')}"
    assert series_name(ds) == "images without a Series Instance UID"
    ds.SeriesNumber = 4
    ds.SeriesDescription = "Thorax  1.0  B70f"
    ds.ConvolutionKernel = "B70f"
    assert series_name(ds, UID_BASE + "5") == "series 4 (Thorax 1.0 B70f)"


def test_the_configuration_gives_the_rule_and_refuses_min_slices() -> None:
    from radfusion.config import ConfigError, parse_config

    assert SelectionRule.from_settings(parse_config({}).apps.lung_ct) == SelectionRule()
    settings = parse_config(
        {
            "apps": {
                "lung_ct": {
                    "min_z_coverage_mm": 200,
                    "max_slice_spacing_mm": 3,
                    "reconstruction_preference": ["sharp_kernel"],
                    "fallback_to_other_reconstructions": True,
                }
            }
        }
    ).apps.lung_ct
    assert SelectionRule.from_settings(settings) == SelectionRule(200, 3, ("sharp_kernel",), True)
    with pytest.raises(ConfigError) as err:
        parse_config({"apps": {"lung_ct": {"min_slices": 50}}})
    assert "apps.lung_ct: min_slices was replaced by min_z_coverage_mm" in str(err.value)
    with pytest.raises(ConfigError, match="reconstruction_preference"):
        parse_config({"apps": {"lung_ct": {"reconstruction_preference": ["thinnest"] * 2}}})


LEGACY_CONVERTED_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"


def _enhanced(
    study: Study, path: Path, *, sop_class: str, per_frame_orientation: bool = False
) -> Path:
    """The axial series as one multi-frame image (highdicom's legacy conversion) of
    ``sop_class``; optionally with Plane Orientation in each frame's functional groups."""
    datasets = [pydicom.dcmread(f) for f in study.ct.files]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=UID_BASE + "1",
        series_number=3,
        sop_instance_uid=UID_BASE + "2",
        instance_number=1,
    )
    assert enhanced.SOPClassUID == LEGACY_CONVERTED_ENHANCED_CT
    enhanced.SOPClassUID = sop_class
    enhanced.file_meta.MediaStorageSOPClassUID = sop_class
    if per_frame_orientation:
        shared = enhanced.SharedFunctionalGroupsSequence[0]
        orientation = shared.PlaneOrientationSequence
        del shared.PlaneOrientationSequence
        for item in enhanced.PerFrameFunctionalGroupsSequence:
            item.PlaneOrientationSequence = copy.deepcopy(orientation)
    enhanced.save_as(path)
    return path


def test_enhanced_ct_counts_frames_as_slices(study: Study, tmp_path: Path) -> None:
    path = _enhanced(study, tmp_path / "enhanced.dcm", sop_class=ENHANCED_CT_IMAGE_STORAGE)
    headers = read_headers([path])
    assert "ImageOrientationPatient" not in headers[0][1]  # only in the functional groups
    short = study.other("short", 20)  # more files, fewer slices
    selection = select_series(short + headers, rule=covering(20))
    assert selection is not None
    assert [(c.SeriesInstanceUID, c.slices) for c in selection.candidates] == [
        (UID_BASE + "1", SLICES),
        (uid_of(short), 20),
    ]
    assert selection.preferred.files == (path,)


def test_enhanced_ct_coverage_counts_frames(study: Study, tmp_path: Path) -> None:
    path = _enhanced(study, tmp_path / "enhanced.dcm", sop_class=ENHANCED_CT_IMAGE_STORAGE)
    refused(select_series(read_headers([path]), rule=covering(SLICES + 1)))
    assert chosen(select_series(read_headers([path]), rule=covering(SLICES))).slices == SLICES


def test_legacy_converted_enhanced_ct_qualifies(
    study: Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _enhanced(study, tmp_path / "legacy.dcm", sop_class=LEGACY_CONVERTED_ENHANCED_CT)
    assert assemble_volume([pydicom.dcmread(path)]).shape == (SLICES, 64, 64)
    with caplog.at_level(logging.INFO, logger="radfusion.operators.series_selector"):
        selection = select_series(read_headers([path]), rule=covering(20))
    assert selection is not None, caplog.text


def test_per_frame_orientation_enhanced_ct_is_a_readable_volume(
    study: Study, tmp_path: Path
) -> None:
    path = _enhanced(
        study,
        tmp_path / "enhanced.dcm",
        sop_class=ENHANCED_CT_IMAGE_STORAGE,
        per_frame_orientation=True,
    )
    volume = assemble_volume([pydicom.dcmread(path)])
    assert volume.shape == (SLICES, 64, 64)


def test_enhanced_ct_with_per_frame_orientation_qualifies(
    study: Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _enhanced(
        study,
        tmp_path / "enhanced.dcm",
        sop_class=ENHANCED_CT_IMAGE_STORAGE,
        per_frame_orientation=True,
    )
    with caplog.at_level(logging.INFO, logger="radfusion.operators.series_selector"):
        selection = select_series(read_headers([path]), rule=covering(20))
    assert selection is not None, caplog.text


def test_constants_are_the_ct_storage_classes() -> None:
    assert pydicom.uid.CTImageStorage == CT_IMAGE_STORAGE
    assert pydicom.uid.EnhancedCTImageStorage == ENHANCED_CT_IMAGE_STORAGE


# -- stray images inside a good series -------------------------------------------------------

TILTED_20 = ["1", "0", "0", "0", "0.9396926208", "0.3420201433"]  # axial enough, but different


def stray(study: Study, name: str, *, like: int = 5, **changes: object) -> Item:
    """An image in the axial series (same Series Instance UID) made from image ``like``, with
    its own SOP Instance UID and ``changes`` (None deletes the attribute)."""
    ds = copy.deepcopy(study.headers[like][1])
    ds.SOPInstanceUID = f"{UID_BASE}{zlib.crc32(name.encode()) + 1}.1"
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return Path(f"/study/ct/{name}.dcm"), ds


def test_one_localizer_image_inside_the_series_is_left_out(
    study: Study, caplog: pytest.LogCaptureFixture
) -> None:
    scout = stray(
        study,
        "scout",
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=CORONAL,
        Rows=512,
    )
    axial = study.axial()
    with caplog.at_level(logging.INFO, logger="radfusion.operators.series_selector"):
        selection = select_series([*axial[:10], scout, *axial[10:]], rule=covering(SLICES))
    series = chosen(selection)
    assert series.SeriesInstanceUID == study.ct.SeriesInstanceUID
    assert series.slices == SLICES
    assert series.files == tuple(study.ct.files)  # the scout is not among them
    assert series.dropped == (("localizer (scout/topogram)", 1),)
    assert "left out 1 of 25 image(s): localizer (scout/topogram) (1)" in caplog.text
    assert uid_tag(study.ct.SeriesInstanceUID) in caplog.text
    assert study.ct.SeriesInstanceUID not in caplog.text


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ImageOrientationPatient": CORONAL}, "not axial (slice normal 90 degrees"),
        ({"ImageOrientationPatient": TILTED_20}, "orientation differs from the rest"),
        ({"Rows": 32}, "matrix size (Rows/Columns) differs from the rest"),
        ({"Columns": 128}, "matrix size (Rows/Columns) differs from the rest"),
        ({"PixelSpacing": ["2.5", "2.5"]}, "pixel spacing differs from the rest"),
        ({"PixelSpacing": None}, "pixel spacing differs from the rest"),
        ({"SOPClassUID": SECONDARY_CAPTURE}, "not CT image storage"),
        ({"SOPClassUID": None}, "not CT image storage"),
        ({"SOPInstanceUID": None}, "no SOP Instance UID"),
        ({"ImageType": "LOCALIZER"}, "localizer (scout/topogram)"),  # one value, not a list
        ({"Modality": None}, "modality missing, not CT"),
        ({"Rows": None}, "no image pixel data"),
        ({"ImageOrientationPatient": ["1", "0", "0", "0", "1"]}, "no valid Image Orientation"),
        ({"ImageOrientationPatient": ["0"] * 6}, "no valid Image Orientation"),
        ({"ImageOrientationPatient": None}, "no valid Image Orientation"),
        ({"ImagePositionPatient": None}, "no valid Image Position"),
    ],
    ids=[
        "coronal-reformat",
        "other-orientation",
        "rows",
        "columns",
        "pixel-spacing",
        "no-pixel-spacing",
        "secondary-capture",
        "no-sop-class",
        "no-sop-instance",
        "image-type-single-value",
        "no-modality",
        "no-rows",
        "five-direction-cosines",
        "degenerate-orientation",
        "no-orientation",
        "no-position",
    ],
)
def test_a_stray_image_is_left_out_with_its_reason(
    study: Study, changes: dict[str, object], reason: str
) -> None:
    odd = stray(study, "odd", **changes)
    for items in ([*study.axial(), odd], [odd, *study.axial()]):
        series = chosen(select_series(items, rule=covering(SLICES)))
        assert series.SeriesInstanceUID == study.ct.SeriesInstanceUID
        assert series.slices == SLICES and odd[0] not in series.files
        [(why, count)] = series.dropped
        assert why.startswith(reason) and count == 1


def test_the_same_instance_twice_is_kept_once(study: Study) -> None:
    axial = study.axial()
    again = (Path("/study/ct/resent.dcm"), copy.deepcopy(axial[3][1]))
    series = chosen(select_series([*axial, again], rule=covering(SLICES)))
    assert series.files == tuple(study.ct.files)
    assert series.dropped == (("duplicate SOP Instance UID (the same image twice)", 1),)


def test_a_minority_with_another_matrix_is_left_out(study: Study) -> None:
    axial = study.axial()
    for _, ds in axial[:4]:  # e.g. a zoomed recon sharing the Series Instance UID
        ds.Rows = ds.Columns = 128
    series = chosen(select_series(axial, rule=covering(20)))
    assert series.slices == SLICES - 4
    assert series.files == tuple(study.ct.files[4:])
    assert series.dropped == (
        ("matrix size (Rows/Columns) differs from the rest of the series", 4),
    )


def test_two_equal_stacks_in_one_series_skip_it(study: Study) -> None:
    axial = study.axial()
    for _, ds in axial[::2]:
        ds.ImageOrientationPatient = TILTED_20
    fallback = study.other("fallback", 5)
    selection = select_series(axial + fallback, rule=covering(5))
    assert chosen(selection).SeriesInstanceUID == uid_of(fallback)
    assert selection is not None
    assert reasons(selection)[study.ct.SeriesInstanceUID] == (
        "images form 2 stacks with different orientation, matrix or pixel spacing, "
        "the largest two of 12 slices each"
    )


def test_too_few_slices_left_after_leaving_images_out_skips_the_series(study: Study) -> None:
    scouts = [
        stray(study, f"scout{i}", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]) for i in (1, 2)
    ]
    axial = study.axial()[:21]
    # What remains after leaving the scouts out is what counts: 21 slices.
    series = chosen(select_series([*axial, *scouts], rule=covering(21)))
    assert series.slices == 21 and series.dropped == (("localizer (scout/topogram)", 2),)
    fallback = study.other("fallback", 22)
    selection = select_series([*axial, *scouts, *fallback], rule=covering(22))
    assert chosen(selection).SeriesInstanceUID == uid_of(fallback)
    assert selection is not None
    assert reasons(selection)[study.ct.SeriesInstanceUID] == (
        "z coverage 105 mm < 110 mm (21 slice(s) 5 mm apart) after leaving out 2 image(s)"
    )


def test_a_series_of_nothing_usable_is_named_by_what_most_images_are(study: Study) -> None:
    mixed = study.other("mixed", 4, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    mixed[0][1].SOPClassUID = SECONDARY_CAPTURE
    selection = select_series(mixed + study.axial(), rule=covering(20))
    assert selection is not None
    assert reasons(selection)[uid_of(mixed)] == "localizer (scout/topogram)"


def test_missing_optional_attributes_do_not_matter(study: Study) -> None:
    axial = study.axial()
    for _, ds in axial:
        for keyword in ("SliceThickness", "ImageType", "SeriesNumber", "SeriesDescription"):
            delattr(ds, keyword)
    series = chosen(select_series(axial, rule=covering(SLICES)))
    assert series.slices == SLICES and series.dropped == ()
    assert series.SeriesNumber is None
    assert series.label == f"series {uid_tag(study.ct.SeriesInstanceUID)} ({SLICES} slices)"


def test_label_names_the_series_by_number_not_uid(study: Study) -> None:
    series = chosen(select_series(study.axial(), rule=covering(SLICES)))
    assert series.SeriesNumber == 2
    assert series.label == f"series 2 ({SLICES} slices)"
    assert series.label.isascii()


def test_selection_needs_a_candidate_and_names_unknown_series_by_tag(study: Study) -> None:
    with pytest.raises(ValueError, match="candidates"):
        SeriesSelection((), ())
    selection = select_series(study.axial(), rule=covering(SLICES))
    assert selection is not None
    with pytest.raises(KeyError) as err:
        selection.candidate(UID_BASE + "404")
    assert uid_tag(UID_BASE + "404") in str(err.value) and UID_BASE not in str(err.value)
