"""The strictly typed packages stay strictly typed: mypy, configured in pyproject.toml ([tool.mypy]: which
files, how strict each package is), must find nothing, and the strict override must not be loosened."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STRICT_MODULES = ["worker_agent", "worker_agent.*", "idlegrid_client", "idlegrid_client.*", "marketplace.ledger.*",
                  "marketplace.workunits.*"]
# The per-module halves of --strict (`strict = true` is global-only); its global halves are in [tool.mypy].
STRICT_OPTIONS = {
    "disallow_any_generics": True, "disallow_subclassing_any": True, "disallow_untyped_calls": True,
    "disallow_untyped_defs": True, "disallow_incomplete_defs": True, "check_untyped_defs": True,
    "disallow_untyped_decorators": True, "warn_unused_ignores": True, "warn_return_any": True,
    "implicit_reexport": False, "strict_equality": True, "extra_checks": True,
}


def test_mypy_finds_no_error_in_the_strictly_typed_packages() -> None:
    # The venv's interpreter, so mypy sees the installed packages (torch ships its types); run from the
    # root so it reads pyproject.toml. django-stubs' plugin imports marketplace.settings: with nothing
    # configured, SQLite under var/. Its incremental cache (.mypy_cache/) makes a second run take seconds.
    result = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False,
    )

    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
    assert "Success: no issues found" in result.stdout


def test_the_agent_the_ledger_and_the_work_units_are_checked_strictly() -> None:
    mypy = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert {"worker_agent", "marketplace/ledger", "marketplace/workunits"} <= set(mypy["files"])
    strict = [o for o in mypy["overrides"] if o["module"] == STRICT_MODULES]
    assert len(strict) == 1, "one override names the strictly typed packages"
    assert {k: v for k, v in strict[0].items() if k != "module"} == STRICT_OPTIONS
    silenced = [o for o in mypy["overrides"] if o.get("ignore_errors") or o.get("follow_imports") in ("silent", "skip")]
    for override in silenced:
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        assert not [m for m in modules if m.startswith(("worker_agent", "marketplace.ledger", "marketplace.workunits"))]
