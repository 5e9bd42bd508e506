"""Federated training through real processes: a poisoning agent is caught by the quorum and its updates
never reach the global model; an agent killed mid-round does not stall the round."""

from __future__ import annotations

import os
import signal

import pytest
from safetensors.numpy import load as load_safetensors

from marketplace.jobs.models import FedRound
from marketplace.workers.models import Device
from marketplace.workunits.models import Result
from tests.conftest import weights_bytes
from tests.e2e.conftest import Client, enrolled
from tests.e2e.test_inference_job import _wait_until
from tests.marketplace.jobs.fedavg_helpers import MLP, labelled_bytes

AGENT = ("--batch", "1", "--poll", "0.5")


def fedavg_job(cluster, client: Client, **spec) -> int:
    """Submit a small federated job on the MLP (the submitter funded through the ledger first)."""
    cluster.manage("ledger_grant", "submitter", "--amount", str(10**24), "--reason", "e2e funds", "--key", "e2e-fedavg")
    weights = client.upload(weights_bytes("mlp", MLP["config"]))
    body = {"model": {**MLP, "weights": weights}, "train_dataset": client.upload(labelled_bytes(48, seed=1)),
            "eval_dataset": client.upload(labelled_bytes(30, seed=2)), "rounds": 2, "shards": 2,
            "local_epochs": 2, "batch_size": 8, "learning_rate": 0.1, **spec}
    response = client.http.post("/api/v1/jobs/", json={"kind": "fedavg", "spec": body})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_poisoning_agent_is_caught_and_its_updates_never_aggregated(cluster):
    submitter, alice, bob, mallory = (Client(cluster, n) for n in ("submitter", "alice", "bob", "mallory"))
    job_id = fedavg_job(cluster, submitter)
    # The poisoner goes first, so it certainly holds a replica of every unit of round 0.
    cluster.start_agent("mallory-1", enrolled(cluster, mallory, "mallory-1"), *AGENT, "--faulty", "poison")
    _wait_until(lambda: Result.objects.filter(job_id=job_id, device__name="mallory-1").exclude(
        state=Result.State.IN_PROGRESS).count() >= 2)
    for owner, name in [(alice, "alice-1"), (bob, "bob-1")]:
        cluster.start_agent(name, enrolled(cluster, owner, name), *AGENT)

    job = submitter.wait_for_job(job_id, cluster)

    assert job["state"] == "completed", job
    rounds = submitter.http.get(f"/api/v1/jobs/{job_id}/rounds/").json()["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    poisoned = set(Result.objects.filter(job_id=job_id, device__name="mallory-1").values_list("pk", flat=True))
    aggregated = {pk for r in rounds for pk in r["result_ids"]}
    assert len(aggregated) == 4 and not aggregated & poisoned
    mallory_device = Device.objects.get(name="mallory-1")
    assert mallory_device.valid_results == 0 and mallory_device.invalid_results >= 2
    final = load_safetensors(submitter.http.get(f"/api/v1/jobs/{job_id}/output/").content)
    assert job["output_sha256"] == rounds[-1]["weights_sha256"] and set(final)


@pytest.mark.cluster_env(IDLEGRID_LEASE_SECONDS="4")
def test_an_agent_killed_mid_round_does_not_stall_the_round(cluster):
    submitter, victor, alice, bob = (Client(cluster, n) for n in ("submitter", "victor", "alice", "bob"))
    victim = cluster.start_agent("victor-1", enrolled(cluster, victor, "victor-1"), "--batch", "2", "--poll", "0.5")
    # Hold the compute child still so the kill lands mid-unit, however fast the unit would train.
    os.kill(int(victim.wait_for_log(r"compute child (\d+) ready", timeout=120).group(1)), signal.SIGSTOP)
    job_id = fedavg_job(cluster, submitter, rounds=1)
    victim.wait_for_log(r"unit \d+ \(result \d+\): computing", timeout=120)
    victim.signal(signal.SIGKILL)  # the whole process group: agent and its compute child, mid-unit
    for owner, name in [(alice, "alice-1"), (bob, "bob-1")]:
        cluster.start_agent(name, enrolled(cluster, owner, name), *AGENT)

    job = submitter.wait_for_job(job_id, cluster, timeout=120)

    assert job["state"] == "completed", job
    assert Result.objects.filter(device__name="victor-1", state=Result.State.EXPIRED).exists()
    assert FedRound.objects.filter(job_id=job_id).count() == 1
    assert not Result.objects.filter(job_id=job_id, device__name="victor-1", state=Result.State.VALID).exists()
