"""Schemathesis over every operation of the served OpenAPI document, against a live server (gunicorn,
Celery, the test database), once as a submitter and once as an enrolled device: no request it makes may
answer a server error, a status its operation does not document, or a body its schema does not describe.

One worker: hypothesis parses lambdas' source with `ast` while it generates, and on CPython 3.11 two
threads doing that at once can fail with "AST constructor recursion depth mismatch" (seen here with
--workers 2), an error of the tool, not of the API.

Deterministic and bounded (examples, coverage and fuzzing phases, MAX_EXAMPLES per operation): the same run
every time, a few hundred requests per identity. Operations that end the caller's own session are left
out of the run (they would turn the rest of it into 401s) and covered by tests/marketplace/api.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Client, enrolled, mlp_job

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 15
AGENT_PATHS = r"^/api/v1/agent/(?!enroll)"  # a device's own operations; enrolment is anonymous
DEVICE_PATHS = r"^/api/v1/(agent/(?!enroll)|artifacts/)"  # and it uploads outputs, downloads inputs
# They revoke the token the run authenticates with.
SESSION_ENDING = ("auth_logout", "auth_logout_all", "auth_token_revoke")


def _schemathesis(cluster, *, authorization: str, report: Path, parameters: dict[str, int],
                  paths: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    # Path parameters name rows that exist (a job, a lease the device holds), so the run reaches past 404s.
    (report.parent / "schemathesis.toml").write_text(
        "[parameters]\n" + "".join(f"{name} = {value}\n" for name, value in parameters.items()))
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{cluster.url}/api/schema/",
        "--url", cluster.url,
        "--header", f"Authorization: {authorization}",
        "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
        "--workers", "1", "--request-timeout", "30",
        "--no-color", "--report", "junit", "--report-junit-path", str(report),
    ]
    for operation_id in SESSION_ENDING:
        command += ["--exclude-operation-id", operation_id]
    command += [f"--{paths[0]}-path-regex", paths[1]]
    # Its cache goes in the test's directory: every run starts from nothing, and the checkout stays clean.
    return subprocess.run(command, cwd=report.parent, capture_output=True, text=True, timeout=900)


def _lease_one(cluster, headers: dict[str, str], *, timeout: float = 60) -> dict:
    """A lease the device holds (the job is split by the Celery worker, a moment after submission)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.post(f"{cluster.url}/api/v1/agent/lease", json={"max_units": 1}, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        if leases := response.json()["leases"]:
            return leases[0]
        time.sleep(0.3)
    raise AssertionError("no unit to lease: the job was not split")


@pytest.mark.cluster_env(IDLEGRID_THROTTLE_SCALE="1000")
def test_no_operation_answers_a_server_error_or_breaks_its_schema(cluster, tmp_path):
    submitter = Client(cluster, "fuzz-submitter")
    contributor = Client(cluster, "fuzz-contributor")
    device = json.loads((enrolled(cluster, contributor, "fuzz-device") / "device.json").read_text())
    device_auth = {"Authorization": f"Device {device['device_id']}:{device['device_secret']}"}
    job_id, _ = mlp_job(submitter, rows=40, rows_per_unit=10)
    lease = _lease_one(cluster, device_auth)
    # Each identity over the operations it may call (and the anonymous enrolment with the people's): the
    # other side's operations would only answer 401/403, which tests/marketplace/api checks one by one.
    identities = {
        "submitter": (f"Token {submitter.token}", {"job_id": job_id}, ("exclude", AGENT_PATHS)),
        "device": (device_auth["Authorization"], {"result_id": lease["result_id"]}, ("include", DEVICE_PATHS)),
    }
    failures = {}
    for name, (authorization, parameters, paths) in identities.items():
        workdir = tmp_path / name
        workdir.mkdir()
        run = _schemathesis(cluster, authorization=authorization, report=workdir / "report.xml", parameters=parameters,
                            paths=paths)
        report = (workdir / "report.xml").read_text() if (workdir / "report.xml").exists() else ""
        # The run must have exercised the API, not died on the schema: its report counts the operations.
        assert "<testcase" in report, f"{name}: schemathesis ran nothing\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
        (workdir / "output.txt").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            failures[name] = run.stdout[-12000:]
    logs = "\n".join(f"--- {p.name}\n{p.log_tail(30)}" for p in cluster.processes if p.name == "web")
    assert not failures, "\n\n".join(f"=== as {k}\n{v}" for k, v in failures.items()) + "\n" + logs
