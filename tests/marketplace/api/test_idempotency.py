"""Idempotency-Key on POST /api/v1/jobs/: a retried submission makes one job and one escrow."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.api.idempotency import idempotency_keys_purge
from marketplace.api.models import IdempotencyKey
from marketplace.jobs.models import Job
from marketplace.ledger.models import Posting

URL = "/api/v1/jobs/"


@pytest.fixture
def post(api, submitter, inference_spec):
    client = api(submitter)

    def post(key: str | None, **spec_changes):
        headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
        spec = inference_spec(rows=10, **{"rows_per_unit": 4, **spec_changes})
        return client.post(URL, {"kind": "inference", "spec": spec}, format="json", **headers)

    return post


def test_a_retry_with_the_same_key_gets_the_first_answer_byte_for_byte_and_makes_no_second_job(post):
    first = post("order-17")
    again = post("order-17")

    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first
    assert Job.objects.count() == 1
    assert Posting.objects.filter(kind=Posting.Kind.ESCROW).count() == 1


def test_without_a_key_every_post_is_a_new_job(post):
    assert post(None).status_code == post(None).status_code == 201
    assert Job.objects.count() == 2


def test_the_same_key_with_other_parameters_is_refused_and_changes_nothing(post):
    assert post("order-18").status_code == 201
    other = post("order-18", rows_per_unit=5)

    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert Job.objects.count() == 1


def test_a_running_first_request_with_the_same_parameters_answers_409_in_flight(post, submitter, monkeypatch):
    from marketplace.api import idempotency

    monkeypatch.setattr(idempotency, "_fingerprint", lambda request, sealed: "f" * 64)
    IdempotencyKey.objects.create(user=submitter, key=idempotency.Sealed("order-20", submitter).digest,
                                  operation=f"POST {URL}", fingerprint="f" * 64)

    busy = post("order-20")

    assert busy.status_code == 409
    assert busy.json()["error"]["code"] == "idempotency_key_in_flight"
    assert Job.objects.count() == 0


def test_a_refused_request_is_not_remembered_so_the_fixed_one_may_use_the_key(post):
    refused = post("order-21", rows_per_unit=0)
    assert refused.status_code == 400
    assert not IdempotencyKey.objects.exists()

    assert post("order-21").status_code == 201
    assert Job.objects.count() == 1


def test_keys_belong_to_one_person(api, submitter, other_submitter, inference_spec):
    def body(owner):
        return {"kind": "inference", "spec": inference_spec(owner=owner, rows=10, rows_per_unit=4)}

    mine = api(submitter).post(URL, body(submitter), format="json", HTTP_IDEMPOTENCY_KEY="shared-key")
    theirs = api(other_submitter).post(URL, body(other_submitter), format="json", HTTP_IDEMPOTENCY_KEY="shared-key")

    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve", "tab\there"])
def test_a_malformed_key_is_refused(post, key):
    response = post(key)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]["fields"]
    assert Job.objects.count() == 0


def test_old_keys_are_forgotten_by_the_purge(post):
    post("order-22")
    assert idempotency_keys_purge() == 0
    assert idempotency_keys_purge(now=timezone.now() + timedelta(hours=25)) == 1


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_identical_posts_make_exactly_one_job_and_one_escrow(api, submitter, inference_spec):
    body = {"kind": "inference", "spec": inference_spec(rows=10, rows_per_unit=4)}
    answers, start = [], threading.Barrier(20)

    def submit():
        client = api(submitter)
        start.wait()
        try:
            answers.append(client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="order-23"))
        finally:
            connection.close()

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(answers) == 20
    assert {a.status_code for a in answers} <= {201, 409}
    created = {a.json()["id"] for a in answers if a.status_code == 201}
    assert len(created) == 1
    assert Job.objects.count() == 1
    assert Posting.objects.filter(kind=Posting.Kind.ESCROW).count() == 1
