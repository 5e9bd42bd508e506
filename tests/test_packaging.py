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


def test_the_client_extra_and_the_idlegrid_command_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    client = _names(project["project"]["optional-dependencies"]["client"])
    assert {"httpx", "rich"} <= client
    assert not client & (SERVER_ONLY | {"torch"})
    assert project["project"]["scripts"]["idlegrid"] == "idlegrid_client.cli:main"
    assert "idlegrid_client*" in project["tool"]["setuptools"]["packages"]["find"]["include"]


def test_importing_every_client_module_loads_no_django_no_torch_and_nothing_of_the_marketplace():
    modules = sorted(
        "idlegrid_client." + ".".join(p.relative_to(ROOT / "idlegrid_client").with_suffix("").parts)
        for p in (ROOT / "idlegrid_client").rglob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name.removesuffix('.__init__'))\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(loaded & {'django', 'celery', 'web3', 'marketplace', 'torch', 'numpy'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {"idlegrid_client.cli", "idlegrid_client.client", "idlegrid_client.config"} <= set(modules)
    assert done.stdout.strip() == "[]"
