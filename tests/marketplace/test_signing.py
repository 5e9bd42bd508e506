"""Signatures both ways: the marketplace signs units (its keyring, rotation, what leases carry), agents
pin its keys at enrolment, and a device's result signature holds for one lease only."""

import json
import os
import stat
import subprocess
import sys
import time
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from marketplace.core.signing import keyring
from marketplace.workunits.creation import units_sign
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from worker_agent.pinning import KeyPins, UnitSignatureInvalid, parse_keys
from worker_agent.protocol import b64decode, b64encode, enroll_message, key_endorsement_message, unit_message

LEASE, KEYS, ENROLL = "/api/v1/agent/lease", "/api/v1/agent/keys", "/api/v1/agent/enroll"

# A process of its own, with only the settings the keyring reads: it waits for the starting gun, then
# asks for the keyring (making the first key if there is none) and prints the active key's id.
RACER = """
import sys, time
from pathlib import Path
from django.conf import settings
settings.configure(IDLEGRID_SIGNING_KEY_DIR=sys.argv[1])
from marketplace.core.signing import key_rotate, keyring
Path(sys.argv[2], "ready-" + sys.argv[3]).touch()
while not Path(sys.argv[2], "go").exists():
    time.sleep(0.001)
print(key_rotate().key_id if sys.argv[4] == "rotate" else keyring().active.key_id)
"""


def race(key_dir, flags, count, action="keyring"):
    """Start `count` processes, release them at once, return what each printed."""
    flags.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(settings.BASE_DIR)}
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(key_dir), str(flags), str(n), action],
                         cwd=settings.BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(count)
    ]
    deadline = time.monotonic() + 120
    while len(list(flags.glob("ready-*"))) < count:
        assert time.monotonic() < deadline and all(r.poll() is None for r in racers), [r.communicate() for r in racers]
        time.sleep(0.01)
    (flags / "go").touch()
    outputs = [racer.communicate(timeout=120) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), outputs
    return [out.strip() for out, _ in outputs]


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def device(make_device, contributor):
    return make_device(contributor)


@pytest.fixture
def job(submit_job):
    return submit_job(rows=8, rows_per_unit=4)


def pins_of(ring_keys):
    """What an agent pins from a list of keys on the wire."""
    return KeyPins(parse_keys(ring_keys))


# --- the keyring ------------------------------------------------------------------------------------

def test_the_first_key_is_made_on_first_use_and_its_private_half_stays_in_a_0600_file(signing_key_dir):
    ring = keyring()

    key_id = ring.active.key_id
    assert sorted(path.name for path in signing_key_dir.iterdir() if not path.name.startswith(".")) == [
        f"{key_id}.json", f"{key_id}.pem"]
    assert mode(signing_key_dir / f"{key_id}.pem") == 0o600 and mode(signing_key_dir) == 0o700
    assert (signing_key_dir / f"{key_id}.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    record = json.loads((signing_key_dir / f"{key_id}.json").read_text())
    assert record["public_key"] == b64encode(ring.active.public_key)
    assert (record["endorsed_by"], record["endorsement"], record["retired_at"]) == (None, None, None)
    assert "PRIVATE" not in (signing_key_dir / f"{key_id}.json").read_text()
    assert keyring() is ring  # read once per process


def test_processes_racing_to_make_the_first_key_all_end_up_with_the_same_one(signing_key_dir, tmp_path):
    key_ids = race(signing_key_dir, tmp_path / "flags", 8)

    assert len(set(key_ids)) == 1
    assert len(list(signing_key_dir.glob("*.json"))) == len(list(signing_key_dir.glob("*.pem"))) == 1
    assert keyring().active.key_id == key_ids[0]


def test_racing_rotations_each_make_a_key_endorsed_by_the_one_before(signing_key_dir, tmp_path):
    first = keyring().active

    made = race(signing_key_dir, tmp_path / "flags", 4, action="rotate")

    ring = keyring()
    assert sorted(made) == sorted(key.key_id for key in ring.keys[1:])
    assert ring.keys[0] == first
    for older, newer in zip(ring.keys, ring.keys[1:]):  # one chain, whatever order the rotations ran in
        assert newer.endorsed_by == older.key_id
    assert ring.active == ring.keys[-1]


def test_a_rotated_key_is_endorsed_by_the_active_key_and_becomes_active(signing_key_dir):
    old = keyring().active

    out = StringIO()
    call_command("signing_key_rotate", stdout=out)

    ring = keyring()
    new = ring.active
    assert out.getvalue().strip() == new.key_id != old.key_id
    assert new.endorsed_by == old.key_id
    assert old.verifies(new.endorsement, key_endorsement_message(key_id=new.key_id,
                                                                 public_key_b64=b64encode(new.public_key)))
    assert [key.key_id for key in ring.published()] == [old.key_id, new.key_id]


def test_a_process_notices_a_rotation_made_by_another(signing_key_dir, tmp_path):
    before = keyring().active.key_id

    (made,) = race(signing_key_dir, tmp_path / "flags", 1, action="rotate")

    assert made != before
    assert keyring().active.key_id == made


def test_the_key_list_names_each_key_and_its_state(signing_key_dir):
    first = keyring().active.key_id
    call_command("signing_key_rotate", stdout=StringIO())
    second = keyring().active.key_id
    out = StringIO()

    call_command("signing_key_list", stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"{first}  published") and lines[1].startswith(f"{second}  active")
    assert lines[1].endswith(f"endorsed by {first}")


def test_retiring_a_key_signs_its_pending_units_again_with_the_active_key(job, signing_key_dir):
    old = keyring().active.key_id
    call_command("signing_key_rotate", stdout=StringIO())
    new = keyring().active

    call_command("signing_key_retire", old, stdout=StringIO())

    assert keyring().get(old).retired and old not in [key.key_id for key in keyring().published()]
    for unit in WorkUnit.objects.filter(job=job):
        assert unit.signing_key_id == new.key_id
        assert new.verifies(bytes(unit.signature), unit_message(unit_id=unit.pk, payload=unit.payload))


def test_the_active_key_cannot_be_retired(signing_key_dir):
    with pytest.raises(CommandError, match="rotate to a new one before retiring it"):
        call_command("signing_key_retire", keyring().active.key_id)


# --- signed units and leases ------------------------------------------------------------------------

def test_every_unit_is_signed_by_the_active_key_when_the_job_is_split(job):
    key = keyring().active
    units = list(WorkUnit.objects.filter(job=job))

    assert len(units) == 2
    for unit in units:
        assert unit.signing_key_id == key.key_id
        assert key.verifies(bytes(unit.signature), unit_message(unit_id=unit.pk, payload=unit.payload))


def test_a_lease_carries_a_signature_the_agent_verifies_over_the_payload(job, device):
    pins = pins_of(device.client().get(KEYS).json()["marketplace_keys"])

    leases = device.client().post(LEASE, {"max_units": 2}, format="json").json()["leases"]

    assert len(leases) == 2
    for lease in leases:
        pins.verify_unit(unit_id=lease["unit_id"], payload=lease["payload"], key_id=lease["key_id"],
                         signature=lease["signature"])  # raises if it does not verify


def test_tampering_with_a_stored_payload_makes_its_signature_fail(job, device):
    pins = pins_of(device.client().get(KEYS).json()["marketplace_keys"])
    unit = WorkUnit.objects.filter(job=job).order_by("index").first()
    WorkUnit.objects.filter(pk=unit.pk).update(payload={**unit.payload, "batch_size": 1})

    (lease, *_) = device.client().post(LEASE, {"max_units": 2}, format="json").json()["leases"]

    assert lease["unit_id"] == unit.pk and lease["payload"]["batch_size"] == 1
    with pytest.raises(UnitSignatureInvalid, match=f"the signature of unit {unit.pk} does not verify"):
        pins.verify_unit(unit_id=lease["unit_id"], payload=lease["payload"], key_id=lease["key_id"],
                         signature=lease["signature"])


def test_a_signature_moved_to_another_unit_fails(job, device):
    first, second = WorkUnit.objects.filter(job=job).order_by("index")
    pins = pins_of([key.wire() for key in keyring().published()])

    with pytest.raises(UnitSignatureInvalid):
        pins.verify_unit(unit_id=second.pk, payload=first.payload, key_id=first.signing_key_id,
                         signature=b64encode(bytes(first.signature)))


def test_units_made_after_a_rotation_are_signed_by_the_new_key_and_older_ones_still_verify(submit_job, device):
    enrolled_with = pins_of([key.wire() for key in keyring().published()])
    older = submit_job(rows=4, rows_per_unit=4)
    call_command("signing_key_rotate", stdout=StringIO())
    newer = submit_job(rows=4, rows_per_unit=4)

    enrolled_with.merge(parse_keys(device.client().get(KEYS).json()["marketplace_keys"]))  # as the agent does

    for job in (older, newer):
        (unit,) = WorkUnit.objects.filter(job=job)
        enrolled_with.verify_unit(unit_id=unit.pk, payload=unit.payload, key_id=unit.signing_key_id,
                                  signature=b64encode(bytes(unit.signature)))
    assert WorkUnit.objects.get(job=newer).signing_key_id == keyring().active.key_id != WorkUnit.objects.get(
        job=older).signing_key_id


def test_units_sign_signs_a_unit_made_one_by_one(job):
    source = WorkUnit.objects.filter(job=job).first()
    copy = WorkUnit.objects.create(job=job, index=source.index, payload=source.payload, known_answer_of=source)

    units_sign([copy])

    copy.refresh_from_db()
    assert keyring().active.verifies(bytes(copy.signature), unit_message(unit_id=copy.pk, payload=copy.payload))


# --- keys for agents ----------------------------------------------------------------------------------

def test_enrolment_answers_with_the_marketplace_keys_to_pin(api, contributor):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    call_command("signing_key_rotate", stdout=StringIO())
    token = api(contributor).post("/api/v1/enrollment-tokens/", {}, format="json").json()["token"]
    key = Ed25519PrivateKey.generate()
    public = b64encode(key.public_key().public_bytes_raw())
    body = {"token": token, "name": "box", "public_key": public, "hardware": {"os": "linux"},
            "proof": b64encode(key.sign(enroll_message(token=token, public_key_b64=public)))}

    response = APIClient().post(ENROLL, body, format="json")

    assert response.status_code == 201, response.json()
    pinned = response.json()["marketplace_keys"]
    assert pinned == [key.wire() for key in keyring().published()]
    assert len(pinned) == 2 and pinned[1]["endorsed_by"] == pinned[0]["key_id"]
    assert len(b64decode(pinned[0]["public_key"])) == 32


def test_agent_keys_lists_every_key_retired_ones_included(device):
    first = keyring().active.key_id
    call_command("signing_key_rotate", stdout=StringIO())
    call_command("signing_key_retire", first, stdout=StringIO())

    response = device.client().get(KEYS)

    assert response.status_code == 200
    listed = {key["key_id"]: key for key in response.json()["marketplace_keys"]}
    assert listed[first]["retired"] is True
    assert listed[keyring().active.key_id]["retired"] is False


def test_agent_keys_is_for_devices_only(api, contributor):
    assert api(contributor).get(KEYS).status_code in (401, 403)
    assert APIClient().get(KEYS).status_code == 401


# --- result signatures hold for one lease of one device -------------------------------------------------

@pytest.fixture
def two_leases(job, device):
    """The device holds both units of the job; the honest output of the first, uploaded and signed."""
    first, second = (Result.objects.select_related("unit").get(pk=lease.result_id)
                     for lease in workunit_lease(device=device.device, max_units=2))
    return first, second


def post_report(enrolled, result_id, sha, signature):
    return enrolled.client().post(f"/api/v1/agent/results/{result_id}/report",
                                  {"output_sha256": sha, "signature": signature}, format="json")


def test_a_result_signature_is_refused_on_another_lease_of_the_same_device(
    two_leases, device, upload, make_output, honest_output
):
    first, second = two_leases
    sha = upload(make_output(honest_output(first.unit)), device=device.device)  # the right shape for both units
    signature = device.sign(first, sha)

    replayed = post_report(device, second.pk, sha, signature)

    assert replayed.status_code == 400
    assert replayed.json()["error"]["fields"] == {"signature": "invalid"}
    assert Result.objects.get(pk=second.pk).state == Result.State.IN_PROGRESS
    assert post_report(device, first.pk, sha, signature).status_code == 200  # where it belongs


def test_a_result_signature_is_refused_on_another_devices_lease(
    two_leases, device, make_device, other_contributor, upload, make_output, honest_output
):
    first, _ = two_leases
    thief = make_device(other_contributor, name="thief")
    (stolen,) = workunit_lease(device=thief.device, max_units=1)  # the other replica of a unit
    sha = upload(make_output(honest_output(first.unit)), device=device.device)
    upload(make_output(honest_output(first.unit)), device=thief.device)  # it holds the bytes too: only keys differ

    # The honest device's signature, replayed by the thief on its own lease...
    replayed = post_report(thief, stolen.result_id, sha, device.sign(first, sha))
    # ...or signed with the honest key for the thief's lease (still not the thief's key).
    reforged = post_report(thief, stolen.result_id, sha,
                           device.sign(Result.objects.get(pk=stolen.result_id), sha))

    for response in (replayed, reforged):
        assert response.status_code == 400
        assert response.json()["error"]["fields"] == {"signature": "invalid"}
    assert Result.objects.get(pk=stolen.result_id).state == Result.State.IN_PROGRESS
