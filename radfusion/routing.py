"""Routing rules: which apps run on a complete study.

A rule's ``when`` is a condition tree evaluated against each series of the study; the study
matches when at least one series satisfies it. Written in YAML as::

    when:
      all:                                  # also: any, not
        - Modality: CT                      # equals (case-insensitive, trimmed)
        - BodyPartExamined: [CHEST, LUNG]   # equals one of
        - SeriesDescription: {regex: "(?i)lung|thorax"}
        - slices: {min: 50, max: 2000}      # images in the series (frames for multi-frame)
        - not: {SOPClassUID: 1.2.840.10008.5.1.4.1.1.7}   # no secondary capture
        - CallingAETitle: CT_SCANNER_1

A mapping with several keys means all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "ATTRIBUTES",
    "SERIES_ATTRIBUTES",
    "AllOf",
    "AnyOf",
    "Condition",
    "Equals",
    "Not",
    "Regex",
    "SeriesFacts",
    "SliceRange",
    "parse_condition",
]

SERIES_ATTRIBUTES: Mapping[str, int] = MappingProxyType(
    {
        "Modality": 0x00080060,
        "StationName": 0x00081010,
        "BodyPartExamined": 0x00180015,
        "SeriesDescription": 0x0008103E,
        "StudyDescription": 0x00081030,
        "Manufacturer": 0x00080070,
    }
)
"""Header attributes a rule may test, keyword → tag: the one table of them. The node reads
them from the first instance of each series (every tag must sort before Number of Frames,
(0028,0008), where its header reader stops) and the catalog keeps one column per keyword.
Adding an attribute here is all it takes for a rule to test it."""

ATTRIBUTES = (*SERIES_ATTRIBUTES, "SOPClassUID", "CallingAETitle")
"""Attributes a rule may test. SOPClassUID matches if any instance of the series has it."""


@dataclass(frozen=True)
class SeriesFacts:
    """What routing knows about one received series: ``attributes`` holds the values of
    :data:`SERIES_ATTRIBUTES` (a missing one reads as empty)."""

    attributes: Mapping[str, str] = field(default_factory=dict)
    CallingAETitle: str = ""
    SOPClassUIDs: frozenset[str] = frozenset()
    slices: int = 0

    def values(self, attribute: str) -> tuple[str, ...]:
        if attribute == "SOPClassUID":
            return tuple(self.SOPClassUIDs)
        if attribute == "CallingAETitle":
            return (self.CallingAETitle,)
        return (self.attributes.get(attribute, ""),)


class Condition:
    """A node of a condition tree."""

    def matches(self, series: SeriesFacts) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Equals(Condition):
    attribute: str
    alternatives: tuple[str, ...]

    def matches(self, series: SeriesFacts) -> bool:
        wanted = {a.strip().upper() for a in self.alternatives}
        return any(v.strip().upper() in wanted for v in series.values(self.attribute))


@dataclass(frozen=True)
class Regex(Condition):
    attribute: str
    pattern: re.Pattern[str]

    def matches(self, series: SeriesFacts) -> bool:
        return any(self.pattern.search(v) for v in series.values(self.attribute))


@dataclass(frozen=True)
class SliceRange(Condition):
    minimum: int | None
    maximum: int | None

    def matches(self, series: SeriesFacts) -> bool:
        if self.minimum is not None and series.slices < self.minimum:
            return False
        return self.maximum is None or series.slices <= self.maximum


@dataclass(frozen=True)
class AllOf(Condition):
    parts: tuple[Condition, ...]

    def matches(self, series: SeriesFacts) -> bool:
        return all(p.matches(series) for p in self.parts)


@dataclass(frozen=True)
class AnyOf(Condition):
    parts: tuple[Condition, ...]

    def matches(self, series: SeriesFacts) -> bool:
        return any(p.matches(series) for p in self.parts)


@dataclass(frozen=True)
class Not(Condition):
    part: Condition

    def matches(self, series: SeriesFacts) -> bool:
        return not self.part.matches(series)


def _parse_list(value: Any, where: str) -> tuple[Condition, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of conditions")
    return tuple(parse_condition(v, f"{where}.{i}") for i, v in enumerate(value))


def _parse_one(key: str, value: Any, where: str) -> Condition:
    if key == "all":
        return AllOf(_parse_list(value, where))
    if key == "any":
        return AnyOf(_parse_list(value, where))
    if key == "not":
        return Not(parse_condition(value, where))
    if key == "slices":
        if not isinstance(value, Mapping) or not set(value) <= {"min", "max"} or not value:
            raise ValueError(f"{where}: expected {{min: N, max: N}} (either or both)")
        bounds = {k: value[k] for k in ("min", "max") if k in value}
        for k, v in bounds.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{where}.{k}: expected a non-negative integer, got {v!r}")
        return SliceRange(bounds.get("min"), bounds.get("max"))
    if key not in ATTRIBUTES:
        raise ValueError(
            f"{where}: unknown condition {key!r} (use all, any, not, slices or one of "
            f"{', '.join(ATTRIBUTES)})"
        )
    if isinstance(value, Mapping):
        if set(value) != {"regex"} or not isinstance(value["regex"], str):
            raise ValueError(f"{where}: expected a value, a list of values or {{regex: PATTERN}}")
        try:
            return Regex(key, re.compile(value["regex"]))
        except re.error as err:
            raise ValueError(f"{where}.regex: invalid regular expression: {err}") from None
    alternatives = value if isinstance(value, list) else [value]
    if not alternatives or not all(isinstance(a, str | int | float) for a in alternatives):
        raise ValueError(f"{where}: expected a value or a list of values")
    return Equals(key, tuple(str(a) for a in alternatives))


def parse_condition(data: Any, where: str = "when") -> Condition:
    """Build a condition tree from its YAML form; raises ValueError naming the bad part."""
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{where}: expected a mapping such as {{Modality: CT}}")
    parts = [_parse_one(str(k), v, f"{where}.{k}") for k, v in data.items()]
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def matching_apps(rules: Iterable[Any], series: Iterable[SeriesFacts]) -> list[str]:
    """Apps named by every rule that some series matches, in rule order, without repeats."""
    series = list(series)
    apps: list[str] = []
    for rule in rules:
        if any(rule.when.matches(s) for s in series):
            apps.extend(a for a in rule.apps if a not in apps)
    return apps
