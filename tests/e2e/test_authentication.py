"""Authentication through the real web server (gunicorn, two workers): tokens from `account_create` and
from a login work, are listed and revoked; password guesses are throttled per client address whichever
worker answers, because the counters live in the shared cache (a folder under the cluster's var dir)."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import Client


def test_password_guesses_are_throttled_across_web_workers_whatever_x_forwarded_for_says(cluster):
    Client(cluster, "victim")
    guess = {"username": "victim", "password": "not-the-password"}

    with httpx.Client(base_url=cluster.url, timeout=30) as http:
        answers = [http.post("/api/v1/auth/token/", json=guess, headers={"X-Forwarded-For": f"198.51.100.{i}"})
                   for i in range(41)]

    assert [a.status_code for a in answers[:10]] == [400] * 10
    assert [a.status_code for a in answers[10:]] == [429] * 31
    assert answers[-1].json()["error"]["code"] == "throttled"
    assert int(answers[-1].headers["Retry-After"]) >= 1


def test_a_login_token_is_listed_and_revoked_by_logout(cluster):
    person = Client(cluster, "alice")  # a token printed by `manage.py account_create`
    login = httpx.post(f"{cluster.url}/api/v1/auth/token/", timeout=30,
                       json={"username": "alice", "password": cluster.passwords["alice"]})
    assert login.status_code == 201, login.text
    mine = {"Authorization": f"Token {login.json()['token']}"}

    listed = httpx.get(f"{cluster.url}/api/v1/auth/tokens/", headers=mine, timeout=30).json()
    assert [t["current"] for t in listed] == [True, False]

    assert httpx.post(f"{cluster.url}/api/v1/auth/logout/", headers=mine, timeout=30).status_code == 204
    assert httpx.get(f"{cluster.url}/api/v1/devices/", headers=mine, timeout=30).status_code == 401
    assert person.http.get("/api/v1/devices/").status_code == 200
