"""The agent is its own installable thing: the base distribution carries no marketplace dependency,
and importing the agent's modules loads neither Django nor torch."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = {"django", "djangorestframework", "celery", "web3", "psycopg", "gunicorn", "drf-spectacular"}


def _names(requirements: list[str]) -> set[str]:
    return {req.split("[")[0].split("<")[0].split(">")[0].split("=")[0].split(";")[0].strip().lower()
            for req in requirements}


def test_the_base_distribution_is_the_agent_without_server_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not _names(project["dependencies"]) & SERVER_ONLY
    assert {"django", "celery"} <= _names(project["optional-dependencies"]["marketplace"])
    assert project["scripts"]["idlegrid-agent"] == "worker_agent.cli:main"


def test_importing_every_agent_module_loads_no_django_and_no_torch():
    modules = sorted(
        "worker_agent." + ".".join(p.relative_to(ROOT / "worker_agent").with_suffix("").parts)
        for p in (ROOT / "worker_agent").rglob("*.py")
        if p.name not in {"__main__.py", "child.py"}
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name.removesuffix('.__init__'))\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(loaded & {'django', 'celery', 'web3', 'marketplace', 'torch'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(modules) > 5
    assert done.stdout.strip() == "[]"
