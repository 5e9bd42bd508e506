"""End-to-end fixtures: the marketplace as real processes (gunicorn, Celery worker and beat) and real
agent processes, all on the pytest-django test database so tests can also look at the rows."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import torch
from django.db import connection
from safetensors.torch import save as save_safetensors

from demo.cluster import ROOT, Cluster
from marketplace.core.tensors import array_file_bytes
from worker_agent.architectures import resolve

pytestmark = pytest.mark.e2e


def _database_url() -> str:
    conf = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{conf['NAME']}"
    user = quote(conf.get("USER") or "")
    password = f":{quote(conf['PASSWORD'])}" if conf.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{conf.get('HOST') or '127.0.0.1'}:{conf.get('PORT') or 5432}/{conf['NAME']}"


@pytest.fixture
def cluster_extra_env() -> dict[str, str]:
    """More settings for the servers, from a fixture (the browser tests' chain); none here."""
    return {}


@pytest.fixture
def cluster(transactional_db, tmp_path, settings, request, cluster_extra_env) -> Cluster:
    """gunicorn + Celery worker + beat against the test database; stopped by PID, always.
    `@pytest.mark.cluster_env(NAME="value")` adds settings for the servers."""
    settings.IDLEGRID_ARTIFACT_DIR = tmp_path / "artifacts"
    settings.IDLEGRID_SIGNING_KEY_DIR = tmp_path / "keys"  # one keyring for the servers and this process
    env = {
        "DATABASE_URL": _database_url(),
        "IDLEGRID_ARTIFACT_DIR": str(settings.IDLEGRID_ARTIFACT_DIR),
        "IDLEGRID_SIGNING_KEY_DIR": str(settings.IDLEGRID_SIGNING_KEY_DIR),
        "IDLEGRID_LEASE_SECONDS": "6",
        "IDLEGRID_SWEEP_SECONDS": "1",
        "IDLEGRID_LEASE_RETRY_AFTER": "1",
        # Known-answer units are random by design; tests that exercise them turn them on with the marker.
        "IDLEGRID_KNOWN_ANSWER_RATE": "0",
    }
    env.update(cluster_extra_env)
    marker = request.node.get_closest_marker("cluster_env")
    env.update(marker.kwargs if marker else {})
    running = Cluster(var_dir=tmp_path / "cluster", env_overrides=env)
    running.var_dir.mkdir(parents=True)
    if settings.CELERY_BROKER_URL.startswith("redis"):
        # a previous test's tasks name rows that no longer exist
        subprocess.run([sys.executable, "-m", "celery", "-A", "marketplace", "purge", "-f"], cwd=ROOT,
                       env=running.env, capture_output=True, timeout=60, check=True)
    try:
        running.start_services()
        yield running
    finally:
        running.stop_all()


class Client:
    """A person's API client (token auth)."""

    def __init__(self, cluster: Cluster, username: str) -> None:
        self.token = cluster.account(username)
        self.username = username
        self.http = httpx.Client(base_url=cluster.url, headers={"Authorization": f"Token {self.token}"}, timeout=60)

    def upload(self, data: bytes) -> str:
        response = self.http.post("/api/v1/artifacts/", content=data, headers={"Content-Type": "application/octet-stream"})
        assert response.status_code in (200, 201), response.text
        return response.json()["sha256"]

    def job(self, job_id: int) -> dict:
        return self.http.get(f"/api/v1/jobs/{job_id}/").json()

    def wait_for_job(self, job_id: int, cluster: Cluster, *, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in ("completed", "failed"):
                return job
            time.sleep(0.3)
        logs = "\n".join(f"--- {p.name}\n{p.log_tail(15)}" for p in cluster.processes)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s: {self.job(job_id)}\n{logs}")


MLP = {"architecture": "mlp", "config": {"in_features": 16, "hidden": [32], "out_features": 4}}


def mlp_job(client: Client, *, rows: int = 40, rows_per_unit: int = 10, batch_size: int = 5, seed: int = 0,
            **spec_extra):
    """Submit an MLP inference job; return (job_id, expected logits computed locally the agents' way).
    `spec_extra` adds spec fields (unit_timeout_seconds, say)."""
    torch.manual_seed(seed)
    arch, config = resolve(MLP["architecture"], MLP["config"])
    model = arch.build(config).eval()
    x = np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)
    weights = client.upload(save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}))
    dataset = client.upload(array_file_bytes(x, name="x"))
    spec = {"model": {**MLP, "weights": weights}, "dataset": dataset, "rows_per_unit": rows_per_unit,
            "batch_size": batch_size, **spec_extra}
    _fund(client)
    response = client.http.post("/api/v1/jobs/", json={"kind": "inference", "spec": spec})
    assert response.status_code == 201, response.text
    with torch.inference_mode():
        expected = torch.cat([model(torch.from_numpy(x[i : i + batch_size])) for i in range(0, rows, batch_size)])
    return response.json()["id"], expected.numpy()


def _fund(client: Client) -> None:
    """The submitter's escrow comes from a balance: granted through the ledger, on the shared test database."""
    import uuid

    from django.contrib.auth import get_user_model

    from marketplace.ledger.grants import balance_grant

    balance_grant(user=get_user_model().objects.get(username=client.username), amount=10**24, actor="tests",
                  reason="e2e submitter funds", idempotency_key=uuid.uuid4().hex)


def enrolled(cluster: Cluster, owner: Client, name: str) -> Path:
    return cluster.enroll_agent(name=name, owner_token=owner.token)
