"""API tokens carry a name given at login and say when they were last used, recorded to the minute:
at most one write a minute per token, however many requests it makes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from marketplace.accounts.models import ApiTokenInfo
from marketplace.accounts.services import api_token_create, api_token_used

LOGIN = {"username": "submitter", "password": "submitter-password"}


def as_token(api, token: str):
    client = api()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


def _writes(queries) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].lstrip().upper().startswith(("UPDATE", "INSERT"))]


@pytest.mark.usefixtures("submitter")
def test_a_login_names_its_token_and_the_list_shows_the_name(api):
    made = api().post("/api/v1/auth/token/", {**LOGIN, "name": "  nightly script  "}, format="json").json()

    listed = as_token(api, made["token"]).get("/api/v1/auth/tokens/").json()

    assert len(listed) == 1
    assert listed[0]["name"] == "nightly script"
    assert listed[0]["token_key"] == made["token_key"]


@pytest.mark.usefixtures("submitter")
def test_a_login_without_a_name_makes_an_unnamed_token(api):
    made = api().post("/api/v1/auth/token/", LOGIN, format="json").json()

    assert as_token(api, made["token"]).get("/api/v1/auth/tokens/").json()[0]["name"] == ""


@pytest.mark.usefixtures("submitter")
def test_a_name_too_long_is_refused_and_no_token_is_made(api, submitter):
    response = api().post("/api/v1/auth/token/", {**LOGIN, "name": "x" * 101}, format="json")

    assert response.status_code == 400
    assert "name" in response.json()["error"]["fields"]
    assert not submitter.auth_token_set.exists()


def test_a_token_in_use_shows_its_last_use(api, submitter):
    _, token = api_token_create(user=submitter, name="ci")
    before = timezone.now()

    listed = as_token(api, token).get("/api/v1/auth/tokens/").json()

    assert listed[0]["last_used_at"] is not None
    assert ApiTokenInfo.objects.get(token__user=submitter).last_used_at >= before


def test_a_token_never_used_says_so(api, submitter):
    _, used = api_token_create(user=submitter, name="used")
    api_token_create(user=submitter, name="never")

    listed = {t["name"]: t for t in as_token(api, used).get("/api/v1/auth/tokens/").json()}

    assert listed["never"]["last_used_at"] is None
    assert listed["used"]["last_used_at"] is not None


def test_requests_within_a_minute_write_the_last_use_once(api, submitter):
    row, token = api_token_create(user=submitter)
    client = as_token(api, token)
    client.get("/api/v1/devices/")  # the first use is written
    first = ApiTokenInfo.objects.get(pk=row.digest).last_used_at

    with CaptureQueriesContext(connection) as queries:
        for _ in range(5):
            assert client.get("/api/v1/devices/").status_code == 200

    # one conditional UPDATE per request, which matches no row inside the minute; never an INSERT
    info_writes = [sql for sql in _writes(queries) if "accounts_apitokeninfo" in sql]
    assert len(info_writes) == 5 and all(sql.lstrip().upper().startswith("UPDATE") for sql in info_writes)
    assert all("last_used_at" in sql and "<" in sql for sql in info_writes)
    assert ApiTokenInfo.objects.get(pk=row.digest).last_used_at == first


def test_a_use_a_minute_later_is_written_again(submitter):
    row, _ = api_token_create(user=submitter)
    now = timezone.now()

    assert api_token_used(digest=row.digest, now=now) is True
    assert api_token_used(digest=row.digest, now=now + timedelta(seconds=30)) is False
    assert api_token_used(digest=row.digest, now=now + timedelta(seconds=61)) is True
    assert ApiTokenInfo.objects.get(pk=row.digest).last_used_at == now + timedelta(seconds=61)


def test_a_token_made_before_names_existed_gets_its_row_at_first_use(api, submitter):
    row, token = api_token_create(user=submitter)
    ApiTokenInfo.objects.filter(pk=row.digest).delete()

    listed = as_token(api, token).get("/api/v1/auth/tokens/").json()

    assert listed[0]["name"] == "" and listed[0]["last_used_at"] is not None


def test_a_revoked_token_takes_its_name_with_it(api, submitter):
    first, _ = api_token_create(user=submitter, name="old")
    _, second = api_token_create(user=submitter, name="new")

    assert as_token(api, second).delete(f"/api/v1/auth/tokens/{first.token_key}/").status_code == 204

    assert list(ApiTokenInfo.objects.values_list("name", flat=True)) == ["new"]


def test_the_schema_documents_the_name_and_the_last_use(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    components = schema["components"]["schemas"]

    assert {"name", "last_used_at"} <= set(components["TokenListed"]["properties"])
    assert "name" in components["LoginIn"]["properties"]
    assert "name" not in components["LoginIn"].get("required", [])
