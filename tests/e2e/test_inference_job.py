"""A whole inference job through real processes: web server, Celery worker and beat, agent processes."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from marketplace.workers.models import Device
from marketplace.workunits.models import Result, WorkUnit
from tests.e2e.conftest import Client, enrolled, mlp_job


def _owners(cluster, *names):
    return [Client(cluster, name) for name in names]


def test_a_job_is_computed_by_agents_checked_by_quorum_and_merged(cluster):
    submitter, alice, bob, mallory = _owners(cluster, "submitter", "alice", "bob", "mallory")
    job_id, expected = mlp_job(submitter, rows=40, rows_per_unit=10)
    for owner, name, extra in [(alice, "alice-1", []), (bob, "bob-1", []), (mallory, "mallory-1", ["--faulty", "wrong"])]:
        cluster.start_agent(name, enrolled(cluster, owner, name), "--batch", "1", "--poll", "0.5", *extra)

    job = submitter.wait_for_job(job_id, cluster)

    assert job["state"] == "completed", job
    assert job["units_done"] == job["units_total"] == 4
    merged = load_safetensors(submitter.http.get(f"/api/v1/jobs/{job_id}/output/").content)["y"]
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
    assert (merged.argmax(1) == expected.argmax(1)).all()
    faulty = Device.objects.get(name="mallory-1")
    assert faulty.valid_results == 0
    assert not WorkUnit.objects.filter(job_id=job_id, canonical_result__device=faulty).exists()
    assert Result.objects.filter(job_id=job_id, device=faulty, state=Result.State.VALID).count() == 0
    honest = Device.objects.filter(name__in=["alice-1", "bob-1"])
    assert sum(d.valid_results for d in honest) >= 2 * job["units_total"]


def test_the_faulty_agent_is_caught_whenever_it_computes(cluster):
    submitter, alice, mallory = _owners(cluster, "submitter", "alice", "mallory")
    job_id, _ = mlp_job(submitter, rows=30, rows_per_unit=10)
    # The faulty agent goes first so that it certainly takes replicas.
    cluster.start_agent("mallory-1", enrolled(cluster, mallory, "mallory-1"), "--batch", "3", "--poll", "0.5", "--faulty", "wrong")
    _wait_until(lambda: Result.objects.filter(job_id=job_id, device__name="mallory-1").exclude(
        state=Result.State.IN_PROGRESS).count() >= 3)
    cluster.start_agent("alice-1", enrolled(cluster, alice, "alice-1"), "--batch", "1", "--poll", "0.5")
    bob = Client(cluster, "bob")
    cluster.start_agent("bob-1", enrolled(cluster, bob, "bob-1"), "--batch", "1", "--poll", "0.5")

    job = submitter.wait_for_job(job_id, cluster)

    assert job["state"] == "completed", job
    faulty = Device.objects.get(name="mallory-1")
    assert faulty.invalid_results >= 3 and faulty.valid_results == 0
    assert job["results_invalid"] >= 3
    assert not WorkUnit.objects.filter(job_id=job_id, canonical_result__device=faulty).exists()


def test_an_agent_killed_mid_unit_has_its_unit_reissued_and_the_job_completes(cluster):
    submitter, alice, bob, carol = _owners(cluster, "submitter", "alice", "bob", "carol")
    victim = cluster.start_agent("alice-1", enrolled(cluster, alice, "alice-1"), "--batch", "1", "--poll", "0.5")
    # A unit computes in milliseconds: hold the compute child still so the kill lands mid-unit, every time.
    os.kill(int(victim.wait_for_log(r"compute child (\d+) ready", timeout=120).group(1)), signal.SIGSTOP)
    job_id, expected = mlp_job(submitter, rows=20, rows_per_unit=10)
    victim.wait_for_log(r"unit \d+ \(result \d+\): computing", timeout=120)
    killed = Result.objects.get(device__name="alice-1", state=Result.State.IN_PROGRESS)
    victim.signal(signal.SIGKILL)  # the whole process group: agent and its compute child
    victim.popen.wait(10)

    for owner, name in [(bob, "bob-1"), (carol, "carol-1")]:
        cluster.start_agent(name, enrolled(cluster, owner, name), "--batch", "1", "--poll", "0.5")
    job = submitter.wait_for_job(job_id, cluster)

    assert job["state"] == "completed", job
    killed.refresh_from_db()
    assert killed.state == Result.State.EXPIRED
    unit = WorkUnit.objects.get(pk=killed.unit_id)
    assert unit.results.count() == 3  # two first replicas and the one reissued for the dead lease,
    assert unit.results_created == 2  # which does not count against the unit's cap of results (no answer)
    assert unit.canonical_result.device.name in {"bob-1", "carol-1"}
    merged = load_safetensors(submitter.http.get(f"/api/v1/jobs/{job_id}/output/").content)["y"]
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.cluster_env(IDLEGRID_PROBATION_LEASES="2")  # a new device holds one lease at a time by default
def test_a_first_sigterm_keeps_the_unit_in_hand_for_the_next_run_and_hands_back_the_rest(cluster):
    submitter, alice = _owners(cluster, "submitter", "alice")
    state_dir = enrolled(cluster, alice, "alice-1")
    agent = cluster.start_agent("alice-1", state_dir, "--batch", "2", "--poll", "0.5")
    # A unit computes in milliseconds: hold the compute child still so the signal lands mid-unit, every time
    # (held still, it cannot checkpoint either: the warm stop waits a few seconds for it, then keeps the lease).
    child = int(agent.wait_for_log(r"compute child (\d+) ready", timeout=120).group(1))
    os.kill(child, signal.SIGSTOP)
    try:
        mlp_job(submitter, rows=20, rows_per_unit=10)
        agent.wait_for_log(r"unit \d+ \(result \d+\): computing", timeout=120)
        agent.signal(signal.SIGTERM)
        assert agent.popen.wait(60) == 0, agent.log_tail()
    finally:
        try:
            os.kill(child, signal.SIGCONT)
        except ProcessLookupError:
            pass  # killed with its unit, as it should be

    states = sorted(Result.objects.filter(device__name="alice-1").values_list("state", flat=True))
    # the unit it was computing is still its own (the next run resumes it); the one it had not started was
    # handed back at once, for free
    assert states == [Result.State.IN_PROGRESS, Result.State.RELEASED], (states, agent.log_tail())
    kept = Result.objects.get(device__name="alice-1", state=Result.State.IN_PROGRESS)
    assert (state_dir / "work" / str(kept.pk) / "lease.json").is_file()
    device = Device.objects.get(name="alice-1")
    assert (device.released, device.gave_up, device.cooldown_until) == (1, 0, None)

    # Started again while that lease is alive, the agent asks the server, which renews it, and reports the unit.
    again = cluster.start_agent("alice-1-again", state_dir, "--batch", "1", "--poll", "0.5")
    again.wait_for_log(r"resuming 1 unit left by an earlier run", timeout=120)
    _wait_until(lambda: Result.objects.get(pk=kept.pk).state == Result.State.REPORTED, timeout=120)


def test_the_agent_process_loads_neither_django_nor_torch(cluster):
    submitter, alice = _owners(cluster, "submitter", "alice")
    job_id, _ = mlp_job(submitter, rows=10, rows_per_unit=10)
    _wait_until(lambda: submitter.job(job_id)["state"] == "running")  # a --burst agent leaves when there is no work
    agent = cluster.start_agent("alice-1", enrolled(cluster, alice, "alice-1"), "--burst", "--max-units", "1",
                                python_flags=("-X", "importtime"))

    assert agent.popen.wait(120) == 0, agent.log_tail()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in agent.log_path.read_text().splitlines()
                if line.startswith("import time:")}
    assert "worker_agent" in imported and "httpx" in imported  # the trace is real
    assert not imported & {"django", "celery", "web3", "marketplace", "torch"}
    assert Result.objects.filter(job_id=job_id, device__name="alice-1", state=Result.State.REPORTED).count() == 1


def _wait_until(condition, *, timeout: float = 180, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)
    raise AssertionError("the condition did not come true in time")
