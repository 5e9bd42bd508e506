"""Delivery: a receiver that fails four times gets the event on the fifth attempt, every attempt logged;
the retry schedule (with its jitter) spans more than a day; a slow receiver times out and is retried; a
redirect is not followed; the sweep sends what is due, once; a replay makes one more attempt."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from marketplace.webhooks import catalog
from marketplace.webhooks.delivery import (
    BODY_EXCERPT_BYTES,
    MAX_ATTEMPTS,
    RETRY_DELAYS,
    deliveries_sweep,
    delivery_attempt,
    retry_delay,
)
from marketplace.webhooks.models import Attempt, Delivery
from marketplace.webhooks.services import delivery_replay, event_emit


@pytest.fixture
def emitted(register, submitter):
    """emitted() -> the delivery of one job.completed event to one registered endpoint."""

    def emit(**endpoint_options):
        endpoint = register(**endpoint_options)
        event_emit(owner_id=submitter.pk, type=catalog.JOB_COMPLETED, data={"job": {"id": 1}})
        return Delivery.objects.get(endpoint=endpoint)

    return emit


def at_due(delivery):
    delivery.refresh_from_db()
    return delivery.next_attempt_at


def test_a_receiver_that_fails_four_times_gets_the_event_on_the_fifth_try(emitted, receiver):
    receiver.answer(500, 502, 503, 429)
    delivery = emitted()

    outcomes = []
    while (due := at_due(delivery)) is not None:
        outcomes.append(delivery_attempt(delivery_id=delivery.pk, now=due))

    assert outcomes == ["retry", "retry", "retry", "retry", "succeeded"]
    delivery.refresh_from_db()
    assert (delivery.state, delivery.attempts_made, delivery.last_status_code) == ("succeeded", 5, 200)
    attempts = list(delivery.attempts.order_by("number"))
    assert [(a.number, a.status_code, a.outcome) for a in attempts] == [
        (1, 500, "http_error"), (2, 502, "http_error"), (3, 503, "http_error"), (4, 429, "http_error"),
        (5, 200, "succeeded")]
    assert attempts[0].response_body == "answer 500" and attempts[0].address == "127.0.0.1"
    assert len(receiver.received) == 5
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1  # one message, five attempts
    assert Webhook(delivery.endpoint.secret).verify(receiver.received[-1].body, receiver.received[-1].headers)


def test_each_retry_waits_its_scheduled_delay(emitted, receiver):
    receiver.answer(500, 500)
    delivery = emitted()
    first = at_due(delivery)

    delivery_attempt(delivery_id=delivery.pk, now=first, rand=lambda: 0.5)  # no jitter: the base delay
    assert at_due(delivery) == first + timedelta(seconds=RETRY_DELAYS[0])
    assert delivery_attempt(delivery_id=delivery.pk, now=first + timedelta(seconds=1)) == "not_due"
    delivery_attempt(delivery_id=delivery.pk, now=at_due(delivery), rand=lambda: 0.5)
    assert at_due(delivery) - first == timedelta(seconds=RETRY_DELAYS[0] + RETRY_DELAYS[1])


def test_the_schedule_spans_more_than_a_day_whatever_the_jitter():
    for rand in (lambda: 0.0, lambda: 0.999999):
        delays = [retry_delay(n, rand=rand) for n in range(1, MAX_ATTEMPTS)]
        assert all(d is not None for d in delays)
        assert sum(d.total_seconds() for d in delays) >= 24 * 3600
    assert retry_delay(MAX_ATTEMPTS) is None
    for n, base in enumerate(RETRY_DELAYS, start=1):
        assert 0.9 * base <= retry_delay(n, rand=lambda: 0.0).total_seconds() <= retry_delay(n, rand=lambda: 1.0).total_seconds() <= 1.1 * base
    assert list(RETRY_DELAYS) == sorted(RETRY_DELAYS)  # backing off, never sooner


def test_after_the_last_attempt_the_delivery_fails(emitted, receiver):
    receiver.answer(*[500] * MAX_ATTEMPTS)
    delivery = emitted()

    while (due := at_due(delivery)) is not None:
        last = delivery_attempt(delivery_id=delivery.pk, now=due)

    delivery.refresh_from_db()
    assert last == "failed"
    assert (delivery.state, delivery.attempts_made, delivery.attempts.count()) == ("failed", MAX_ATTEMPTS, MAX_ATTEMPTS)
    assert delivery.finished_at is not None


def test_a_slow_receiver_times_out_is_retried_later_and_emit_never_waits(emitted, receiver, settings, submitter):
    settings.IDLEGRID_WEBHOOKS_TIMEOUT_SECONDS = 1
    receiver.answer((200, 3.0))
    started = time.monotonic()
    delivery = emitted()
    assert time.monotonic() - started < 1  # emit writes rows; it never talks to the receiver

    started = time.monotonic()
    assert delivery_attempt(delivery_id=delivery.pk) == "retry"

    assert time.monotonic() - started < 2.5  # the deadline holds the whole exchange, not each read
    attempt = delivery.attempts.get()
    assert (attempt.outcome, attempt.status_code) == ("timeout", None)
    assert at_due(delivery) > timezone.now()
    assert delivery_attempt(delivery_id=delivery.pk, now=at_due(delivery)) == "succeeded"


def test_a_redirect_is_not_followed(emitted, receiver):
    receiver.answer((302, 0.0, b"", {"location": "http://169.254.169.254/latest/meta-data/"}))
    delivery = emitted()

    assert delivery_attempt(delivery_id=delivery.pk) == "retry"

    assert len(receiver.received) == 1
    assert delivery.attempts.get().status_code == 302


def test_only_a_kilobyte_of_the_answer_is_kept(emitted, receiver):
    receiver.answer((500, 0.0, b"x" * 100_000))
    delivery = emitted()

    delivery_attempt(delivery_id=delivery.pk)

    assert delivery.attempts.get().response_body == "x" * BODY_EXCERPT_BYTES


def test_a_receiver_that_is_not_listening_is_a_connection_error(register, submitter):
    endpoint = register(url="http://127.0.0.1:9/closed")  # the discard port: nothing listens there
    event_emit(owner_id=submitter.pk, type=catalog.JOB_FAILED, data={})
    delivery = Delivery.objects.get(endpoint=endpoint)

    assert delivery_attempt(delivery_id=delivery.pk) == "retry"
    assert delivery.attempts.get().outcome == "connection_error"


def test_an_attempt_claims_its_delivery_so_two_workers_never_send_it_at_once(emitted, receiver):
    delivery = emitted()
    Delivery.objects.filter(pk=delivery.pk).update(locked_until=timezone.now() + timedelta(seconds=60))

    assert delivery_attempt(delivery_id=delivery.pk) == "not_due"
    assert receiver.received == []
    # A lock that passed (its worker died) frees the delivery.
    assert delivery_attempt(delivery_id=delivery.pk, now=timezone.now() + timedelta(seconds=61)) == "succeeded"


def test_a_finished_delivery_is_not_sent_again_by_a_second_message(emitted, receiver):
    delivery = emitted()
    assert delivery_attempt(delivery_id=delivery.pk) == "succeeded"

    assert delivery_attempt(delivery_id=delivery.pk) == "not_due"
    assert len(receiver.received) == 1


def test_the_sweep_hands_out_what_is_due_once_and_again_if_its_message_was_lost(emitted, receiver, enqueued):
    delivery = emitted()
    receiver.answer(500)
    delivery_attempt(delivery_id=delivery.pk)  # failed once: due again in ~5 s
    due = at_due(delivery)
    enqueued.clear()

    assert deliveries_sweep(now=due - timedelta(seconds=1)) == 0
    assert deliveries_sweep(now=due) == 1
    assert enqueued == [("webhooks.deliver", (delivery.pk,))]
    assert deliveries_sweep(now=due + timedelta(seconds=10)) == 0  # queued already: not flooded
    assert deliveries_sweep(now=due + timedelta(minutes=6)) == 1  # the broker lost it: sent again


def test_a_new_event_is_swept_if_the_broker_lost_its_first_message(emitted, enqueued):
    delivery = emitted()

    assert deliveries_sweep() == 0
    assert deliveries_sweep(now=timezone.now() + timedelta(minutes=6)) == 1
    assert enqueued[-1] == ("webhooks.deliver", (delivery.pk,))


def test_a_replay_of_a_succeeded_delivery_makes_one_more_attempt(emitted, receiver, django_capture_on_commit_callbacks,
                                                                  enqueued):
    delivery = emitted()
    delivery_attempt(delivery_id=delivery.pk)
    receiver.answer(500)

    with django_capture_on_commit_callbacks(execute=True):
        replayed = delivery_replay(delivery=delivery)
    assert replayed.state == "pending"
    assert ("webhooks.deliver", (delivery.pk,)) in enqueued
    assert delivery_attempt(delivery_id=delivery.pk) == "failed"  # a replay ends the delivery whatever it gets

    attempts = list(Attempt.objects.filter(delivery=delivery).order_by("number"))
    assert [(a.number, a.replay, a.status_code) for a in attempts] == [(1, False, 200), (2, True, 500)]
    assert receiver.received[0].headers["webhook-id"] == receiver.received[1].headers["webhook-id"]


def test_a_disabled_endpoint_is_sent_nothing(emitted, receiver):
    delivery = emitted()
    delivery.endpoint.enabled = False
    delivery.endpoint.save()

    assert delivery_attempt(delivery_id=delivery.pk) == "retry"
    assert receiver.received == []
    assert delivery.attempts.get().outcome == "refused"


@pytest.mark.django_db(transaction=True)
def test_eight_workers_given_one_delivery_at_once_send_it_once(emitted, receiver):
    """A redelivered message and a sweep's copy race: the claim lets one through; the others find it taken."""
    import threading

    from django.db import connection

    receiver.answer((200, 0.3))  # slow enough that every worker tries while the first is sending
    delivery = emitted()
    outcomes, start = [], threading.Barrier(8)

    def work():
        start.wait()
        try:
            outcomes.append(delivery_attempt(delivery_id=delivery.pk))
        finally:
            connection.close()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["not_due"] * 7 + ["succeeded"]
    assert len(receiver.received) == 1
    assert delivery.attempts.count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_sweeps_at_once_hand_out_each_due_delivery_once(register, submitter, enqueued):
    import threading

    from django.db import connection

    register()
    register()
    event_emit(owner_id=submitter.pk, type=catalog.JOB_FAILED, data={})
    assert len(enqueued) == 2  # the first attempts, sent at commit; say the broker lost them
    enqueued.clear()
    later, start = timezone.now() + timedelta(minutes=6), threading.Barrier(2)
    counts = []

    def sweep():
        start.wait()
        try:
            counts.append(deliveries_sweep(now=later))
        finally:
            connection.close()

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(counts) in ([0, 2], [1, 1])
    assert sorted(args for name, args in enqueued if name == "webhooks.deliver") == sorted(
        (pk,) for pk in Delivery.objects.values_list("pk", flat=True))


def test_old_finished_events_are_purged_with_their_deliveries_but_not_one_still_being_delivered(
        emitted, receiver, settings):
    from marketplace.webhooks.models import Event
    from marketplace.webhooks.services import events_purge

    done = emitted()
    delivery_attempt(delivery_id=done.pk)
    event_emit(owner_id=done.endpoint.owner_id, type=catalog.JOB_FAILED, data={})  # pending
    later = timezone.now() + timedelta(days=settings.IDLEGRID_WEBHOOKS_RETENTION_DAYS, seconds=1)

    assert events_purge() == 0
    assert events_purge(now=later) == 1

    assert list(Event.objects.values_list("type", flat=True)) == ["job.failed"]
    assert not Attempt.objects.exists() and Delivery.objects.count() == 1
