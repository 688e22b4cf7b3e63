"""radfusion's error vocabulary: one base, and the kinds that decide what happens next.

- :class:`Unavailable`: a service the work needs (PACS, FHIR server, token endpoint, Triton) is
  down, busy or unreachable. The work may succeed later: the service queues the job again
  (``jobs.retry``) instead of giving up.
- :class:`DatasetError`: a received dataset cannot be accepted; it carries the DIMSE status the
  node answers with.
- Anything else derived from :class:`RadfusionError` is permanent for that input: retrying
  will not help (a refusal, a configuration problem, a malformed series).

What a caller does is decided by the type, never by the message's text.
"""

from __future__ import annotations

__all__ = ["DatasetError", "RadfusionError", "Unavailable"]


class RadfusionError(Exception):
    """Base of every error radfusion raises on purpose."""


class Unavailable(RadfusionError):
    """A service the work needs is down, busy or unreachable: try again later."""


class DatasetError(RadfusionError, ValueError):
    """A received dataset cannot be accepted.

    Args:
        message: why, without PHI.
        status: the DIMSE status it maps to (PS3.4 Annex B.2.3; default 0xC000, Error:
            Cannot Understand).
    """

    def __init__(self, message: str, *, status: int = 0xC000) -> None:
        super().__init__(message)
        self.status = status
