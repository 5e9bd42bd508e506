"""Idempotency-Key on every POST of the person-facing API, and enrolment; answers holding a secret are
stored sealed (marketplace/api/idempotency.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct
from knox.models import AuthToken
from rest_framework.test import APIClient

from marketplace.accounts.models import EnrollmentToken
from marketplace.api import idempotency
from marketplace.api.idempotency import Sealed
from marketplace.api.models import IdempotencyKey
from marketplace.api.specs import example_artifacts, example_inference
from marketplace.jobs.models import Job
from marketplace.ledger.models import WalletLink
from marketplace.workers.models import Device
from tests.conftest import public_key_b64
from worker_agent.protocol import b64encode, enroll_message

HARDWARE = {"os": "linux", "machine": "x86_64", "torch_version": "2.13.0", "device_type": "cpu"}


@dataclass
class Operation:
    """One POST: who sends it, the body of the first request, another body, and how many rows it made."""

    client: Callable[[], APIClient]
    url: str
    body: Callable[[], dict[str, Any]]
    other: Callable[[], dict[str, Any]]
    made: Callable[[], int]


@pytest.fixture
def operations(api, submitter, enqueued) -> dict[str, Operation]:
    person = api(submitter)

    def quote_body(rows_per_unit: int = 4) -> dict[str, Any]:
        for data in example_artifacts().values():
            person.post("/api/v1/artifacts/", data=data, content_type="application/octet-stream")
        body = example_inference()
        body["spec"]["rows_per_unit"] = rows_per_unit
        return body

    wallet_key = EthAccount.create()

    def link_body() -> dict[str, Any]:
        challenge = person.get("/api/v1/wallet/challenge/").json()
        signature = wallet_key.sign_message(encode_defunct(text=challenge["message"])).signature.to_0x_hex()
        return {"nonce": challenge["nonce"], "address": wallet_key.address, "signature": signature,
                "password": "submitter-password"}

    login = {"username": "submitter", "password": "submitter-password"}
    return {
        "job_quote": Operation(lambda: person, "/api/v1/jobs/quote/", quote_body, lambda: quote_body(5),
                               lambda: Job.objects.count()),
        "enrollment_token_create": Operation(lambda: person, "/api/v1/enrollment-tokens/", dict,
                                             lambda: {"note": "other"}, lambda: EnrollmentToken.objects.count()),
        "wallet_link": Operation(lambda: person, "/api/v1/wallet/", link_body,
                                 lambda: {**link_body(), "address": EthAccount.create().address},
                                 lambda: WalletLink.objects.count()),
        "auth_token_create": Operation(APIClient, "/api/v1/auth/token/", lambda: login,
                                       lambda: {**login, "password": "another"},
                                       lambda: AuthToken.objects.count()),
    }


def post(operation: Operation, body: dict[str, Any], key: str):
    return operation.client().post(operation.url, body, format="json", HTTP_IDEMPOTENCY_KEY=key)


OPERATIONS = ["job_quote", "enrollment_token_create", "wallet_link", "auth_token_create"]


@pytest.mark.parametrize("name", OPERATIONS)
def test_a_retry_with_the_same_key_gets_the_first_answer_byte_for_byte_and_runs_nothing_again(operations, name):
    operation = operations[name]
    body = operation.body()
    first = post(operation, body, "retry-1")
    made = operation.made()

    again = post(operation, body, "retry-1")

    assert first.status_code in (200, 201), first.content
    assert (again.status_code, again.content) == (first.status_code, first.content)
    assert again["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first
    assert operation.made() == made


@pytest.mark.parametrize("name", OPERATIONS)
def test_the_same_key_with_another_body_is_refused(operations, name):
    operation = operations[name]
    assert post(operation, operation.body(), "reused-1").status_code in (200, 201)
    made = operation.made()

    other = post(operation, operation.other(), "reused-1")

    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert operation.made() == made


@pytest.mark.parametrize("name", OPERATIONS)
def test_a_key_whose_first_request_is_running_answers_409(operations, name, submitter, monkeypatch):
    operation = operations[name]
    body = operation.body()
    monkeypatch.setattr(idempotency, "_fingerprint", lambda request, sealed: "f" * 64)
    user = None if name == "auth_token_create" else submitter
    IdempotencyKey.objects.create(user=user, key=Sealed("busy-1", user).digest, operation=f"POST {operation.url}",
                                  fingerprint="f" * 64)
    made = operation.made()

    busy = post(operation, body, "busy-1")

    assert busy.status_code == 409
    assert busy.json()["error"]["code"] == "idempotency_key_in_flight"
    assert operation.made() == made


# --- secrets ---------------------------------------------------------------------------------------

def stored_row_bytes(row: IdempotencyKey) -> bytes:
    return b" ".join(str(value).encode() for value in (row.key, row.operation, row.fingerprint)) + bytes(row.body)


@pytest.mark.parametrize(("name", "secret_field"), [("enrollment_token_create", "token"),
                                                    ("auth_token_create", "token")])
def test_a_recorded_answer_holding_a_secret_does_not_hold_it_in_the_row(operations, name, secret_field):
    operation = operations[name]
    answer = post(operation, operation.body(), "secret-key-1")
    secret = answer.json()[secret_field]

    row = IdempotencyKey.objects.get()
    stored = stored_row_bytes(row)

    assert secret.encode() not in stored
    assert b"secret-key-1" not in stored  # the raw key neither: the row is named by an HMAC
    assert b"submitter-password" not in stored
    assert Sealed("secret-key-1", row.user).open(bytes(row.body)) == answer.content


def test_an_anonymous_login_with_a_key_makes_one_token_and_a_wrong_password_is_not_remembered(operations):
    login = operations["auth_token_create"]
    before = login.made()

    refused = post(login, {"username": "submitter", "password": "wrong"}, "login-1")
    first = post(login, login.body(), "login-1")
    again = post(login, login.body(), "login-1")

    assert refused.status_code == 400
    assert first.status_code == again.status_code == 201
    assert again.json()["token"] == first.json()["token"]
    assert login.made() == before + 1


def test_a_retried_enrolment_gets_the_same_device_secret_and_enrols_one_device(api, contributor):
    token = api(contributor).post("/api/v1/enrollment-tokens/").json()["token"]
    key = Ed25519PrivateKey.generate()
    public = public_key_b64(key)
    body = {"token": token, "name": "garage pc", "public_key": public, "hardware": HARDWARE,
            "proof": b64encode(key.sign(enroll_message(token=token, public_key_b64=public)))}

    first = APIClient().post("/api/v1/agent/enroll", body, format="json", HTTP_IDEMPOTENCY_KEY="enrol-1")
    again = APIClient().post("/api/v1/agent/enroll", body, format="json", HTTP_IDEMPOTENCY_KEY="enrol-1")

    assert first.status_code == again.status_code == 201, first.content
    assert again.content == first.content
    assert Device.objects.count() == 1
    row = IdempotencyKey.objects.get(user=None)
    assert first.json()["device_secret"].encode() not in stored_row_bytes(row)
    assert token.encode() not in stored_row_bytes(row)


def test_a_retried_logout_finds_its_token_gone(api, submitter):
    client = api(submitter)

    first = client.post("/api/v1/auth/logout/", HTTP_IDEMPOTENCY_KEY="bye-1")
    again = client.post("/api/v1/auth/logout/", HTTP_IDEMPOTENCY_KEY="bye-1")

    assert first.status_code == 204
    assert again.status_code == 401  # the token it was sent with is revoked: logged out, as asked


def test_a_row_is_named_under_the_secret_key_and_a_tampered_answer_is_never_replayed(operations, settings):
    operation = operations["enrollment_token_create"]
    assert post(operation, {}, "sealed-1").status_code == 201
    row = IdempotencyKey.objects.get()
    body = bytearray(row.body)
    body[-1] ^= 1
    IdempotencyKey.objects.filter(pk=row.pk).update(body=bytes(body))

    tampered = post(operation, {}, "sealed-1")

    assert tampered.status_code == 422
    assert EnrollmentToken.objects.count() == 1
    settings.SECRET_KEY = "another secret key for this test"
    assert Sealed("sealed-1", row.user).digest != row.key  # after a rotation the key names another row


@pytest.mark.parametrize(("url", "body"), [
    ("/api/v1/agent/lease", {"max_units": 1}), ("/api/v1/agent/heartbeat", {"result_ids": []}),
])
def test_an_idempotency_key_on_an_agent_hot_path_is_harmless(make_device, contributor, url, body):
    client = make_device(contributor).client()

    answers = [client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="agent-1") for _ in range(2)]

    assert [a.status_code for a in answers] == [200, 200]
    assert "Idempotent-Replayed" not in answers[1]
    assert IdempotencyKey.objects.count() == 0


def test_an_artifact_upload_with_a_key_is_content_addressed_anyway(api, submitter, artifact_dir):
    client = api(submitter)

    answers = [client.post("/api/v1/artifacts/", data=b"same bytes", content_type="application/octet-stream",
                           HTTP_IDEMPOTENCY_KEY="upload-1") for _ in range(2)]

    assert [a.status_code for a in answers] == [201, 200]
    assert answers[0].json() == answers[1].json()
    assert IdempotencyKey.objects.count() == 0


# --- rows recorded before keys were sealed ------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_the_migration_seals_rows_recorded_in_clear(django_user_model):
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before, after = [("api", "0001_idempotency_keys")], [("api", "0002_idempotency_keys_sealed")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps.get_model("api", "IdempotencyKey")
    person = django_user_model.objects.create_user(username="old-row-owner", password="x")
    old.objects.create(user_id=person.pk, key="order-1", operation="POST /api/v1/enrollment-tokens/",
                       fingerprint="0" * 64, state="done", status_code=201, body=b'{"token":"enr_secret"}',
                       content_type="application/json")
    try:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(after)
    finally:
        MigrationExecutor(connection).migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())

    row = IdempotencyKey.objects.get()
    sealed = Sealed("order-1", person)
    assert row.key == sealed.digest
    assert b"enr_secret" not in bytes(row.body)
    assert sealed.open(bytes(row.body)) == b'{"token":"enr_secret"}'
