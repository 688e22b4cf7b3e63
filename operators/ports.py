"""The part of an operator's ``compute`` context that radfusion uses: the ports.

Holoscan (under MONAI Deploy) passes its ``InputContext`` and ``OutputContext``, which carry no
type information; these protocols describe the two calls the operators make on them.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["InputPorts", "OutputPorts", "Timed"]


class InputPorts(Protocol):
    """Holoscan's ``InputContext``, as the operators use it."""

    def receive(self, name: str) -> Any:
        """What the upstream operator emitted on port ``name`` (None when nothing was)."""
        ...


class OutputPorts(Protocol):
    """Holoscan's ``OutputContext``, as the operators use it."""

    def emit(self, data: object, name: str) -> None:
        """Send ``data`` on port ``name``."""
        ...


class Timed(Protocol):
    """An operator that keeps the seconds its stages took in its last run (stage → seconds),
    for the app's result and the benchmarks."""

    timings: dict[str, float]
