"""Patient context operator: the selected study's patient context, or why there is none.

Input ``selection`` → output ``context`` (a :class:`ContextOutcome`, or None when nothing is
looked up). It runs beside the image operators (the app's scheduler has a worker for it), so a
FHIR round trip does not delay the images. The lookup itself is the app's (``lookup``, e.g.
the FHIR adapter's provider): this operator knows the header it hands over and what may fail
the study, nothing of FHIR.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pydicom
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset

from radfusion.errors import Unavailable
from radfusion.operators.ports import InputPorts, OutputPorts
from radfusion.operators.series_selector import SeriesSelection
from radfusion.patient_context import ContextOutcome

__all__ = ["ContextLookup", "PatientContextOperator", "look_up"]

log = logging.getLogger("radfusion.operators.patient_context")

ContextLookup = Callable[[Dataset], ContextOutcome]
"""The study's patient context from one of its headers (any instance names the patient).

Raises :class:`radfusion.errors.Unavailable` when the site holds studies until its source is
back; every other way of not finding a context is an outcome with a reason."""


def look_up(lookup: ContextLookup, selection: SeriesSelection | None) -> ContextOutcome | None:
    """The context of the study ``selection`` was made from; None when nothing is analysed (no
    candidate series: no reason to wait for, or fail on, the patient's data then).

    An unexpected error in ``lookup`` is an outcome too, named by its type only (its text may
    hold paths or patient data): under ``imaging-only`` nothing in the lookup may fail the study.

    Raises:
        Unavailable: from ``lookup``: the site holds such studies until the source is back.
    """
    if selection is None or selection.refused:
        return None
    header = _header(selection)
    if header is None:
        return ContextOutcome("no-patient", reason="no instance of the study could be read")
    try:
        return lookup(header)
    except Unavailable:
        raise
    except Exception as err:
        log.warning("patient context lookup failed (%s); imaging only", type(err).__name__)
        return ContextOutcome("refused", reason=f"the lookup failed ({type(err).__name__})")


def _header(selection: SeriesSelection) -> Dataset | None:
    """A header of the preferred series: read when kept, else the first readable file."""
    candidate = selection.preferred
    if candidate.headers:
        return candidate.headers[0]
    for path in candidate.files:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # unreadable: another file will do
            continue
    return None


class PatientContextOperator(Operator):
    """Input ``selection`` → output ``context`` (see the module docstring).

    ``lookup`` None: nothing is looked up and ``context`` is None (the SR then says nothing of
    it). :attr:`timings` holds the lookup's seconds (``patient_context``) after a run.

    Raises (from ``compute``, failing the graph before anything is written):
        Unavailable: from ``lookup``.
    """

    def __init__(
        self, fragment: Fragment, *args: object, lookup: ContextLookup | None, **kw: object
    ) -> None:
        self.lookup = lookup
        self.outcome: ContextOutcome | None = None
        self.timings: dict[str, float] = {}  # this operator's stage seconds, read after a run
        super().__init__(fragment, *args, **kw)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("selection")
        spec.output("context")

    def compute(self, op_input: InputPorts, op_output: OutputPorts, context: object) -> None:
        selection: SeriesSelection | None = op_input.receive("selection")
        if self.lookup is not None:
            started = time.perf_counter()
            self.outcome = look_up(self.lookup, selection)
            self.timings["patient_context"] = time.perf_counter() - started
        op_output.emit(self.outcome, "context")
