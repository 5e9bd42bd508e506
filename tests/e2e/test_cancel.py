"""Cancelling a job mid-way through real processes: the agent computing a revoked unit stops it, the
escrow left returns, validated work stays paid and the partial output holds the decided rows."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
from safetensors.numpy import load as load_safetensors

from marketplace.jobs.models import Job
from marketplace.ledger.models import Account, Earning, Posting
from marketplace.ledger.postings import account_get, balance
from marketplace.workunits.models import Result, WorkUnit
from tests.e2e.conftest import Client, enrolled, mlp_job


def _wait_until(condition, *, timeout: float = 180, step: float = 0.2, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)
    raise AssertionError(f"{what} did not come true in {timeout}s")


def test_a_job_cancelled_mid_way_stops_its_agents_pays_what_was_validated_and_keeps_the_decided_rows(cluster):
    submitter, *owners = (Client(cluster, name) for name in ("submitter", "alice", "bob", "carol"))
    agents = {owner.username: cluster.start_agent(f"{owner.username}-1", enrolled(cluster, owner, f"{owner.username}-1"),
                                                  "--batch", "1", "--poll", "0.5") for owner in owners}
    # Every compute child is held still until each agent holds a lease (one each, on probation), so that
    # carol's is certainly mid-computation when the job is cancelled: hers stays stopped.
    children = {name: int(agent.wait_for_log(r"compute child (\d+) ready", timeout=120).group(1))
                for name, agent in agents.items()}
    for pid in children.values():
        os.kill(pid, signal.SIGSTOP)
    job_id, expected = mlp_job(submitter, rows=40, rows_per_unit=10)
    for agent in agents.values():
        agent.wait_for_log(r"unit \d+ \(result \d+\): computing", timeout=120)
    held = Result.objects.get(device__name="carol-1", state=Result.State.IN_PROGRESS)
    stuck, child = agents["carol"], children["carol"]
    for name in ("alice", "bob"):
        os.kill(children[name], signal.SIGCONT)
    # Alice and bob decide the three other units and answer the other replica of carol's, which then
    # waits for her answer: the job is mid-way, for as long as it takes.
    _wait_until(lambda: WorkUnit.objects.filter(job_id=job_id, state=WorkUnit.State.DONE).count() == 3
                and Result.objects.filter(unit_id=held.unit_id, state=Result.State.REPORTED).count() == 1,
                what="three units decided and the other replica of carol's answered")
    escrowed = max(line.amount for line in Posting.objects.get(idempotency_key=f"escrow:job={job_id}").lines.all())

    answer = submitter.http.post(f"/api/v1/jobs/{job_id}/cancel/")

    assert answer.status_code == 200 and answer.json()["state"] in ("cancelling", "cancelled"), answer.text
    _wait_until(lambda: submitter.job(job_id)["state"] == "cancelled", timeout=60, what="the job cancelled")
    # Carol's agent hears "lost" on its next heartbeat and kills the unit's child: no report, no give-up.
    stuck.wait_for_log(rf"result {held.pk}\): lease lost; abandoned without a report", timeout=30)
    _wait_until(lambda: not _alive(child), timeout=10, what="the stopped compute child killed")
    held.refresh_from_db()
    assert held.state == Result.State.CANCELLED and not Earning.objects.filter(result=held).exists()
    assert stuck.alive(), stuck.log_tail()  # the agent itself goes on polling for other work
    # Validated work stays paid from the escrow, and all the rest returns to the submitter at once.
    _wait_until(lambda: Posting.objects.filter(kind=Posting.Kind.RELEASE, idempotency_key=f"release:job={job_id}:0").exists(),
                timeout=30, what="the escrow released")
    paid = sum(e.gross for e in Earning.objects.filter(job_id=job_id))
    assert paid == 6 * 10**15 and Earning.objects.filter(job_id=job_id, result__state=Result.State.VALID).count() == 6
    assert balance(account_get(Account.Kind.JOB_ESCROW, job_id=job_id)) == 0
    release = Posting.objects.get(kind=Posting.Kind.RELEASE, idempotency_key=f"release:job={job_id}:0")
    assert max(line.amount for line in release.lines.all()) == escrowed - paid
    # The partial output: the three decided units' rows, as the model computes them here; carol's unit masked out.
    output = load_safetensors(submitter.http.get(f"/api/v1/jobs/{job_id}/output/").content)
    undecided = WorkUnit.objects.get(pk=held.unit_id).index
    want_mask = np.ones(40, dtype=bool)
    want_mask[undecided * 10 : undecided * 10 + 10] = False
    np.testing.assert_array_equal(output["mask"], want_mask)
    np.testing.assert_allclose(output["y"][want_mask], expected[want_mask], rtol=1e-5, atol=1e-6)
    assert not output["y"][~want_mask].any()
    assert Job.objects.get(pk=job_id).units.filter(state=WorkUnit.State.ERROR).count() == 1
    again = submitter.http.post(f"/api/v1/jobs/{job_id}/cancel/")
    assert (again.status_code, again.json()["state"]) == (200, "cancelled")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
