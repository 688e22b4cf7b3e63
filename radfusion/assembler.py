"""Study assembly: decide when a study is complete and hand it on, exactly once.

A study is complete when no instance of it has arrived for the quiet period of the AE that
sent it. Completion, routing and job creation are one catalog transaction
(``Catalog.hand_on``), so a crash either leaves the study receiving (it is completed after
restart) or handed on with its jobs — never both, never twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from radfusion.config import RouteRule
from radfusion.integrations.store.catalog import Catalog, Job
from radfusion.logs import RepeatedFailure, uid_tag
from radfusion.routing import SeriesFacts, matching_apps

__all__ = ["StudyAssembler"]

log = logging.getLogger("radfusion.assembler")


class StudyAssembler:
    """Polls the catalog for studies whose quiet period has passed and hands them on.

    Args:
        catalog: the catalog the node records into.
        rules: routing rules; a study no rule matches is kept as 'unrouted' and logged.
        poll_interval_s: how often to look for due studies.
    """

    def __init__(
        self, catalog: Catalog, rules: Sequence[RouteRule], poll_interval_s: float = 0.25
    ) -> None:
        self.catalog = catalog
        self.rules = list(rules)
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _route(self, series: list[SeriesFacts]) -> list[str]:
        return matching_apps(self.rules, series)

    def poll_once(self) -> list[tuple[str, list[Job]]]:
        """Hand on every due study now; returns what was handed on."""
        done = []
        for uid in self.catalog.due_studies():
            jobs = self.catalog.hand_on(uid, self._route)
            if jobs is None:
                continue  # an instance arrived meanwhile; its quiet period restarted
            if jobs:
                log.info(
                    "study %s complete, routed to %s",
                    uid_tag(uid),
                    ", ".join(j.app for j in jobs),
                )
            else:
                log.warning("study %s complete, no routing rule matched: kept", uid_tag(uid))
            done.append((uid, jobs))
        return done

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        failures = RepeatedFailure(log, "study assembly", wait_s=self.poll_interval_s)
        wait = self.poll_interval_s
        while not self._stop.wait(wait):
            try:
                self.poll_once()
            except Exception as err:  # the loop must outlive a bad study or a full disk
                wait = failures.failed(err)
            else:
                failures.succeeded()
                wait = self.poll_interval_s
