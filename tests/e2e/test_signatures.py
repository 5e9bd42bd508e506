"""Signatures both ways, through real processes: agents run only units the marketplace signed, and a
device's signed result holds for the one lease it was made for."""

from __future__ import annotations

import json

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from marketplace.jobs.models import Job
from marketplace.workunits.models import Result, WorkUnit
from tests.conftest import stored_bytes
from tests.e2e.conftest import Client, enrolled, mlp_job
from tests.e2e.test_inference_job import _wait_until
from worker_agent.pinning import KeyPins, parse_keys
from worker_agent.protocol import b64encode, enroll_message

AGENT = ("--batch", "1", "--poll", "0.5")


def _split(job_id: int) -> None:
    _wait_until(lambda: Job.objects.get(pk=job_id).state == Job.State.RUNNING)


# A refused unit is a give-up, and a give-up costs the device a cool-down (60 s by default) before it
# leases the other units; the cool-down is not what this test is about.
@pytest.mark.cluster_env(IDLEGRID_GIVE_UP_COOLDOWN_SECONDS="2")
def test_an_agent_refuses_a_unit_changed_in_the_database_and_computes_the_others(cluster):
    submitter, alice, bob = (Client(cluster, name) for name in ("submitter", "alice", "bob"))
    job_id, _ = mlp_job(submitter, rows=30, rows_per_unit=10)
    _split(job_id)
    victim = WorkUnit.objects.get(job_id=job_id, index=1)
    # Another batch size gives other output bytes: a silent change only the signature can reveal. The
    # high cap keeps the refused unit pending (rather than failing the job) while the others complete.
    WorkUnit.objects.filter(pk=victim.pk).update(payload={**victim.payload, "batch_size": 3}, max_results=10_000)
    states = {}
    for owner, name in [(alice, "alice-1"), (bob, "bob-1")]:
        states[name] = enrolled(cluster, owner, name)
        cluster.start_agent(name, states[name], *AGENT)

    _wait_until(lambda: WorkUnit.objects.filter(job_id=job_id, state=WorkUnit.State.DONE).count() == 2
                and Result.objects.filter(unit=victim, state=Result.State.CLIENT_ERROR).count() >= 2)

    refused = Result.objects.filter(unit=victim).exclude(state__in=[Result.State.UNSENT, Result.State.IN_PROGRESS])
    assert {result.state for result in refused} == {Result.State.CLIENT_ERROR}
    assert all(result.error.startswith(f"unit signature invalid: the signature of unit {victim.pk} does not verify")
               for result in refused), {result.error for result in refused}
    assert WorkUnit.objects.get(pk=victim.pk).state == WorkUnit.State.PENDING
    assert WorkUnit.objects.filter(job_id=job_id).exclude(pk=victim.pk).exclude(state=WorkUnit.State.DONE).count() == 0
    for state_dir in states.values():  # nothing of the refused unit was even downloaded
        assert not (state_dir / "cache" / victim.payload["inputs"]["x"]).exists()
    logs = "".join(process.log_path.read_text() for process in cluster.processes if process.name.startswith("agent-"))
    assert "WARNING" in logs and "unit signature invalid" in logs


def _device_client(cluster, device_id: int, secret: str) -> httpx.Client:
    return httpx.Client(base_url=cluster.url, headers={"Authorization": f"Device {device_id}:{secret}"}, timeout=60)


def _enrol_in_test(cluster, owner: Client, name: str) -> tuple[httpx.Client, dict]:
    """A device whose key this test holds: enrolled over HTTP as `idlegrid-agent enroll` would."""
    token = owner.http.post("/api/v1/enrollment-tokens/", json={}).json()["token"]
    key = Ed25519PrivateKey.generate()
    public = b64encode(key.public_key().public_bytes_raw())
    proof = b64encode(key.sign(enroll_message(token=token, public_key_b64=public)))
    answer = httpx.post(f"{cluster.url}/api/v1/agent/enroll", timeout=60, json={
        "token": token, "name": name, "public_key": public, "hardware": {"os": "linux"}, "proof": proof})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    return _device_client(cluster, body["device_id"], body["device_secret"]), body


def _lease_one(device: httpx.Client) -> dict:
    answer = device.post("/api/v1/agent/lease", json={"max_units": 1})
    assert answer.status_code == 200, answer.text
    (lease,) = answer.json()["leases"]
    return lease


def _report(device: httpx.Client, result_id: int, sha: str, signature: str) -> httpx.Response:
    return device.post(f"/api/v1/agent/results/{result_id}/report", json={"output_sha256": sha, "signature": signature})


def test_a_signed_result_replayed_for_another_lease_is_refused(cluster):
    submitter, alice, mallory = (Client(cluster, name) for name in ("submitter", "alice", "mallory"))
    job_id, _ = mlp_job(submitter, rows=20, rows_per_unit=10)  # two units, outputs of one shape
    _split(job_id)
    alice_dir = enrolled(cluster, alice, "alice-1")
    agent = cluster.start_agent("alice-1", alice_dir, "--burst", "--max-units", "1")
    assert agent.popen.wait(180) == 0, agent.log_tail()
    genuine = Result.objects.get(job_id=job_id, device__name="alice-1", state=Result.State.REPORTED)
    sha, signature = genuine.output_id, b64encode(bytes(genuine.signature))

    # 1. The same device (this test borrows its credentials), another lease: the signature names the lease.
    device = json.loads((alice_dir / "device.json").read_text())
    as_alice = _device_client(cluster, device["device_id"], device["device_secret"])
    other_lease = _lease_one(as_alice)
    assert other_lease["result_id"] != genuine.pk
    same_device = _report(as_alice, other_lease["result_id"], sha, signature)

    # 2. Another owner's device, enrolled with a key this test holds: the signature names the device.
    as_mallory, enrolment = _enrol_in_test(cluster, mallory, "mallory-1")
    mallory_lease = _lease_one(as_mallory)
    # She even holds the bytes (uploaded them herself: a report must name an output the device uploaded),
    # so only the signature stands in her way.
    stolen = stored_bytes(sha)
    assert as_mallory.post("/api/v1/artifacts/", content=stolen,
                           headers={"Content-Type": "application/octet-stream"}).status_code == 200
    other_device = _report(as_mallory, mallory_lease["result_id"], sha, signature)

    for response in (same_device, other_device):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["fields"] == {"signature": "invalid"}
    for lease in (other_lease, mallory_lease):
        assert Result.objects.get(pk=lease["result_id"]).state == Result.State.IN_PROGRESS
    # What mallory leased is a signed unit, and the keys she was given at enrolment verify it.
    KeyPins(parse_keys(enrolment["marketplace_keys"])).verify_unit(
        unit_id=mallory_lease["unit_id"], payload=mallory_lease["payload"], key_id=mallory_lease["key_id"],
        signature=mallory_lease["signature"])
