"""Each event is emitted from the state move it tells of, with the ids and states integrators need; none is
written for a person without endpoints (one query); job.progress is throttled."""

from __future__ import annotations

import pytest
from django.core.cache import cache

from marketplace.jobs.lifecycle import job_complete, job_fail
from marketplace.jobs.models import FedRound, Job
from marketplace.jobs.services import job_merge, job_split, job_submit
from marketplace.webhooks import catalog
from marketplace.webhooks.models import Delivery, Event
from marketplace.webhooks.services import event_emit
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.results import result_report
from marketplace.workunits.reverify import device_ban
from marketplace.workunits.verification import unit_validate
from tests.marketplace.jobs.fedavg_helpers import honest_update, spec_for


def events(type=None):
    rows = Event.objects.order_by("pk")
    return list(rows.filter(type=type) if type else rows)


@pytest.fixture
def decide(make_device, report, contributor, other_contributor):
    """decide(job): devices of two owners compute every unit of the job honestly; each unit is validated."""

    def run(job):
        devices = [make_device(contributor), make_device(other_contributor)]
        for enrolled in devices:
            for lease in workunit_lease(device=enrolled.device, max_units=64):
                report(enrolled, lease.result_id)
        decided = []
        for unit in WorkUnit.objects.filter(job=job, need_validate=True).order_by("pk"):
            decided.append(unit_validate(unit_id=unit.pk))
        return decided

    return run


def test_no_endpoint_means_one_query_and_no_row(submitter, django_assert_num_queries):
    with django_assert_num_queries(1):
        assert event_emit(owner_id=submitter.pk, type=catalog.JOB_STARTED, data=lambda: pytest.fail("built")) is None
    assert not Event.objects.exists() and not Delivery.objects.exists()


def test_an_endpoint_gets_only_the_types_it_listens_to(register, submitter, other_submitter):
    only_failed = register(event_types=[catalog.JOB_FAILED])
    every = register()
    register(enabled=False)
    register(owner=other_submitter)

    event_emit(owner_id=submitter.pk, type=catalog.JOB_STARTED, data={})
    event_emit(owner_id=submitter.pk, type=catalog.JOB_FAILED, data={})

    assert [(d.event.type, d.endpoint_id) for d in Delivery.objects.order_by("pk")] == [
        ("job.started", every.pk), ("job.failed", only_failed.pk), ("job.failed", every.pk)]


def test_the_event_is_sent_only_once_the_callers_transaction_commits(register, submitter, enqueued,
                                                                    django_capture_on_commit_callbacks):
    register()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        event_emit(owner_id=submitter.pk, type=catalog.JOB_STARTED, data={})
        assert enqueued == []

    for callback in callbacks:
        callback()
    assert enqueued == [("webhooks.deliver", (Delivery.objects.get().pk,))]


def test_job_started_when_the_job_is_split(register, submit_job, submitter):
    register()
    job = submit_job(rows=8, rows_per_unit=4)

    (event,) = events(catalog.JOB_STARTED)
    assert event.owner_id == submitter.pk
    assert event.data["job"] | {"created_at": None, "started_at": None} == {
        "id": job.pk, "kind": "inference", "state": "running", "units_total": 2, "units_done": 0, "units_error": 0,
        "fraction_done": 0.0, "output_sha256": None, "error": "", "created_at": None, "started_at": None,
        "finished_at": None}


def test_job_progress_is_throttled_and_job_completed_carries_the_output(register, submit_job, decide):
    register()
    job = submit_job(rows=12, rows_per_unit=4)  # three units

    assert decide(job) == ["done", "done", "done"]

    progress = events(catalog.JOB_PROGRESS)
    assert len(progress) == 1  # the later units fell inside the throttle's 30 s
    assert (progress[0].data["job"]["units_done"], progress[0].data["job"]["units_total"]) == (1, 3)
    job = job_merge(job_id=job.pk)
    (completed,) = events(catalog.JOB_COMPLETED)
    assert completed.data["job"]["state"] == "completed"
    assert completed.data["job"]["output_sha256"] == job.output_id
    assert completed.data["job"]["fraction_done"] == 1.0


def test_job_progress_goes_out_again_once_the_throttle_passed_and_only_if_more_is_done(
        register, submit_job, submitter):
    from marketplace.jobs.events import job_progress

    register()
    job = submit_job(rows=8, rows_per_unit=4)
    job_progress(job_id=job.pk, owner_id=submitter.pk)
    cache.delete(f"webhooks:progress:{job.pk}")  # 30 s later
    job_progress(job_id=job.pk, owner_id=submitter.pk)  # nothing more decided: nothing said
    assert len(events(catalog.JOB_PROGRESS)) == 1

    WorkUnit.objects.filter(pk=WorkUnit.objects.filter(job=job).first().pk).update(state=WorkUnit.State.DONE)
    cache.delete(f"webhooks:progress:{job.pk}")
    job_progress(job_id=job.pk, owner_id=submitter.pk)
    assert [e.data["job"]["units_done"] for e in events(catalog.JOB_PROGRESS)] == [0, 1]


def test_the_throttled_progress_hook_costs_no_query(submit_job, submitter, django_assert_num_queries):
    from marketplace.jobs.events import job_progress

    job = submit_job(rows=4, rows_per_unit=4)
    job_progress(job_id=job.pk, owner_id=submitter.pk)  # passes the throttle: one query (nobody listens)

    with django_assert_num_queries(0):
        job_progress(job_id=job.pk, owner_id=submitter.pk)


def test_job_failed_with_the_reason(register, submit_job):
    register()
    job = submit_job(rows=4, rows_per_unit=4)

    assert job_fail(job_id=job.pk, reason="a unit errored")
    assert not job_fail(job_id=job.pk, reason="again")  # one move, one event

    (failed,) = events(catalog.JOB_FAILED)
    assert (failed.data["job"]["id"], failed.data["job"]["state"], failed.data["job"]["error"]) == (
        job.pk, "failed", "a unit errored")


def test_job_cancelled_once_the_cancellation_finishes_with_the_partial_output(register, submit_job, submitter, decide):
    from marketplace.jobs.cancel import job_cancel, job_cancel_finish

    register(event_types=[catalog.JOB_CANCELLED])
    job = submit_job(rows=8, rows_per_unit=4)
    job_split(job_id=job.pk)
    decide(job)  # both units decided, then the job cancelled before its merge
    Job.objects.filter(pk=job.pk).update(state=Job.State.RUNNING)

    job_cancel(job_id=job.pk, owner=submitter)
    assert events(catalog.JOB_CANCELLED) == []  # cancelling is not cancelled yet
    job_cancel_finish(job_id=job.pk)
    job_cancel_finish(job_id=job.pk)  # a second run finds it finished: no second event

    (cancelled,) = events(catalog.JOB_CANCELLED)
    data = cancelled.data["job"]
    assert (data["id"], data["state"], data["units_done"]) == (job.pk, "cancelled", 2)
    assert data["output_sha256"] == Job.objects.get(pk=job.pk).output_id is not None


def test_job_completed_once_however_many_merges_race(register, submit_job):
    register()
    job = submit_job(rows=4, rows_per_unit=4)
    Job.objects.filter(pk=job.pk).update(state=Job.State.MERGING)
    output = job.spec["dataset"]

    assert job_complete(job_id=job.pk, output_id=output)
    assert not job_complete(job_id=job.pk, output_id=output)
    assert len(events(catalog.JOB_COMPLETED)) == 1


def test_job_round_completed_for_each_aggregated_round(register, submitter, upload, make_device, contributor,
                                                        other_contributor, tmp_path):
    register(event_types=[catalog.JOB_ROUND_COMPLETED, catalog.JOB_COMPLETED])
    job = job_submit(owner=submitter, kind="fedavg", spec=spec_for(upload, submitter, rounds=2))
    job_split(job_id=job.pk)
    devices = [make_device(contributor), make_device(other_contributor)]
    for _ in range(2):
        for enrolled in devices:
            for lease in workunit_lease(device=enrolled.device, max_units=64):
                result = Result.objects.get(pk=lease.result_id)
                sha = upload(honest_update(WorkUnit.objects.get(pk=lease.unit_id), tmp_path), device=enrolled.device)
                result_report(device=enrolled.device, result_id=result.pk, output_sha256=sha,
                              signature_b64=enrolled.sign(result, sha))
        for unit_id in WorkUnit.objects.filter(need_validate=True).values_list("pk", flat=True):
            unit_validate(unit_id=unit_id)
        job_merge(job_id=job.pk)

    rounds = events(catalog.JOB_ROUND_COMPLETED)
    assert [(e.data["round"]["index"], e.data["round"]["last"]) for e in rounds] == [(0, False), (1, True)]
    last = FedRound.objects.get(job=job, index=1)
    assert rounds[1].data["round"]["weights_sha256"] == last.weights_out_id
    assert rounds[1].data["round"]["eval_accuracy"] == last.eval_accuracy
    assert [e.type for e in events()] == ["job.round_completed", "job.round_completed", "job.completed"]


def test_device_banned_tells_the_devices_owner(register, make_device, contributor, submitter):
    endpoint = register(owner=contributor)
    device = make_device(contributor, name="cheap-box")

    assert device_ban(device_id=device.pk, reason="failed the audit of unit 1")

    (event,) = events(catalog.DEVICE_BANNED)
    assert event.owner_id == contributor.pk and Delivery.objects.get(event=event).endpoint_id == endpoint.pk
    assert event.data["device"] | {"banned_at": None} == {
        "id": device.pk, "name": "cheap-box", "state": "banned", "banned_at": None,
        "reason": "failed the audit of unit 1", "earnings_held": True}


def test_the_catalog_names_every_event_type():
    assert set(catalog.EVENT_TYPES) == {
        "job.started", "job.progress", "job.round_completed", "job.completed", "job.failed", "job.cancelled",
        "payout.epoch_published", "device.banned"}


def test_emit_refuses_a_type_that_is_not_in_the_catalog(submitter):
    with pytest.raises(AssertionError):
        event_emit(owner_id=submitter.pk, type="job.exploded", data={})
