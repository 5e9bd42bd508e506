"""Throttles (marketplace/api/throttling.py): per device, per person, per real client address; 429 in the
API's error shape with Retry-After."""

from __future__ import annotations

import os
import uuid

import pytest

from marketplace.api.throttling import _wait

GUESS = {"username": "submitter", "password": "a-guess"}


def limit(settings, **rates: str) -> None:
    """Set some scopes' rates for this test (DRF reloads its settings on the change)."""
    current = settings.REST_FRAMEWORK
    settings.REST_FRAMEWORK = {**current, "DEFAULT_THROTTLE_RATES": {**current["DEFAULT_THROTTLE_RATES"], **rates}}


def assert_throttled(response) -> None:
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "throttled"
    assert set(response.json()["error"]) == {"code", "message", "fields"}
    assert 1 <= int(response["Retry-After"]) <= 120


@pytest.mark.usefixtures("submitter")
def test_a_forged_x_forwarded_for_does_not_buy_more_password_guesses(api):
    client = api()

    statuses = [client.post("/api/v1/auth/token/", GUESS, format="json", REMOTE_ADDR="203.0.113.7",
                            HTTP_X_FORWARDED_FOR=f"198.51.100.{i}").status_code for i in range(41)]

    # The default rate, 10 a minute per address: the 11th guess and every later one are refused.
    assert statuses[:10] == [400] * 10
    assert statuses[10:] == [429] * 31
    assert_throttled(client.post("/api/v1/auth/token/", GUESS, format="json", REMOTE_ADDR="203.0.113.7"))


@pytest.mark.usefixtures("submitter")
def test_another_address_has_its_own_count(api, settings):
    limit(settings, token="2/minute")
    client = api()
    for _ in range(2):
        client.post("/api/v1/auth/token/", GUESS, format="json", REMOTE_ADDR="203.0.113.7")
    assert_throttled(client.post("/api/v1/auth/token/", GUESS, format="json", REMOTE_ADDR="203.0.113.7"))

    assert client.post("/api/v1/auth/token/", GUESS, format="json", REMOTE_ADDR="203.0.113.8").status_code == 400


@pytest.mark.usefixtures("submitter")
def test_behind_one_proxy_the_address_it_appended_is_the_client(api, settings):
    limit(settings, token="2/minute")
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    client = api()

    def guess(forwarded: str) -> int:
        return client.post("/api/v1/auth/token/", GUESS, format="json", REMOTE_ADDR="10.0.0.1",
                           HTTP_X_FORWARDED_FOR=forwarded).status_code

    # The client writes the first entries; the proxy appends the address it saw.
    assert [guess(f"192.0.2.{i}, 203.0.113.7") for i in range(3)] == [400, 400, 429]
    assert guess("192.0.2.1, 203.0.113.8") == 400


def _requests(api, submitter, device):
    """For each scope, one request that counts against it (its answer does not matter: throttles run
    before the view)."""
    person, agent = api(submitter), device.client()
    return {
        "token": lambda: api().post("/api/v1/auth/token/", GUESS, format="json"),
        "lease": lambda: agent.post("/api/v1/agent/lease", {"max_units": 1}, format="json"),
        "heartbeat": lambda: agent.post("/api/v1/agent/heartbeat", {"result_ids": [1]}, format="json"),
        "report": lambda: agent.post("/api/v1/agent/results/999999/report",
                                     {"output_sha256": "0" * 64, "signature": "x"}, format="json"),
        "fail": lambda: agent.post("/api/v1/agent/results/999999/fail", {"error": "x"}, format="json"),
        "upload": lambda: agent.post("/api/v1/artifacts/", data=b"bytes", content_type="application/octet-stream"),
        "job_create": lambda: person.post("/api/v1/jobs/", {"kind": "inference", "spec": {}}, format="json"),
        "wallet": lambda: person.get("/api/v1/wallet/challenge/"),
        "webhook_send": lambda: person.post("/api/v1/webhooks/deliveries/999999/replay/"),
    }


SCOPES = ["token", "lease", "heartbeat", "report", "fail", "upload", "job_create", "wallet", "webhook_send"]


@pytest.mark.parametrize("scope", SCOPES)
def test_each_scope_is_throttled(scope, api, settings, submitter, make_device, contributor):
    limit(settings, **{scope: "2/minute"})
    send = _requests(api, submitter, make_device(contributor))[scope]

    answers = [send().status_code for _ in range(2)]

    assert 429 not in answers
    assert_throttled(send())


def test_every_scope_has_a_rate_from_the_settings(settings):
    assert set(SCOPES) | {"enroll"} == set(settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"])


@pytest.mark.parametrize("scope", SCOPES)
def test_every_answer_of_a_throttled_view_says_what_is_left_of_the_rate(scope, api, settings, submitter,
                                                                         make_device, contributor):
    limit(settings, **{scope: "3/minute"})
    send = _requests(api, submitter, make_device(contributor))[scope]

    answers = [send() for _ in range(4)]

    assert [a["RateLimit-Limit"] for a in answers] == ["3"] * 4
    assert [a["RateLimit-Policy"] for a in answers] == ["3;w=60"] * 4
    assert [a["RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert all(1 <= int(a["RateLimit-Reset"]) <= 120 for a in answers)
    assert answers[3].status_code == 429
    assert answers[3]["Retry-After"] == answers[3]["RateLimit-Reset"]


def test_an_unthrottled_view_sends_no_rate_fields(api, submitter):
    assert "RateLimit-Limit" not in api(submitter).get("/api/v1/devices/")


def test_enrolment_is_throttled_per_address_with_the_rate_fields(api, settings):
    limit(settings, enroll="1/minute")

    first = api().post("/api/v1/agent/enroll", {}, format="json", REMOTE_ADDR="203.0.113.9")
    refused = api().post("/api/v1/agent/enroll", {}, format="json", REMOTE_ADDR="203.0.113.9")

    assert (first.status_code, first["RateLimit-Remaining"]) == (400, "0")
    assert_throttled(refused)
    assert api().post("/api/v1/agent/enroll", {}, format="json", REMOTE_ADDR="203.0.113.10").status_code == 400


def test_a_domain_limit_says_when_to_come_back_too(api, submitter, settings):
    settings.IDLEGRID_ENROLLMENTS_PER_HOUR = 1
    client = api(submitter)
    assert client.post("/api/v1/enrollment-tokens/").status_code == 201

    refused = client.post("/api/v1/enrollment-tokens/")

    assert refused.status_code == 429
    assert 3590 <= int(refused["Retry-After"]) <= 3600


def test_a_devices_throttle_is_its_own(api, settings, make_device, contributor):
    limit(settings, lease="2/minute")
    first, second = make_device(contributor, name="first"), make_device(contributor, name="second")
    for _ in range(2):
        assert first.client().post("/api/v1/agent/lease", {}, format="json").status_code == 200
    assert_throttled(first.client().post("/api/v1/agent/lease", {}, format="json"))

    assert second.client().post("/api/v1/agent/lease", {}, format="json").status_code == 200


def test_a_persons_throttle_is_their_own(api, settings, submitter, other_submitter):
    limit(settings, wallet="1/minute")
    assert api(submitter).get("/api/v1/wallet/challenge/").status_code == 200
    assert_throttled(api(submitter).get("/api/v1/wallet/challenge/"))

    assert api(other_submitter).get("/api/v1/wallet/challenge/").status_code == 200


def test_views_without_a_scope_are_not_throttled(api, settings, submitter):
    limit(settings, **dict.fromkeys(SCOPES, "1/minute"))

    assert [api(submitter).get("/api/v1/devices/").status_code for _ in range(5)] == [200] * 5


@pytest.mark.parametrize(("current", "previous", "elapsed", "expected"), [
    (2, 0, 10.0, 50.0 + 30.0),  # this window is full: wait for the next, then for half of it
    (0, 4, 0.0, 45.0),  # the previous window's 4 must weigh under 1 more: 3/4 of the way in
    (1, 2, 40.0, 20.0),  # one here, two before: at the next window, where the one here is all that counts
])
def test_the_wait_is_until_one_more_request_fits(current, previous, elapsed, expected):
    assert _wait(current, previous, limit=2, window=60, elapsed=elapsed) == pytest.approx(expected)


@pytest.fixture
def redis_cache(settings):
    """The Redis backend the settings pick with IDLEGRID_CACHE_URL, on a database nobody else uses here
    (db 7), under a prefix of this test's own; its keys are deleted after (never FLUSHDB)."""
    redis = pytest.importorskip("redis")
    url = os.environ.get("IDLEGRID_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {url}")
    prefix = f"idlegrid-test-{uuid.uuid4().hex}"
    before = settings.CACHES
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url,
                                   "KEY_PREFIX": prefix}}
    yield client, prefix
    # Back to the file cache before tests/marketplace/conftest.py's cache.clear() runs (a FLUSHDB on Redis).
    settings.CACHES = before
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


@pytest.mark.usefixtures("submitter")
def test_counts_live_in_redis_with_an_expiry(api, settings, redis_cache):
    client, prefix = redis_cache
    limit(settings, token="2/minute")
    for _ in range(2):
        api().post("/api/v1/auth/token/", GUESS, format="json", REMOTE_ADDR="203.0.113.7")

    assert_throttled(api().post("/api/v1/auth/token/", GUESS, format="json", REMOTE_ADDR="203.0.113.7"))

    [key] = client.keys(f"{prefix}:*throttle:token:addr:203.0.113.7")
    assert 0 < client.ttl(key) <= 120
