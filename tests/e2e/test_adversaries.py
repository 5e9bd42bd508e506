"""The adversary suite: honest agents and hostile devices, all real processes, on one marketplace.

The hostile devices (tests/e2e/adversary.py) hoard leases, give every unit up, report for other
devices' leases and outputs they never uploaded, send hostile metrics and hostile bodies, each under an
owner of its own, from before the honest agents start until the end. Every job must complete with the
right output in bounded time, no attacker may be paid or have a result accepted, the web workers must
live through it all, and the ledger must stay sound."""

from __future__ import annotations

import json
import signal
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from marketplace.ledger.models import Earning
from marketplace.ledger.selectors import ledger_check
from marketplace.workers.models import Device
from marketplace.workunits.models import Result
from tests.e2e.conftest import Client, enrolled, mlp_job
from tests.e2e.test_hostile_bodies import children

ATTACKS = ("hoard", "fail", "others", "metrics", "bodies")
JOB_SECONDS = 240  # each job, with every attacker at work: far above what it takes (~30 s here)


def _gunicorn_workers(cluster) -> set[int]:
    web = next(p for p in cluster.processes if p.name == "web")
    return children(web.popen.pid)


@pytest.mark.cluster_env(
    IDLEGRID_LEASE_GRACE_SECONDS="3",  # a hoarded lease dies at the unit's time limit + 3 s
    IDLEGRID_GIVE_UP_COOLDOWN_SECONDS="1",
)
def test_no_hostile_device_stalls_fails_fools_or_crashes_the_marketplace(cluster, tmp_path):
    submitter = Client(cluster, "submitter")
    # Everyone enrols first: enrolment is throttled per client address, and on loopback the attacker that
    # bombs /agent/enroll shares its address with every honest agent of the test.
    honest = {name: enrolled(cluster, Client(cluster, name), f"{name}-1") for name in ("alice", "bob", "carol")}
    attackers = []
    for mode in ATTACKS:
        owner = Client(cluster, f"attacker-{mode}")
        state_dir = enrolled(cluster, owner, f"attacker-{mode}")
        summary = tmp_path / f"{mode}.json"
        process = cluster.start(
            f"attacker-{mode}",
            [sys.executable, "-m", "tests.e2e.adversary", "--mode", mode, "--state-dir", str(state_dir),
             "--summary", str(summary)],
            env=cluster.agent_env(state_dir),
        )
        attackers.append((mode, process, summary))
    workers_before = _gunicorn_workers(cluster)
    try:
        jobs = [mlp_job(submitter, rows=40, rows_per_unit=10, seed=seed, unit_timeout_seconds=10) for seed in (1, 2)]
        time.sleep(3)  # the attackers get the first go at the jobs
        for name, state_dir in honest.items():
            cluster.start_agent(f"{name}-1", state_dir, "--batch", "2", "--poll", "0.5")
        started = time.monotonic()
        finished = [submitter.wait_for_job(job_id, cluster, timeout=JOB_SECONDS) for job_id, _ in jobs]
        took = time.monotonic() - started
    finally:
        for _, process, _ in attackers:  # all at once: each writes its summary on SIGTERM
            process.signal(signal.SIGTERM)
        for _, process, _ in attackers:
            process.popen.wait(30)

    for job, (job_id, expected) in zip(finished, jobs):
        assert job["state"] == "completed", job
        output = load_safetensors(submitter.http.get(f"/api/v1/jobs/{job_id}/output/").content)["y"]
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)
    assert took < JOB_SECONDS

    seen = {mode: json.loads(summary.read_text()) for mode, _, summary in attackers}
    for mode, answers in seen.items():
        assert answers, f"the {mode} attacker never got an answer"
        assert not [k for k in answers if k.split()[-1].startswith("5")], (mode, answers)  # no 5xx, ever
        assert not [k for k in answers if "RemoteProtocolError" in k], (mode, answers)  # no dropped connection
    assert _gunicorn_workers(cluster) == workers_before  # no web worker died and was replaced

    hostile = Device.objects.filter(name__startswith="attacker-")
    assert hostile.count() == len(ATTACKS)
    assert not Result.objects.filter(device__in=hostile, state=Result.State.VALID).exists()
    assert not Earning.objects.filter(device__in=hostile).exists()
    by_name = {d.name: d for d in hostile}
    assert by_name["attacker-fail"].gave_up >= 1
    assert by_name["attacker-hoard"].expired >= 1 or Result.objects.filter(
        device=by_name["attacker-hoard"], state=Result.State.IN_PROGRESS).count() <= 1
    assert Result.objects.filter(device=by_name["attacker-hoard"], state=Result.State.IN_PROGRESS).count() <= 1
    assert seen["others"].get("report 400", 0) + seen["others"].get("report 403", 0) > 0
    assert seen["metrics"].get("report 400", 0) > 0
    assert seen["bodies"].get("bomb deep 400", 0) > 0
    assert ledger_check() == []
