"""mypy where the money and the verification live (docs/architecture.md): marketplace/ledger and
marketplace/workunits strictly, the marketplace modules they import with mypy's default options
(pyproject.toml, [tool.mypy] and its overrides)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRICT_PACKAGES = ["marketplace.ledger.*", "marketplace.workunits.*"]
# The per-module halves of --strict (`strict = true` is global-only); its global halves are in [tool.mypy].
STRICT_OPTIONS = {
    "disallow_any_generics": True, "disallow_subclassing_any": True, "disallow_untyped_calls": True,
    "disallow_untyped_defs": True, "disallow_incomplete_defs": True, "check_untyped_defs": True,
    "disallow_untyped_decorators": True, "warn_unused_ignores": True, "warn_return_any": True,
    "implicit_reexport": False, "strict_equality": True, "extra_checks": True,
}


def test_the_ledger_and_the_work_units_type_check():
    # django-stubs' plugin imports marketplace.settings: with nothing configured, SQLite under var/.
    # .mypy_cache/ makes a run after the first take seconds (the first: about a minute).
    run = subprocess.run([sys.executable, "-m", "mypy", "marketplace/ledger", "marketplace/workunits"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success: no issues found" in run.stdout, run.stdout


def test_the_ledger_and_the_work_units_are_checked_strictly():
    overrides = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["overrides"]
    strict = [o for o in overrides if o["module"] == STRICT_PACKAGES]
    assert len(strict) == 1, "one override names marketplace.ledger.* and marketplace.workunits.*"
    assert {k: v for k, v in strict[0].items() if k != "module"} == STRICT_OPTIONS
    silenced = [o for o in overrides if o.get("ignore_errors") or o.get("follow_imports") in ("silent", "skip")]
    for override in silenced:
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        assert not [m for m in modules if m.startswith(("marketplace.ledger", "marketplace.workunits"))], modules
