"""A task that does everything waiting is sent once per burst: while a message of it is queued and has not
started, more callers send nothing; once it starts, the next caller sends again; a failed send reopens."""

import pytest
from celery.app.task import Task

from marketplace.core.tasks import coalesced_started, enqueue_coalesced_on_commit
from marketplace.workunits.models import WorkUnit
from marketplace.workunits.tasks import units_validate_waiting_task

NAME = "workunits.validate_waiting"


@pytest.fixture
def sent(monkeypatch):
    calls = []
    monkeypatch.setattr(Task, "apply_async", lambda task, args=None, kwargs=None, **options: calls.append(
        (task.name, options.get("countdown"))))
    return calls


def send(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):  # one transaction that commits
        enqueue_coalesced_on_commit(NAME)


def test_callers_while_a_message_is_queued_send_nothing_and_a_started_run_reopens(
    db, sent, django_capture_on_commit_callbacks
):
    for _ in range(5):
        send(django_capture_on_commit_callbacks)
    assert sent == [(NAME, None)]

    coalesced_started(NAME)
    send(django_capture_on_commit_callbacks)
    assert sent == [(NAME, None), (NAME, None)]


def test_nothing_is_sent_before_the_transaction_commits_or_when_it_rolls_back(db, sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        enqueue_coalesced_on_commit(NAME)
    assert sent == [] and len(callbacks) == 1


def test_a_send_the_broker_refuses_reopens_the_gate(db, monkeypatch, caplog, django_capture_on_commit_callbacks):
    attempts = []

    def refused(task, *args, **options):
        attempts.append(task.name)
        raise ConnectionRefusedError("the broker is down")

    monkeypatch.setattr(Task, "apply_async", refused)
    send(django_capture_on_commit_callbacks)
    send(django_capture_on_commit_callbacks)  # not held back by the message that never left
    assert attempts == [NAME, NAME]
    assert "the sweep will do it" in caplog.text


def test_the_validation_run_reopens_before_it_reads_and_comes_back_for_what_it_left(
    submit_job, sent, monkeypatch, django_capture_on_commit_callbacks
):
    units = list(WorkUnit.objects.filter(job=submit_job(rows=12, rows_per_unit=4)).order_by("pk"))
    WorkUnit.objects.filter(pk__in=[u.pk for u in units]).update(need_validate=True)
    send(django_capture_on_commit_callbacks)  # the burst's message
    assert sent == [(NAME, None)]

    # Two units judged by this run; the third stays flagged (as if a report held its row locked).
    from marketplace.workunits import verification_batch

    judged = {}

    def validate_some(*, limit):
        judged.update({u.pk: "pending" for u in units[:2]})
        WorkUnit.objects.filter(pk__in=list(judged)).update(need_validate=False)
        return judged

    monkeypatch.setattr(verification_batch, "units_validate_waiting", validate_some)

    with django_capture_on_commit_callbacks(execute=True):
        assert units_validate_waiting_task() == 2
    assert sent == [(NAME, None), (NAME, 1)]  # one more message, a second later, for the unit it could not claim


def test_a_run_that_left_nothing_waiting_sends_nothing_more(submit_job, sent, django_capture_on_commit_callbacks):
    units = WorkUnit.objects.filter(job=submit_job(rows=8, rows_per_unit=4))
    units.update(need_validate=True)

    with django_capture_on_commit_callbacks(execute=True):
        assert units_validate_waiting_task() == 2
    assert sent == []
    assert not units.filter(need_validate=True).exists()
