"""The apps radfusion can run, by the name routing rules use: name → ``module:factory``.

Apart from :mod:`radfusion.apps.registry` so that the configuration can check the names its
rules use without importing any app (apps sit above the configuration). The factories are
imported only when an app is used, so a heavy app (torch, holoscan) costs nothing to processes
that never run it. A new app is one line here.
"""

from __future__ import annotations

__all__ = ["APPS", "known_apps"]

APPS: dict[str, str] = {
    "forward": "radfusion.apps.forward.app:ForwardApp",
    "lung-ct": "radfusion.apps.lung_ct.app:LungCTRunner",
}


def known_apps() -> set[str]:
    """Names that routing rules may use."""
    return set(APPS)
