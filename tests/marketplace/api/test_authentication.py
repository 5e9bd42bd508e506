"""Who may call the API: people with hashed, expiring, revocable tokens (django-rest-knox), and devices
whose owner's account is active."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from knox.models import AuthToken

from marketplace.accounts.services import api_token_create
from marketplace.workunits.models import Result

LOGIN = {"username": "submitter", "password": "submitter-password"}


def login(api, **body) -> dict:
    response = api().post("/api/v1/auth/token/", {**LOGIN, **body}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def as_token(api, token: str):
    client = api()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


# --- devices of inactive accounts -----------------------------------------------------------------

@pytest.fixture
def deactivated_device(make_device, contributor, submit_job):
    """A device that holds a lease, whose owner's account is then deactivated."""
    submit_job(rows=4, rows_per_unit=4)
    device = make_device(contributor)
    leased = device.client().post("/api/v1/agent/lease", {"max_units": 1}, format="json").json()["leases"]
    assert len(leased) == 1
    contributor.is_active = False
    contributor.save(update_fields=["is_active"])
    return device, leased[0]["result_id"]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("post", "/api/v1/agent/lease", {"max_units": 1}),
    ("post", "/api/v1/agent/heartbeat", {"result_ids": ["RESULT"]}),
    ("post", "/api/v1/agent/results/RESULT/report", {"output_sha256": "0" * 64, "signature": "x"}),
    ("post", "/api/v1/agent/results/RESULT/fail", {"error": "x"}),
    ("get", "/api/v1/agent/keys", None),
])
def test_a_device_of_a_deactivated_account_is_refused(deactivated_device, method, path, body):
    device, result_id = deactivated_device
    body = json.loads(json.dumps(body).replace('"RESULT"', str(result_id))) if body else None

    response = getattr(device.client(), method)(path.replace("RESULT", str(result_id)), body, format="json")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert "deactivated" in response.json()["error"]["message"]
    assert Result.objects.get(pk=result_id).state == Result.State.IN_PROGRESS  # nothing reported or given up


def test_a_device_of_a_deactivated_account_cannot_upload(deactivated_device):
    device, _ = deactivated_device

    response = device.client().post("/api/v1/artifacts/", data=b"output", content_type="application/octet-stream")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


# --- people's tokens ------------------------------------------------------------------------------

@pytest.mark.usefixtures("submitter")
def test_a_login_answers_a_token_its_expiry_and_its_key(api, settings):
    before = timezone.now()

    body = login(api)

    assert set(body) == {"token", "expiry", "token_key"}
    assert body["token"].startswith(body["token_key"])
    expiry = AuthToken.objects.get(token_key=body["token_key"]).expiry
    assert abs(expiry - before - timedelta(seconds=settings.IDLEGRID_TOKEN_TTL_SECONDS)) < timedelta(seconds=60)
    assert as_token(api, body["token"]).get("/api/v1/devices/").status_code == 200


@pytest.mark.usefixtures("submitter")
def test_only_a_digest_of_the_token_is_stored(api):
    token = login(api)["token"]

    row = AuthToken.objects.get()
    assert token not in {row.digest, row.token_key}
    assert len(row.digest) == 128  # SHA-512, hex


def test_an_inactive_person_can_neither_log_in_nor_use_a_token(api, submitter):
    token = login(api)["token"]
    submitter.is_active = False
    submitter.save(update_fields=["is_active"])

    assert api().post("/api/v1/auth/token/", LOGIN, format="json").status_code == 400
    assert as_token(api, token).get("/api/v1/devices/").status_code == 401


@pytest.mark.usefixtures("submitter")
def test_an_expired_token_is_refused(api):
    body = login(api)
    AuthToken.objects.filter(token_key=body["token_key"]).update(expiry=timezone.now() - timedelta(seconds=1))

    response = as_token(api, body["token"]).get("/api/v1/devices/")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


@pytest.mark.usefixtures("submitter")
def test_a_person_lists_their_tokens_without_the_tokens(api):
    first, second = login(api), login(api)

    response = as_token(api, second["token"]).get("/api/v1/auth/tokens/")

    assert response.status_code == 200
    assert [(t["token_key"], t["current"]) for t in response.json()] == [(second["token_key"], True),
                                                                          (first["token_key"], False)]
    assert first["token"] not in response.content.decode() and second["token"] not in response.content.decode()
    assert set(response.json()[0]) == {"token_key", "created", "expiry", "current", "name", "last_used_at"}


@pytest.mark.usefixtures("submitter")
def test_a_person_revokes_one_token(api):
    first, second = login(api), login(api)

    response = as_token(api, second["token"]).delete(f"/api/v1/auth/tokens/{first['token_key']}/")

    assert response.status_code == 204
    assert as_token(api, first["token"]).get("/api/v1/devices/").status_code == 401
    assert as_token(api, second["token"]).get("/api/v1/devices/").status_code == 200
    assert as_token(api, second["token"]).delete(f"/api/v1/auth/tokens/{first['token_key']}/").status_code == 404


def test_nobody_revokes_another_persons_token(api, submitter, other_submitter):
    body = login(api)

    response = api(other_submitter).delete(f"/api/v1/auth/tokens/{body['token_key']}/")

    assert response.status_code == 404
    assert as_token(api, body["token"]).get("/api/v1/devices/").status_code == 200


@pytest.mark.usefixtures("submitter")
def test_logout_revokes_the_token_it_was_called_with(api):
    first, second = login(api), login(api)

    assert as_token(api, first["token"]).post("/api/v1/auth/logout/").status_code == 204

    assert as_token(api, first["token"]).get("/api/v1/devices/").status_code == 401
    assert as_token(api, second["token"]).get("/api/v1/devices/").status_code == 200


@pytest.mark.usefixtures("submitter")
def test_logout_all_revokes_every_token_of_the_person(api, other_submitter):
    first, second = login(api), login(api)
    others = api(other_submitter)

    assert as_token(api, first["token"]).post("/api/v1/auth/logout-all/").status_code == 204

    assert [as_token(api, t["token"]).get("/api/v1/devices/").status_code for t in (first, second)] == [401, 401]
    assert others.get("/api/v1/devices/").status_code == 200


def test_past_the_limit_a_new_token_revokes_the_oldest(submitter, settings):
    settings.REST_KNOX = {**settings.REST_KNOX, "TOKEN_LIMIT_PER_USER": 3}
    made = [api_token_create(user=submitter)[0].token_key for _ in range(4)]

    assert sorted(AuthToken.objects.filter(user=submitter).values_list("token_key", flat=True)) == sorted(made[1:])


# --- account_create -------------------------------------------------------------------------------

def run_account_create(capsys, *args: str) -> dict:
    call_command("account_create", *args)
    return json.loads(capsys.readouterr().out)


@pytest.mark.django_db
def test_account_create_prints_a_working_api_token(api, capsys):
    printed = run_account_create(capsys, "alice")

    assert set(printed) == {"username", "id", "token"}
    assert as_token(api, printed["token"]).get("/api/v1/devices/").status_code == 200


@pytest.mark.django_db
def test_account_create_with_exists_ok_prints_a_new_token_and_the_old_one_still_works(api, capsys):
    first = run_account_create(capsys, "alice")

    again = run_account_create(capsys, "alice", "--exists-ok")

    assert again["id"] == first["id"] and again["token"] != first["token"]
    assert [as_token(api, p["token"]).get("/api/v1/devices/").status_code for p in (first, again)] == [200, 200]


@pytest.mark.django_db
@pytest.mark.parametrize(("password", "says"), [
    ("short", "too short"),
    ("password123", "too common"),
    ("40912873561234", "entirely numeric"),
    ("alice1234", "too similar"),
])
def test_account_create_refuses_a_weak_password_and_creates_nothing(password, says, django_user_model):
    with pytest.raises(CommandError, match=says):
        call_command("account_create", "alice", "--password", password)

    assert not django_user_model.objects.filter(username="alice").exists()


@pytest.mark.django_db
def test_account_create_takes_a_strong_password_for_logins(api, capsys):
    run_account_create(capsys, "alice", "--password", "correct horse battery staple")

    response = api().post("/api/v1/auth/token/", {"username": "alice", "password": "correct horse battery staple"},
                          format="json")

    assert response.status_code == 201
