"""workunit_lease and lease_renew: one statement claims a batch; two replicas of a unit never meet one owner."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.jobs.lifecycle import job_fail
from marketplace.workunits import leasing
from marketplace.workunits.leasing import lease_renew, workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.verification import unit_validate


def leased_units(leases):
    return [lease.unit_id for lease in leases]


def test_it_leases_the_oldest_units_first_with_their_payloads(submit_job, make_device, contributor, settings):
    job = submit_job(rows=10, rows_per_unit=4)
    device = make_device(contributor)

    leases = workunit_lease(device=device.device, max_units=2)

    units = list(WorkUnit.objects.filter(job=job).order_by("index"))
    assert leased_units(leases) == [units[0].pk, units[1].pk]
    assert [lease.payload for lease in leases] == [units[0].payload, units[1].payload]
    for lease in leases:
        result = Result.objects.get(pk=lease.result_id)
        assert (result.state, result.device, result.owner) == (Result.State.IN_PROGRESS, device.device, contributor)
        assert result.lease_expires_at == lease.expires_at
        assert lease.expires_at - result.leased_at == timedelta(seconds=settings.IDLEGRID_LEASE_SECONDS)


def test_a_batch_never_holds_two_replicas_of_one_unit(submit_job, make_device, contributor):
    job = submit_job(rows=10, rows_per_unit=4)

    leases = workunit_lease(device=make_device(contributor).device, max_units=64)

    assert sorted(leased_units(leases)) == sorted(WorkUnit.objects.filter(job=job).values_list("pk", flat=True))


def test_it_honours_max_units(submit_job, make_device, contributor):
    submit_job(rows=10, rows_per_unit=2)

    leases = workunit_lease(device=make_device(contributor).device, max_units=3)

    assert len(leases) == 3


def test_a_second_device_of_the_same_owner_gets_no_replica_of_the_units_the_first_holds(
    submit_job, make_device, contributor
):
    submit_job(rows=10, rows_per_unit=4)
    laptop, desktop = make_device(contributor, name="laptop"), make_device(contributor, name="desktop")
    workunit_lease(device=laptop.device, max_units=64)

    assert workunit_lease(device=desktop.device, max_units=64) == []


def test_an_owner_who_reported_a_unit_gets_no_other_replica_of_it(submit_job, make_device, contributor, report):
    submit_job(rows=4, rows_per_unit=4)
    laptop, desktop = make_device(contributor, name="laptop"), make_device(contributor, name="desktop")
    (lease,) = workunit_lease(device=laptop.device, max_units=1)
    report(laptop, lease.result_id)

    assert workunit_lease(device=desktop.device, max_units=1) == []


def test_another_owner_gets_the_other_replica_of_each_unit(submit_job, make_device, contributor, other_contributor):
    submit_job(rows=10, rows_per_unit=4)
    mine = workunit_lease(device=make_device(contributor).device, max_units=64)

    theirs = workunit_lease(device=make_device(other_contributor).device, max_units=64)

    assert sorted(leased_units(theirs)) == sorted(leased_units(mine))
    assert not {lease.result_id for lease in mine} & {lease.result_id for lease in theirs}
    assert Result.objects.filter(state=Result.State.UNSENT).count() == 0


def test_it_leases_nothing_when_every_replica_is_out(submit_job, make_device, contributor, other_contributor, cheater):
    submit_job(rows=4, rows_per_unit=4)
    workunit_lease(device=make_device(contributor).device, max_units=1)
    workunit_lease(device=make_device(other_contributor).device, max_units=1)

    assert workunit_lease(device=make_device(cheater).device, max_units=1) == []


def test_it_leases_nothing_of_a_done_unit(submit_job, make_device, contributor, other_contributor, cheater, report):
    job = submit_job(rows=4, rows_per_unit=4)
    unit = WorkUnit.objects.get(job=job)
    for owner in (contributor, other_contributor):
        device = make_device(owner)
        (lease,) = workunit_lease(device=device.device, max_units=1)
        report(device, lease.result_id)
    unit_validate(unit_id=unit.pk)

    assert workunit_lease(device=make_device(cheater).device, max_units=1) == []


def test_it_leases_nothing_of_a_failed_job(submit_job, make_device, contributor):
    job = submit_job(rows=10, rows_per_unit=4)
    job_fail(job_id=job.pk, reason="the submitter cancelled it")

    assert workunit_lease(device=make_device(contributor).device, max_units=64) == []
    assert set(Result.objects.filter(job=job).values_list("state", flat=True)) == {Result.State.CANCELLED}


def test_it_locks_candidates_with_skip_locked_only_on_postgresql():
    assert ("SKIP LOCKED" in leasing._lease_sql(draw=True, kinds=2)) == (connection.vendor == "postgresql")


def test_the_statement_without_row_locks_leases_too(submit_job, make_device, contributor, other_contributor,
                                                    monkeypatch):
    # SQLite has no SKIP LOCKED (its IMMEDIATE transactions serialise writers); run that variant on any backend.
    original = leasing._lease_sql
    monkeypatch.setattr(leasing, "_lease_sql", lambda draw, kinds, gpu=False, joined=False: original(
        draw=False, kinds=kinds, gpu=gpu, joined=joined, locked=False))
    job = submit_job(rows=10, rows_per_unit=4)

    mine = workunit_lease(device=make_device(contributor).device, max_units=64)
    theirs = workunit_lease(device=make_device(other_contributor).device, max_units=64)

    units = sorted(WorkUnit.objects.filter(job=job).values_list("pk", flat=True))
    assert sorted(leased_units(mine)) == units
    assert sorted(leased_units(theirs)) == units


def test_it_renews_the_devices_live_leases(submit_job, make_device, contributor):
    submit_job(rows=10, rows_per_unit=4)
    device = make_device(contributor)
    leases = workunit_lease(device=device.device, max_units=2)
    ids = [lease.result_id for lease in leases]
    Result.objects.filter(pk__in=ids).update(lease_expires_at=timezone.now() + timedelta(seconds=1))

    renewed, expires = lease_renew(device=device.device, result_ids=ids)

    assert renewed == sorted(ids)
    assert list(Result.objects.filter(pk__in=ids).values_list("lease_expires_at", flat=True)) == [expires, expires]
    assert device.refresh().last_seen_at is not None


@pytest.mark.parametrize("how", ["expired deadline", "expired by the sweep", "another device's", "reported"])
def test_it_does_not_renew_a_lease_the_device_lost(submit_job, make_device, contributor, other_contributor, report,
                                                    how):
    submit_job(rows=4, rows_per_unit=4)
    device, other = make_device(contributor), make_device(other_contributor)
    (lease,) = workunit_lease(device=device.device, max_units=1)
    (other_lease,) = workunit_lease(device=other.device, max_units=1)
    result_id = lease.result_id
    if how == "expired deadline":
        Result.objects.filter(pk=result_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    elif how == "expired by the sweep":
        Result.objects.filter(pk=result_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        leasing.leases_expire()
    elif how == "another device's":
        result_id = other_lease.result_id
    else:
        report(device, result_id)
    before = Result.objects.get(pk=result_id).lease_expires_at

    renewed, _ = lease_renew(device=device.device, result_ids=[result_id])

    assert renewed == []
    assert Result.objects.get(pk=result_id).lease_expires_at == before
