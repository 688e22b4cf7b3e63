"""`.ci/run` is the only thing CI executes: a shell syntax error there fails every commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

CI_RUN = Path(__file__).resolve().parents[2] / ".ci" / "run"


def test_ci_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(CI_RUN)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ci_script_ends_with_the_readme_test_command() -> None:
    lines = [line for line in CI_RUN.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "set -euo pipefail"
    assert lines[-1] == "make test"
