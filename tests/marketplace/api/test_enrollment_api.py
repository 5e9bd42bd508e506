"""Enrolment (POST /api/v1/agent/enroll) and device authentication (Authorization: Device id:secret)."""

import base64
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.accounts.models import EnrollmentToken
from marketplace.workers.models import Device
from marketplace.workers.services import hardware_class_of
from worker_agent.protocol import b64encode, enroll_message

ENROLL = "/api/v1/agent/enroll"
HARDWARE = {"os": "linux", "machine": "x86_64", "torch_version": "2.13.0", "device_type": "cpu"}


@pytest.fixture
def token(api, contributor):
    response = api(contributor).post("/api/v1/enrollment-tokens/", {}, format="json")
    assert response.status_code == 201
    return response.json()["token"]


def raw_public_key(key):
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def enrolment(token, key=None, *, public_key=None, proof=None, name="garage pc", hardware=None):
    key = key or Ed25519PrivateKey.generate()
    public_key = public_key or b64encode(raw_public_key(key))
    proof = proof or b64encode(key.sign(enroll_message(token=token, public_key_b64=public_key)))
    return {"token": token, "name": name, "public_key": public_key, "hardware": hardware or HARDWARE, "proof": proof}


def enroll(body):
    return APIClient().post(ENROLL, body, format="json")


def test_a_contributor_gets_a_one_time_token_that_expires(api, contributor, settings):
    response = api(contributor).post("/api/v1/enrollment-tokens/", {}, format="json")

    assert response.status_code == 201
    row = EnrollmentToken.objects.get()
    assert response.json()["token"].startswith("enr_")
    assert row.owner == contributor
    assert response.json()["token"] not in row.token_hash  # only its hash is kept
    assert row.expires_at - row.created_at == pytest.approx(
        timedelta(seconds=settings.IDLEGRID_ENROLLMENT_TOKEN_SECONDS), abs=timedelta(seconds=5)
    )


def test_a_device_enrols_under_the_tokens_owner(token, contributor, settings):
    key = Ed25519PrivateKey.generate()

    response = enroll(enrolment(token, key))

    assert response.status_code == 201, response.json()
    body = response.json()
    device = Device.objects.get()
    assert body["device_id"] == device.pk
    assert body["lease_seconds"] == settings.IDLEGRID_LEASE_SECONDS
    assert (device.owner, device.name, bytes(device.public_key)) == (contributor, "garage pc", raw_public_key(key))
    assert device.hardware_class == hardware_class_of(HARDWARE)
    assert EnrollmentToken.objects.get().device == device
    authorised = APIClient().post("/api/v1/agent/lease", {}, format="json",
                                  HTTP_AUTHORIZATION=f"Device {body['device_id']}:{body['device_secret']}")
    assert authorised.status_code == 200


def test_a_token_enrols_only_one_device(token):
    assert enroll(enrolment(token)).status_code == 201

    response = enroll(enrolment(token))

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert Device.objects.count() == 1


def test_an_expired_token_is_refused(token):
    EnrollmentToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))

    response = enroll(enrolment(token))

    assert response.status_code == 403
    assert Device.objects.count() == 0
    assert EnrollmentToken.objects.get().used_at is None


def test_an_unknown_token_is_refused(db):
    response = enroll(enrolment("enr_made-up"))

    assert response.status_code == 403
    assert Device.objects.count() == 0


def test_a_proof_by_another_key_is_refused(token):
    key, impostor = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    public_key = b64encode(raw_public_key(key))
    proof = b64encode(impostor.sign(enroll_message(token=token, public_key_b64=public_key)))

    response = enroll(enrolment(token, key, proof=proof))

    assert response.status_code == 400
    assert "proof" in response.json()["error"]["fields"]
    assert Device.objects.count() == 0
    assert EnrollmentToken.objects.get().used_at is None


def test_a_proof_made_for_another_token_is_refused(token):
    key = Ed25519PrivateKey.generate()
    public_key = b64encode(raw_public_key(key))
    proof = b64encode(key.sign(enroll_message(token="enr_another", public_key_b64=public_key)))

    response = enroll(enrolment(token, key, proof=proof))

    assert response.status_code == 400
    assert Device.objects.count() == 0


@pytest.mark.parametrize("length", [31, 33, 64])
def test_a_public_key_of_the_wrong_length_is_refused(token, length):
    response = enroll(enrolment(token, public_key=b64encode(b"k" * length)))

    assert response.status_code == 400
    assert "public_key" in response.json()["error"]["fields"]
    assert Device.objects.count() == 0
    assert EnrollmentToken.objects.get().used_at is None


def test_a_public_key_that_is_not_base64_is_refused(token):
    response = enroll(enrolment(token, public_key="not base64!"))

    assert response.status_code == 400
    assert "public_key" in response.json()["error"]["fields"]
    assert Device.objects.count() == 0


@pytest.mark.parametrize(("field", "value"), [("name", "   "), ("hardware", ["cpu"]), ("hardware", {"x": "y" * 9000})])
def test_a_bad_name_or_hardware_is_refused(token, field, value):
    response = enroll({**enrolment(token), field: value})

    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert Device.objects.count() == 0


def test_the_device_list_shows_only_your_devices_with_their_counters(api, contributor, other_contributor, make_device):
    mine = make_device(contributor, name="mine")
    make_device(other_contributor, name="theirs")
    Device.objects.filter(pk=mine.pk).update(valid_results=3, invalid_results=1)

    response = api(contributor).get("/api/v1/devices/")

    assert response.status_code == 200
    devices = response.json()["results"]
    assert [(d["id"], d["name"], d["valid_results"], d["invalid_results"]) for d in devices] == [
        (mine.pk, "mine", 3, 1)
    ]
    assert devices[0]["last_seen_at"] is not None


def test_a_device_cannot_mint_enrolment_tokens(make_device, contributor):
    response = make_device(contributor).client().post("/api/v1/enrollment-tokens/", {}, format="json")

    assert response.status_code == 401
    assert EnrollmentToken.objects.filter(used_at__isnull=True).count() == 0


# --- device authentication ------------------------------------------------------------------------

@pytest.fixture
def device(make_device, contributor):
    return make_device(contributor)


@pytest.mark.parametrize("header", [
    lambda device: "",
    lambda device: "Device",
    lambda device: f"Device {device.pk}",
    lambda device: f"Device {device.pk}:wrong-secret",
    lambda device: f"Device {device.pk + 1000}:{device.secret}",
    lambda device: f"Device abc:{device.secret}",
    lambda device: f"Device \u00c2\u00b2:{device.secret}",  # UTF-8 "²" seen as latin-1: a digit int() refuses
    lambda device: f"Device {'9' * 30}:{device.secret}",
    lambda device: f"Device {device.pk}:{device.secret} extra",
    lambda device: f"Token {device.secret}",
], ids=["missing", "scheme only", "no secret", "wrong secret", "unknown device", "id not a number", "id a superscript digit", "id out of range",
        "extra words", "a person's scheme"])
def test_a_bad_device_header_is_401_in_the_error_shape(device, header):
    response = APIClient().post("/api/v1/agent/lease", {}, format="json", HTTP_AUTHORIZATION=header(device))

    assert response.status_code == 401
    assert set(response.json()) == {"error"}
    assert set(response.json()["error"]) == {"code", "message", "fields"}
    assert response.json()["error"]["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Device"


def test_a_disabled_device_is_refused(device):
    Device.objects.filter(pk=device.pk).update(state=Device.State.DISABLED)

    response = device.client().post("/api/v1/agent/lease", {}, format="json")

    assert response.status_code == 401
    assert "disabled" in response.json()["error"]["message"]


def test_the_secret_is_stored_only_as_a_hash(device):
    assert device.secret not in device.refresh().secret_hash
    assert base64.b64encode(device.secret.encode()).decode() not in device.device.secret_hash
