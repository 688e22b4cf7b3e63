from __future__ import annotations

from types import SimpleNamespace

import pytest

from radfusion.routing import SeriesFacts, matching_apps, parse_condition

CT_CHEST = SeriesFacts(
    {"Modality": "CT", "BodyPartExamined": "Chest", "SeriesDescription": "Lung 1.0 B70f"},
    SOPClassUIDs=frozenset({"1.2.840.10008.5.1.4.1.1.2"}),
    slices=300,
    CallingAETitle="CT_1",
)
SCOUT = SeriesFacts(
    {"Modality": "CT", "BodyPartExamined": "CHEST", "SeriesDescription": "Topogram 0.6"},
    SOPClassUIDs=frozenset({"1.2.840.10008.5.1.4.1.1.2"}),
    slices=1,
)
SC = SeriesFacts(
    {"Modality": "OT"}, SOPClassUIDs=frozenset({"1.2.840.10008.5.1.4.1.1.7"}), slices=1
)


def test_equals_is_case_insensitive_and_takes_alternatives() -> None:
    assert parse_condition({"BodyPartExamined": ["CHEST", "LUNG"]}).matches(CT_CHEST)
    assert not parse_condition({"Modality": "MR"}).matches(CT_CHEST)


def test_regex_slices_not_any_all() -> None:
    cond = parse_condition(
        {
            "all": [
                {"Modality": "CT"},
                {"slices": {"min": 50, "max": 2000}},
                {"not": {"SeriesDescription": {"regex": "(?i)topogram|scout"}}},
                {"any": [{"CallingAETitle": "CT_1"}, {"CallingAETitle": "CT_2"}]},
            ]
        }
    )
    assert cond.matches(CT_CHEST)
    assert not cond.matches(SCOUT)
    assert parse_condition({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}).matches(SC)
    assert not parse_condition({"slices": {"max": 0}}).matches(SC)


def test_several_keys_mean_all() -> None:
    cond = parse_condition({"Modality": "CT", "slices": {"min": 100}})
    assert cond.matches(CT_CHEST) and not cond.matches(SCOUT)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "expected a mapping"),
        ({"all": []}, "non-empty list"),
        ({"slices": {"min": -1}}, "when.slices.min"),
        ({"slices": {"least": 3}}, "when.slices"),
        ({"SeriesDescription": {"regex": "("}}, "invalid regular expression"),
        ({"SeriesDescription": {"glob": "*"}}, "regex"),
        ({"all": [{"Modality": "CT"}, {"Colour": "red"}]}, "when.all.1.Colour"),
    ],
)
def test_bad_conditions_name_the_part(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_condition(data)


def test_matching_apps_any_series_rule_order_no_repeats() -> None:
    rules = [
        SimpleNamespace(
            when=parse_condition({"Modality": "CT", "slices": {"min": 50}}),
            apps=["lung", "forward"],
        ),
        SimpleNamespace(when=parse_condition({"Modality": "OT"}), apps=["forward", "audit"]),
        SimpleNamespace(when=parse_condition({"Modality": "MR"}), apps=["brain"]),
    ]
    assert matching_apps(rules, [SCOUT, CT_CHEST, SC]) == ["lung", "forward", "audit"]
    assert matching_apps(rules, [SCOUT]) == []


def test_a_rule_can_test_the_station_name() -> None:
    station = SeriesFacts({"Modality": "CT", "StationName": "CT01"}, slices=100)
    assert parse_condition({"StationName": ["CT01", "CT02"]}).matches(station)
    assert not parse_condition({"StationName": "CT01"}).matches(CT_CHEST)
