"""The API tokens page: a named token shown once, the list with its last use, revocation; nobody else's
tokens ever."""

from __future__ import annotations

import re
from html import unescape

from knox.models import AuthToken
from rest_framework.test import APIClient

from marketplace.accounts.models import ApiTokenInfo
from marketplace.accounts.services import api_token_create


def text(response) -> str:
    return unescape(re.sub(r"\s+", " ", response.content.decode()))


def shown_token(response) -> str | None:
    match = re.search(r'<p class="secret" id="new-token">([^<]+)</p>', response.content.decode())
    return match.group(1) if match else None


def test_a_newcomer_sees_no_tokens_and_how_to_make_one(signed_in, contributor):
    response = signed_in(contributor).get("/tokens/")

    assert response.status_code == 200
    assert "No API tokens" in text(response)
    assert shown_token(response) is None


def test_a_created_token_is_shown_once_works_and_is_listed_by_name(signed_in, contributor):
    client = signed_in(contributor)

    posted = client.post("/tokens/", {"name": "nightly script"})
    shown = client.get(posted["Location"])
    again = client.get("/tokens/")

    assert posted.status_code == 302
    token = shown_token(shown)
    assert token and "no-store" in shown["Cache-Control"]
    assert shown_token(again) is None and token not in again.content.decode()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    listed = api.get("/api/v1/auth/tokens/").json()
    assert [(t["name"], t["current"]) for t in listed] == [("nightly script", True)]
    assert "nightly script" in text(again)
    assert AuthToken.objects.get(user=contributor).token_key in again.content.decode()


def test_the_list_shows_when_each_token_was_last_used(signed_in, contributor):
    row, token = api_token_create(user=contributor, name="ci")
    api_token_create(user=contributor, name="spare")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    api.get("/api/v1/devices/")
    used = ApiTokenInfo.objects.get(pk=row.digest).last_used_at

    page = text(signed_in(contributor).get("/tokens/"))

    ci_row = re.search(r"<tr><td>ci</td>.*?</tr>", page).group(0)
    spare_row = re.search(r"<tr><td>spare</td>.*?</tr>", page).group(0)
    assert used.strftime("%Y-%m-%dT%H:%M") in ci_row
    assert spare_row.count("never") == 1  # expiry is set; last use is never


def test_a_token_without_a_name_is_refused_next_to_the_field_and_none_is_made(signed_in, contributor):
    response = signed_in(contributor).post("/tokens/", {"name": " "})

    assert response.status_code == 400
    assert re.search(r'id="id_name".*?class="field-error"[^>]*>This field is required', response.content.decode(), re.S)
    assert not AuthToken.objects.filter(user=contributor).exists()


def test_a_name_too_long_is_refused(signed_in, contributor):
    response = signed_in(contributor).post("/tokens/", {"name": "x" * 101})

    assert response.status_code == 400
    assert "at most 100 characters" in text(response)
    assert not AuthToken.objects.exists()


def test_revoking_a_token_ends_it(signed_in, contributor):
    row, token = api_token_create(user=contributor, name="old")

    page = text(signed_in(contributor).post("/tokens/revoke/", {"token_key": row.token_key}, follow=True))

    assert "was revoked" in page
    assert not AuthToken.objects.filter(pk=row.digest).exists()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert api.get("/api/v1/devices/").status_code == 401


def test_another_persons_tokens_are_never_listed_nor_revoked(signed_in, contributor, other_contributor):
    theirs, _ = api_token_create(user=other_contributor, name="their secret script")
    api_token_create(user=contributor, name="mine")

    page = text(signed_in(contributor).get("/tokens/"))
    revoked = text(signed_in(contributor).post("/tokens/revoke/", {"token_key": theirs.token_key}, follow=True))

    assert "their secret script" not in page and theirs.token_key not in page
    assert "You have no token with this key" in revoked
    assert AuthToken.objects.filter(pk=theirs.digest).exists()


def test_a_malformed_revoke_changes_nothing(signed_in, contributor):
    row, _ = api_token_create(user=contributor)

    page = text(signed_in(contributor).post("/tokens/revoke/", {"token_key": "\x00bad"}, follow=True))

    assert "No such token" in page
    assert AuthToken.objects.filter(pk=row.digest).exists()


def test_the_tokens_page_needs_a_login_and_revoke_needs_a_post(client, signed_in, contributor):
    assert client.get("/tokens/").status_code == 302
    assert signed_in(contributor).get("/tokens/revoke/").status_code == 405
