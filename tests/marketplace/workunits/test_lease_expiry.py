"""leases_expire: overdue leases expire and their units get a replacement replica, exactly once. A
replacement does not count against the unit's cap of results (an expiry is no answer); the owner who let
it expire never gets the unit again, and the job fails only once devices of several owners did."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.core.exceptions import LeaseExpired
from marketplace.jobs.models import Job
from marketplace.workers.models import Device
from marketplace.workunits.leasing import leases_expire, workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.results import result_report


def overdue(*result_ids):
    Result.objects.filter(pk__in=result_ids).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def test_it_expires_an_overdue_lease_and_issues_a_replacement(submit_job, make_device, contributor, other_contributor):
    job = submit_job(rows=4, rows_per_unit=4)
    (late,) = workunit_lease(device=make_device(contributor).device, max_units=1)
    (on_time,) = workunit_lease(device=make_device(other_contributor).device, max_units=1)
    overdue(late.result_id)

    assert leases_expire() == 1

    unit = WorkUnit.objects.get(job=job)
    assert unit.results_created == 2  # the replacement is not counted against the cap
    assert Result.objects.get(pk=late.result_id).state == Result.State.EXPIRED
    assert Result.objects.get(pk=on_time.result_id).state == Result.State.IN_PROGRESS
    assert unit.results.filter(state=Result.State.UNSENT).count() == 1


def test_expiring_twice_issues_one_replacement(submit_job, make_device, contributor):
    job = submit_job(rows=10, rows_per_unit=4)
    leases = workunit_lease(device=make_device(contributor).device, max_units=3)
    overdue(*[lease.result_id for lease in leases])

    assert leases_expire() == 3
    assert leases_expire() == 0

    assert Result.objects.filter(job=job).count() == 9
    assert Result.objects.filter(job=job, state=Result.State.UNSENT).count() == 6
    assert list(WorkUnit.objects.filter(job=job).values_list("results_created", flat=True)) == [2, 2, 2]


def test_it_leaves_live_leases_alone(submit_job, make_device, contributor):
    job = submit_job(rows=4, rows_per_unit=4)
    workunit_lease(device=make_device(contributor).device, max_units=1)

    assert leases_expire() == 0

    assert Result.objects.filter(job=job).count() == 2


def test_the_replacement_never_goes_back_to_the_owner_that_let_it_expire(submit_job, make_device, contributor,
                                                                          other_contributor, cheater):
    submit_job(rows=4, rows_per_unit=4)
    laptop = make_device(contributor)
    (late,) = workunit_lease(device=laptop.device, max_units=1)
    workunit_lease(device=make_device(other_contributor).device, max_units=1)
    overdue(late.result_id)
    leases_expire()

    assert workunit_lease(device=laptop.device, max_units=1) == []
    assert workunit_lease(device=make_device(contributor, name="desktop").device, max_units=1) == []
    (replacement,) = workunit_lease(device=make_device(cheater).device, max_units=1)
    assert replacement.unit_id == late.unit_id and replacement.result_id != late.result_id
    assert laptop.refresh().expired == 1


def test_a_late_report_for_an_expired_lease_is_refused(submit_job, make_device, contributor, upload, make_output,
                                                       honest_output):
    submit_job(rows=4, rows_per_unit=4)
    device = make_device(contributor)
    (late,) = workunit_lease(device=device.device, max_units=1)
    result = Result.objects.select_related("unit").get(pk=late.result_id)
    sha = upload(make_output(honest_output(result.unit)), device=device.device)
    overdue(late.result_id)
    leases_expire()

    response = device.client().post(
        f"/api/v1/agent/results/{late.result_id}/report",
        {"output_sha256": sha, "signature": device.sign(result, sha)}, format="json",
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "lease_expired"
    result.refresh_from_db()
    assert (result.state, result.output_id) == (Result.State.EXPIRED, None)
    assert WorkUnit.objects.get(pk=result.unit_id).need_validate is False


def test_a_report_racing_the_sweep_loses_as_a_whole(submit_job, make_device, contributor, upload, make_output,
                                                    honest_output, monkeypatch):
    # The lease is live when the report is checked, but the sweep expires it before the report's UPDATE.
    from marketplace.workunits import results

    submit_job(rows=4, rows_per_unit=4)
    device = make_device(contributor)
    (lease,) = workunit_lease(device=device.device, max_units=1)
    result = Result.objects.select_related("unit").get(pk=lease.result_id)
    sha = upload(make_output(honest_output(result.unit)), device=device.device)
    check_signature = results.check_signature

    def sweep_then_check(*args):
        overdue(lease.result_id)
        leases_expire()
        return check_signature(*args)

    monkeypatch.setattr(results, "check_signature", sweep_then_check)

    with pytest.raises(LeaseExpired):
        result_report(device=device.device, result_id=lease.result_id, output_sha256=sha,
                      signature_b64=device.sign(result, sha))

    result.refresh_from_db()
    assert (result.reported_at, result.output_id) == (None, None)  # nothing of the report was kept
    # Here the clock and the sweep ran inside the report's transaction (one connection in tests), so the
    # report's rollback undid them too; with the lease overdue again, the sweep's next run expires it.
    overdue(lease.result_id)
    leases_expire()
    result.refresh_from_db()
    assert (result.state, result.output_id) == (Result.State.EXPIRED, None)


def test_expiries_fail_the_job_only_once_devices_of_several_owners_let_the_unit_expire(
    submit_job, make_device, contributor, other_contributor, cheater, settings
):
    settings.IDLEGRID_GIVE_UP_OWNERS = 3
    job = submit_job(rows=4, rows_per_unit=4, quorum=2, max_results_per_unit=2)

    def proven(owner):  # a device with validated work elsewhere: its expiry counts
        enrolled = make_device(owner)
        Device.objects.filter(pk=enrolled.pk).update(valid_results=1)
        return enrolled.refresh()

    leases = [workunit_lease(device=proven(owner), max_units=1)[0] for owner in (contributor, other_contributor)]
    overdue(*[lease.result_id for lease in leases])

    assert leases_expire() == 2  # two owners: the unit is replaced twice, past its cap of 2 results
    job.refresh_from_db()
    assert job.state == Job.State.RUNNING
    assert Result.objects.filter(job=job, state=Result.State.UNSENT).count() == 2

    (third,) = workunit_lease(device=proven(cheater), max_units=1)
    overdue(third.result_id)
    assert leases_expire() == 1

    job.refresh_from_db()
    assert job.state == Job.State.FAILED
    assert "devices of 3 different owners gave up on it or let its lease expire" in job.error
    assert WorkUnit.objects.get(job=job).state == WorkUnit.State.ERROR
