"""The apps radfusion can run, by the name routing rules use.

An app takes a complete study (its files in the spool) and a work folder, and returns the
result files to export. Apps know nothing of the network: the service hands them studies and
exports what they return.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from radfusion.app_index import APPS as _APPS
from radfusion.app_index import known_apps

if TYPE_CHECKING:
    from radfusion.config import RadfusionConfig

__all__ = ["App", "AppResult", "StudyInput", "get_app", "known_apps"]


@dataclass(frozen=True)
class StudyInput:
    """A complete study as handed to an app."""

    StudyInstanceUID: str
    files: tuple[Path, ...]
    calling_ae_title: str


@dataclass(frozen=True)
class AppResult:
    """What an app made of a study.

    ``files``: the results to export. ``notes``: what the site should know about this study
    without failing it (e.g. "clinical data unavailable, and why"); shown by
    ``radfusion status``; no PHI. ``timings``: seconds per stage, for logs and benchmarks.
    """

    files: tuple[Path, ...]
    notes: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)


class App(Protocol):
    name: str

    def run(self, study: StudyInput, work_dir: Path) -> AppResult:
        """Process ``study``; write results under ``work_dir`` and say what they are.

        Raises any exception to fail the job: it is dead-lettered and can be retried by hand.
        A :class:`radfusion.errors.Unavailable` (a server the app needs is down or busy)
        instead queues the job again after the ``jobs.retry`` waits, and is dead-lettered
        only after the last attempt.
        """
        ...


def get_app(name: str, config: RadfusionConfig) -> App:
    """Instantiate the app called ``name``; raises KeyError naming the known apps."""
    try:
        module, attr = _APPS[name].split(":")
    except KeyError:
        raise KeyError(f"unknown app {name!r} (installed: {', '.join(sorted(_APPS))})") from None
    factory = getattr(importlib.import_module(module), attr)
    app: App = factory(config)
    return app
