"""replica_issue: one more replica under the cap; at the cap, the unit is decided rather than left hanging.
A replica lost without an answer (expired, given up) is replaced whatever the cap (replica_replace)."""

from datetime import timedelta

from django.utils import timezone

from marketplace.jobs.lifecycle import job_fail
from marketplace.jobs.models import Job
from marketplace.workunits.leasing import leases_expire, workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_issue
from marketplace.workunits.results import result_fail
from marketplace.workunits.verification import unit_validate


def overdue(result_id):
    Result.objects.filter(pk=result_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def test_it_issues_an_unsent_replica_under_the_cap(submit_job):
    unit = WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4))

    assert replica_issue(unit_id=unit.pk, reason="testing") is True

    unit.refresh_from_db()
    assert unit.results_created == 3
    assert unit.results.filter(state=Result.State.UNSENT).count() == 3


def test_at_the_cap_with_nothing_in_flight_it_errors_the_unit_and_fails_the_job(submit_job):
    job = submit_job(rows=4, rows_per_unit=4, max_results_per_unit=2)
    unit = WorkUnit.objects.get(job=job)
    unit.results.update(state=Result.State.INVALID)

    assert replica_issue(unit_id=unit.pk, reason="results disagree") is False

    unit.refresh_from_db()
    assert unit.state == WorkUnit.State.ERROR
    assert "results disagree" in unit.error
    assert Job.objects.get(pk=job.pk).state == Job.State.FAILED


def test_an_expiry_at_the_cap_beside_a_reported_result_is_replaced_all_the_same(
    submit_job, make_device, report, contributor, other_contributor, cheater
):
    # An expiry is no answer: the unit's cap counts answers, so the unit still gets its second result.
    job = submit_job(rows=4, rows_per_unit=4, max_results_per_unit=2)
    unit = WorkUnit.objects.get(job=job)
    reporter = make_device(contributor)
    report(reporter, workunit_lease(device=reporter.device, max_units=1)[0].result_id)
    unit_validate(unit_id=unit.pk)
    (late,) = workunit_lease(device=make_device(other_contributor).device, max_units=1)
    overdue(late.result_id)

    leases_expire()

    (replacement,) = workunit_lease(device=make_device(cheater).device, max_units=1)
    assert replacement.unit_id == unit.pk
    assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING


def test_giving_up_at_the_cap_beside_a_reported_result_is_replaced_all_the_same(
    submit_job, make_device, report, contributor, other_contributor, cheater
):
    job = submit_job(rows=4, rows_per_unit=4, max_results_per_unit=2)
    unit = WorkUnit.objects.get(job=job)
    reporter, quitter = make_device(contributor), make_device(other_contributor)
    report(reporter, workunit_lease(device=reporter.device, max_units=1)[0].result_id)
    unit_validate(unit_id=unit.pk)
    (lease,) = workunit_lease(device=quitter.device, max_units=1)

    result_fail(device=quitter.device, result_id=lease.result_id, error="out of memory")

    (replacement,) = workunit_lease(device=make_device(cheater).device, max_units=1)
    assert replacement.unit_id == unit.pk
    assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING


def test_a_unit_errored_by_validation_needs_no_more_validation(submit_job, make_device, report, honest_output,
                                                               contributor, cheater):
    job = submit_job(rows=4, rows_per_unit=4, max_results_per_unit=2)
    unit = WorkUnit.objects.get(job=job)
    honest, faulty = make_device(contributor), make_device(cheater)
    report(honest, workunit_lease(device=honest.device, max_units=1)[0].result_id)
    report(faulty, workunit_lease(device=faulty.device, max_units=1)[0].result_id, honest_output(unit) + 1)

    assert unit_validate(unit_id=unit.pk) == "error"

    unit.refresh_from_db()
    assert unit.need_validate is False


def test_no_replica_is_issued_for_a_unit_of_a_failed_job(submit_job, make_device, contributor, other_contributor):
    job = submit_job(rows=4, rows_per_unit=4)
    (lease,) = workunit_lease(device=make_device(contributor).device, max_units=1)
    job_fail(job_id=job.pk, reason="another unit failed")
    overdue(lease.result_id)

    leases_expire()

    assert Result.objects.filter(job=job, state=Result.State.UNSENT).count() == 0
    assert WorkUnit.objects.get(job=job).results_created == 2
    assert workunit_lease(device=make_device(other_contributor).device, max_units=64) == []
