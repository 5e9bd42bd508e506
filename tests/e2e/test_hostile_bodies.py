"""One anonymous request must not kill a web worker: a 200 KB JSON body nested 100,000 deep, sent to a real
gunicorn, is answered 400 in the API's error shape by the same worker process that was serving before.

Before the fix this body killed the sync worker inside json.loads (SIGSEGV: py_ecc, imported through
eth_account when the URLconf loads, had raised the recursion limit to 100000, so the C decoder ran off
the C stack); the client saw the connection close without an answer and gunicorn booted a new worker.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from demo.cluster import Cluster
from tests.e2e.conftest import _database_url

pytestmark = pytest.mark.e2e

BOMB = b"[" * 100_000 + b"]" * 100_000


def children(pid: int) -> set[int]:
    """The processes whose parent is pid, from /proc (gunicorn's master forks its workers)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(after_name[1]) == pid:  # the fields after "pid (name)" are state, ppid, ...
            found.add(int(stat.parent.name))
    return found


@pytest.fixture
def web(transactional_db, tmp_path, settings) -> Cluster:
    """gunicorn alone, one sync worker (so every request meets the same one), on a free loopback port."""
    settings.IDLEGRID_ARTIFACT_DIR = tmp_path / "artifacts"
    settings.IDLEGRID_SIGNING_KEY_DIR = tmp_path / "keys"
    running = Cluster(var_dir=tmp_path / "cluster", env_overrides={
        "DATABASE_URL": _database_url(),
        "IDLEGRID_ARTIFACT_DIR": str(settings.IDLEGRID_ARTIFACT_DIR),
        "IDLEGRID_SIGNING_KEY_DIR": str(settings.IDLEGRID_SIGNING_KEY_DIR),
    })
    running.var_dir.mkdir(parents=True)
    try:
        running.start("web", [sys.executable, "-m", "gunicorn", "marketplace.wsgi", "--bind",
                              f"127.0.0.1:{running.port}", "--workers", "1", "--timeout", "60"])
        running.wait_healthy()
        yield running
    finally:
        running.stop_all()


@pytest.mark.parametrize("path", ["/api/v1/agent/enroll", "/api/v1/auth/token/"])
def test_a_body_nested_100000_deep_is_a_400_and_the_worker_survives(web: Cluster, path: str) -> None:
    (master,) = web.processes
    workers = children(master.popen.pid)
    assert len(workers) == 1, workers

    response = httpx.post(f"{web.url}{path}", content=BOMB, headers={"Content-Type": "application/json"},
                          timeout=60)

    assert response.status_code == 400, response.text[:500]
    assert response.json()["error"]["code"] == "invalid"
    assert "nested deeper than 32" in response.json()["error"]["message"]
    assert children(master.popen.pid) == workers, master.log_tail()
    assert httpx.get(f"{web.url}/healthz", timeout=10).status_code == 200
    assert children(master.popen.pid) == workers
    assert master.log_tail(200).count("Booting worker") == 1, master.log_tail(200)  # no replacement was booted


def test_an_unknown_api_path_is_json_through_gunicorn(web: Cluster) -> None:
    response = httpx.get(f"{web.url}/api/v1/no-such-endpoint", timeout=10)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
