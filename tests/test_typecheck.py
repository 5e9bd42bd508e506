"""The strictly typed packages stay strictly typed: mypy, configured in pyproject.toml ([tool.mypy]: which
files, how strict each package is), must find nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_error_in_the_strictly_typed_packages() -> None:
    # The venv's interpreter, so mypy sees the installed packages (torch ships its types); run from the
    # root so it reads pyproject.toml. Its incremental cache (.mypy_cache/) makes a second run take seconds.
    result = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )

    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
    assert "Success: no issues found" in result.stdout
