"""``forward``: a DICOM router's basic job, and the smallest complete app.

It returns the study's own instances as its results, so the service exports them unchanged to
the configured destinations. Useful on its own (route some studies to a second archive) and as
a check of the receive → route → export path without any model.
"""

from __future__ import annotations

from pathlib import Path

from radfusion.apps.registry import AppResult, StudyInput


class ForwardApp:
    name = "forward"

    def __init__(self, config: object) -> None:
        pass

    def run(self, study: StudyInput, work_dir: Path) -> AppResult:
        return AppResult(files=study.files)
