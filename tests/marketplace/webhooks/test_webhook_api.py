"""The webhooks API: a person registers, reads, changes and removes their own endpoints (anyone else's is a
404), rotates a secret, sends a test, pages and filters deliveries, reads attempts and replays."""

from __future__ import annotations

import pytest

from marketplace.webhooks import catalog
from marketplace.webhooks.delivery import delivery_attempt
from marketplace.webhooks.models import Attempt, Delivery, Endpoint
from marketplace.webhooks.services import event_emit

BASE = "/api/v1/webhooks"


@pytest.fixture
def create(api, submitter, receiver, loopback_allowed):
    def post(user=None, **body):
        return api(user or submitter).post(f"{BASE}/endpoints/", {"url": receiver.url, **body}, format="json")

    return post


def test_registering_shows_the_secret_once(create, api, submitter):
    response = create(description="ci", event_types=["job.completed"])

    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["secret"].startswith("whsec_")
    assert (body["description"], body["event_types"], body["enabled"]) == ("ci", ["job.completed"], True)
    shown = api(submitter).get(f"{BASE}/endpoints/{body['id']}/").json()
    assert "secret" not in shown and shown["id"] == body["id"]


def test_a_retried_registration_with_an_idempotency_key_makes_one_endpoint_and_the_same_secret(
        api, submitter, receiver, loopback_allowed):
    client = api(submitter)
    first, again = (client.post(f"{BASE}/endpoints/", {"url": receiver.url}, format="json",
                                HTTP_IDEMPOTENCY_KEY="register-1") for _ in range(2))

    assert first.status_code == again.status_code == 201
    assert again["Idempotent-Replayed"] == "true"
    assert first.json()["secret"] == again.json()["secret"]
    assert Endpoint.objects.count() == 1


@pytest.mark.parametrize("body, field", [
    ({"url": "http://169.254.169.254/latest/meta-data/"}, "url"),
    ({"event_types": ["job.exploded"]}, "event_types"),
    ({"url": "https://example.com/" + "a" * 2000}, "url"),
    ({"url": "ftp://example.com/"}, "url"),
])
def test_a_bad_registration_is_refused(create, settings, body, field):
    settings.IDLEGRID_WEBHOOKS_ALLOW_PRIVATE = False

    response = create(**body)

    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert not Endpoint.objects.exists()


def test_at_most_the_configured_number_of_endpoints(create, settings):
    settings.IDLEGRID_WEBHOOKS_MAX_ENDPOINTS = 2
    assert [create().status_code for _ in range(3)] == [201, 201, 409]


def test_another_persons_endpoints_and_deliveries_are_404(create, api, other_submitter, submitter):
    endpoint_id = create().json()["id"]
    event_emit(owner_id=submitter.pk, type=catalog.JOB_STARTED, data={})
    delivery_id = Delivery.objects.get().pk
    other = api(other_submitter)

    assert other.get(f"{BASE}/endpoints/{endpoint_id}/").status_code == 404
    assert other.patch(f"{BASE}/endpoints/{endpoint_id}/", {"enabled": False}, format="json").status_code == 404
    assert other.delete(f"{BASE}/endpoints/{endpoint_id}/").status_code == 404
    assert other.post(f"{BASE}/endpoints/{endpoint_id}/rotate-secret/").status_code == 404
    assert other.post(f"{BASE}/endpoints/{endpoint_id}/test/").status_code == 404
    assert other.get(f"{BASE}/deliveries/{delivery_id}/").status_code == 404
    assert other.post(f"{BASE}/deliveries/{delivery_id}/replay/").status_code == 404
    assert other.get(f"{BASE}/endpoints/").json()["results"] == []
    assert other.get(f"{BASE}/deliveries/").json()["results"] == []
    assert Endpoint.objects.get(pk=endpoint_id).enabled


def test_anonymous_callers_and_devices_are_refused(api, make_device, contributor):
    assert api().get(f"{BASE}/endpoints/").status_code == 401
    assert make_device(contributor).client().get(f"{BASE}/endpoints/").status_code in (401, 403)


def test_an_endpoint_is_changed_and_removed(create, api, submitter):
    endpoint_id = create().json()["id"]
    client = api(submitter)

    changed = client.patch(f"{BASE}/endpoints/{endpoint_id}/", {"enabled": False, "event_types": ["job.failed"]},
                           format="json")
    assert changed.status_code == 200
    assert (changed.json()["enabled"], changed.json()["event_types"]) == (False, ["job.failed"])
    assert client.delete(f"{BASE}/endpoints/{endpoint_id}/").status_code == 204
    assert client.get(f"{BASE}/endpoints/{endpoint_id}/").status_code == 404


def test_endpoints_are_listed_newest_first_a_page_at_a_time(create, api, submitter):
    ids = [create().json()["id"] for _ in range(3)]

    page = api(submitter).get(f"{BASE}/endpoints/", {"limit": 2}).json()
    assert [e["id"] for e in page["results"]] == ids[::-1][:2]
    rest = api(submitter).get(page["next"]).json()
    assert [e["id"] for e in rest["results"]] == ids[:1] and rest["next"] is None
    assert all("secret" not in e for e in page["results"])


def test_rotating_gives_a_new_secret_and_keeps_the_old_one_signing_for_a_while(create, api, submitter):
    created = create().json()

    rotated = api(submitter).post(f"{BASE}/endpoints/{created['id']}/rotate-secret/")

    assert rotated.status_code == 200
    assert rotated.json()["secret"] != created["secret"]
    assert rotated.json()["previous_secret_expires_at"] is not None
    assert Endpoint.objects.get(pk=created["id"]).previous_secret == created["secret"]


def test_a_test_event_goes_to_that_endpoint_only(create, api, submitter, receiver):
    first, _ = create(event_types=["job.failed"]).json(), create().json()

    response = api(submitter).post(f"{BASE}/endpoints/{first['id']}/test/")

    assert response.status_code == 202
    delivery = Delivery.objects.get()
    assert (delivery.endpoint_id, delivery.event.type, response.json()["id"]) == (first["id"], "webhook.test", delivery.pk)
    assert delivery_attempt(delivery_id=delivery.pk) == "succeeded"
    assert b'"type":"webhook.test"' in receiver.received[0].body


def test_deliveries_are_filtered_and_show_their_attempts(create, api, submitter, receiver):
    one, two = create().json()["id"], create().json()["id"]
    event_emit(owner_id=submitter.pk, type=catalog.JOB_STARTED, data={"job": {"id": 1}})
    event_emit(owner_id=submitter.pk, type=catalog.JOB_FAILED, data={"job": {"id": 1}})
    receiver.answer(503)
    failed_once = Delivery.objects.get(endpoint_id=one, event__type="job.started")
    delivery_attempt(delivery_id=failed_once.pk)
    client = api(submitter)

    def ids(**query):
        response = client.get(f"{BASE}/deliveries/", query)
        assert response.status_code == 200, response.json()
        return [d["id"] for d in response.json()["results"]]

    assert len(ids()) == 4
    assert ids(endpoint=one, event_type="job.started") == [failed_once.pk]
    assert len(ids(event_type="job.failed")) == 2 and len(ids(endpoint=two)) == 2
    assert ids(created_after="2000-01-01T00:00:00Z", created_before="2000-01-02T00:00:00Z") == []
    assert client.get(f"{BASE}/deliveries/", {"state": "lost"}).status_code == 400
    detail = client.get(f"{BASE}/deliveries/{failed_once.pk}/").json()
    assert detail["event"]["type"] == "job.started" and detail["event"]["id"].startswith("msg_")
    assert [(a["number"], a["status_code"], a["outcome"]) for a in detail["attempts"]] == [(1, 503, "http_error")]
    assert detail["state"] == "pending" and detail["next_attempt_at"] is not None


def test_a_replay_through_the_api_makes_a_new_attempt(create, api, submitter, receiver, enqueued,
                                                       django_capture_on_commit_callbacks):
    create()
    event_emit(owner_id=submitter.pk, type=catalog.JOB_COMPLETED, data={})
    delivery = Delivery.objects.get()
    delivery_attempt(delivery_id=delivery.pk)

    with django_capture_on_commit_callbacks(execute=True):
        response = api(submitter).post(f"{BASE}/deliveries/{delivery.pk}/replay/")

    assert response.status_code == 202 and response.json()["state"] == "pending"
    assert enqueued[-1] == ("webhooks.deliver", (delivery.pk,))
    assert delivery_attempt(delivery_id=delivery.pk) == "succeeded"
    assert list(Attempt.objects.filter(delivery=delivery).values_list("number", "replay")) == [(1, False), (2, True)]
    assert len(receiver.received) == 2


def test_tests_and_replays_are_rate_limited(create, api, submitter, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "webhook_send": "2/minute"}}
    endpoint_id = create().json()["id"]
    client = api(submitter)

    answers = [client.post(f"{BASE}/endpoints/{endpoint_id}/test/").status_code for _ in range(3)]

    assert answers == [202, 202, 429]
