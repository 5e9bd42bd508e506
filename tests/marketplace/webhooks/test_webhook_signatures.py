"""Signatures verify with the Standard Webhooks reference verifier (the `standardwebhooks` package), with
one secret and during a rotation with either, and are refused with another secret or a changed body."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, timedelta

import pytest
from django.utils import timezone
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from marketplace.webhooks import catalog
from marketplace.webhooks.delivery import delivery_attempt, payload
from marketplace.webhooks.models import Delivery, Endpoint
from marketplace.webhooks.services import endpoint_secret_rotate, event_emit, secrets_live
from marketplace.webhooks.signing import secret_new, signed_headers


@pytest.fixture
def delivered(register, receiver, submitter, django_capture_on_commit_callbacks):
    """delivered(endpoint) -> what the receiver got for one job.completed event sent to it."""

    def send(endpoint):
        event_emit(owner_id=submitter.pk, type=catalog.JOB_COMPLETED, data={"job": {"id": 7, "state": "completed"}})
        delivery = Delivery.objects.get(endpoint=endpoint)
        assert delivery_attempt(delivery_id=delivery.pk) == "succeeded"
        return receiver.received[-1]

    return send


def test_a_secret_is_whsec_and_base64_of_32_bytes():
    secret = secret_new()

    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert secret_new() != secret


def test_what_a_receiver_gets_verifies_with_the_reference_verifier(register, delivered):
    endpoint = register()

    got = delivered(endpoint)

    assert set(got.headers) >= {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert got.headers["webhook-id"].startswith("msg_")
    assert got.headers["content-type"] == "application/json"
    verified = Webhook(endpoint.secret).verify(got.body, got.headers)
    assert verified["type"] == "job.completed"
    assert verified["data"] == {"job": {"id": 7, "state": "completed"}}
    assert verified["timestamp"].endswith("Z")


def test_another_secret_or_a_changed_body_does_not_verify(register, delivered):
    got = delivered(register())

    with pytest.raises(WebhookVerificationError):
        Webhook(secret_new()).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(register(url=None).secret).verify(got.body.replace(b"7", b"8"), got.headers)


def test_during_a_rotation_both_secrets_sign_and_each_verifies(register, delivered):
    endpoint = register()
    old = endpoint.secret
    rotated = endpoint_secret_rotate(endpoint=endpoint)

    got = delivered(rotated)

    assert rotated.secret != old
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, rotated.secret):
        assert Webhook(secret).verify(got.body, got.headers)["type"] == "job.completed"


def test_the_previous_secret_stops_signing_after_the_grace(register, settings):
    endpoint = endpoint_secret_rotate(endpoint=register())
    later = timezone.now() + timedelta(seconds=settings.IDLEGRID_WEBHOOKS_ROTATION_GRACE_SECONDS + 1)

    assert secrets_live(endpoint=endpoint, now=timezone.now()) == [endpoint.secret, endpoint.previous_secret]
    assert secrets_live(endpoint=endpoint, now=later) == [endpoint.secret]


def test_a_second_rotation_ends_the_oldest_secret(register):
    endpoint = register()
    first = endpoint.secret
    endpoint_secret_rotate(endpoint=endpoint)
    twice = endpoint_secret_rotate(endpoint=Endpoint.objects.get(pk=endpoint.pk))

    assert first not in secrets_live(endpoint=twice, now=timezone.now())
    assert len(secrets_live(endpoint=twice, now=timezone.now())) == 2


def test_a_receiver_can_verify_by_hand_with_hmac(register, delivered):
    """The manual snippet of docs/api/webhooks.md, as it is written there."""
    endpoint = register()
    got = delivered(endpoint)

    key = base64.b64decode(endpoint.secret.removeprefix("whsec_"))
    signed = f"{got.headers['webhook-id']}.{got.headers['webhook-timestamp']}.".encode() + got.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert any(hmac.compare_digest(expected, sig.partition(",")[2])
               for sig in got.headers["webhook-signature"].split(" "))


def test_signed_headers_match_the_reference_signer():
    secret = secret_new()
    headers = signed_headers(secrets_live=[secret], msg_id="msg_abc", timestamp=1_700_000_000, body=b'{"a":1}')

    from datetime import datetime

    reference = Webhook(secret).sign("msg_abc", datetime.fromtimestamp(1_700_000_000, tz=UTC), '{"a":1}')
    assert headers["webhook-signature"] == reference


def test_the_body_is_the_same_bytes_on_every_attempt(register, submitter):
    register()
    event = event_emit(owner_id=submitter.pk, type=catalog.JOB_FAILED, data={"b": 1, "a": [2, 3]})

    assert payload(event) == payload(event)
    assert payload(event).startswith(b'{"data":{"a":[2,3],"b":1},"timestamp":"')
