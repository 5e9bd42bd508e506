"""Cheaters against the real system: a colluding pair across two owners, and a lazy agent."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from marketplace.jobs.models import Job
from marketplace.workers.models import Device
from marketplace.workunits.models import Result, WorkUnit
from tests.e2e.conftest import Client, enrolled, mlp_job
from tests.e2e.test_inference_job import _wait_until

AGENT = ("--batch", "1", "--poll", "0.5")


def _output(client: Client, job_id: int) -> np.ndarray:
    return load_safetensors(client.http.get(f"/api/v1/jobs/{job_id}/output/").content)["y"]


# Trust after one confirmed result: a ban needs a trusted device on the winning side (verification._accept),
# and the honest newcomers earn it by confirming each other's units of the honest job.
@pytest.mark.cluster_env(IDLEGRID_KNOWN_ANSWER_RATE="1.0", IDLEGRID_TRUST_THRESHOLD="1")
def test_a_colluding_pair_is_caught_and_the_job_it_fooled_is_corrected(cluster):
    submitter, mallory, trudy = (Client(cluster, n) for n in ("submitter", "mallory", "trudy"))

    # 1. Alone on the marketplace, two colluders of different owners agree on the same wrong answers.
    fooled, expected = mlp_job(submitter, rows=20, rows_per_unit=10, seed=1)
    running = [cluster.start_agent(name, enrolled(cluster, owner, name), *AGENT, "--faulty", "collude")
               for owner, name in [(mallory, "mallory-1"), (trudy, "trudy-1")]]
    assert submitter.wait_for_job(fooled, cluster)["state"] == "completed"
    assert not np.allclose(_output(submitter, fooled), expected, atol=1e-3)  # the attack worked, for now
    for agent in running:
        agent.signal(signal.SIGTERM)
        assert agent.popen.wait(60) == 0

    # 2. Honest newcomers, on probation, are handed known-answer copies of the fooled units among their
    # work (the platform pays for them out of its verification budget, which an operator funds first).
    cluster.manage("verification_budget_fund", "--amount", str(10**21), "--reason", "known answers for the test")
    #
    # work. They answer right, which disputes the colluders' "known" answers: the units are decided again
    # with one owner more than vouched for them, the colluders are banned, and the fooled job corrected.
    # Which decided unit a known-answer copy repeats is random, so honest work continues, job after job,
    # until both fooled units have been handed out as known answers (a few jobs at most).
    for name in ("alice", "bob", "carol"):
        cluster.start_agent(f"{name}-1", enrolled(cluster, Client(cluster, name), f"{name}-1"), *AGENT)
    for seed in range(2, 12):
        honest_job, _ = mlp_job(submitter, rows=20, rows_per_unit=5, seed=seed)
        assert submitter.wait_for_job(honest_job, cluster)["state"] == "completed"
        if Device.objects.filter(state=Device.State.BANNED).count() == 2:
            break
    _wait_until(lambda: Device.objects.filter(state=Device.State.BANNED).count() == 2)
    _wait_until(lambda: Job.objects.get(pk=fooled).corrections >= 1
                and Job.objects.get(pk=fooled).state == Job.State.COMPLETED)

    banned = set(Device.objects.filter(state=Device.State.BANNED).values_list("name", flat=True))
    assert banned == {"mallory-1", "trudy-1"}
    assert all(d.earnings_held for d in Device.objects.filter(state=Device.State.BANNED))
    np.testing.assert_allclose(_output(submitter, fooled), expected, rtol=1e-5, atol=1e-6)
    assert not WorkUnit.objects.filter(
        job_id=fooled, known_answer_of__isnull=True, canonical_result__device__state=Device.State.BANNED
    ).exists()
    assert Device.objects.filter(name__in=["alice-1", "bob-1", "carol-1"], state=Device.State.ACTIVE).count() == 3


def test_a_lazy_agent_never_yields_a_canonical_result(cluster):
    submitter, alice, bob, lazy = (Client(cluster, n) for n in ("submitter", "alice", "bob", "larry"))
    job_id, expected = mlp_job(submitter, rows=30, rows_per_unit=10)
    cluster.start_agent("larry-1", enrolled(cluster, lazy, "larry-1"), "--batch", "3", "--poll", "0.5",
                        "--faulty", "lazy")
    _wait_until(lambda: Result.objects.filter(device__name="larry-1").exclude(
        state=Result.State.IN_PROGRESS).count() >= 3)
    for owner, name in [(alice, "alice-1"), (bob, "bob-1")]:
        cluster.start_agent(name, enrolled(cluster, owner, name), *AGENT)

    job = submitter.wait_for_job(job_id, cluster)

    assert job["state"] == "completed", job
    larry = Device.objects.get(name="larry-1")
    assert larry.valid_results == 0 and larry.invalid_results >= 3
    assert not WorkUnit.objects.filter(job_id=job_id, canonical_result__device=larry).exists()
    np.testing.assert_allclose(_output(submitter, job_id), expected, rtol=1e-5, atol=1e-6)
