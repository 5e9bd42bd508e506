"""The lease policy: no one device can stall or fail another person's job (docs/design.md, "Lease policy").

Each attack of the hardening issue is reproduced here as it was run against the marketplace before the
policy existed, and ends now with the job completed by honest devices."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.core.exceptions import LeaseExpired
from marketplace.jobs.models import Job
from marketplace.workers.models import Device, DeviceTrust
from marketplace.workunits.leasing import lease_renew, leases_expire, workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.results import result_fail, result_release
from marketplace.workunits.verification import unit_validate


@pytest.fixture(autouse=True)
def policy(settings):
    """The production quotas (the marketplace conftest lifts the probation quota for other tests)."""
    settings.IDLEGRID_PROBATION_LEASES = 1
    settings.IDLEGRID_MAX_LEASES = 64
    settings.IDLEGRID_GIVE_UP_OWNERS = 3
    settings.IDLEGRID_GIVE_UP_COOLDOWN_SECONDS = 60
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 0
    return settings



def overdue(*result_ids):
    Result.objects.filter(pk__in=result_ids).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def work_through(devices, report):
    """Honest devices lease and compute whatever they may until nothing is left, validating as they go."""
    for _ in range(100):
        leased = 0
        for enrolled in devices:
            for lease in workunit_lease(device=enrolled.device, max_units=8):
                report(enrolled, lease.result_id)
                unit_validate(unit_id=lease.unit_id)
                leased += 1
        if not leased:
            return
    raise AssertionError("the honest devices never ran out of work")


# --- the quota counts per device ------------------------------------------------------------------

def test_a_device_on_probation_holds_one_lease_however_often_it_asks(submit_job, make_device, people):
    submit_job(rows=16, rows_per_unit=4)
    hoarder = make_device(people[0])

    assert len(workunit_lease(device=hoarder.device, max_units=4)) == 1
    assert workunit_lease(device=hoarder.device, max_units=4) == []
    assert workunit_lease(device=hoarder.device, max_units=1) == []
    assert Result.objects.filter(device=hoarder.device, state=Result.State.IN_PROGRESS).count() == 1


def test_a_device_gets_its_next_lease_once_it_reported(submit_job, make_device, people, report):
    submit_job(rows=16, rows_per_unit=4)
    device = make_device(people[0])
    (first,) = workunit_lease(device=device.device, max_units=4)
    report(device, first.result_id)

    (second,) = workunit_lease(device=device.device, max_units=4)

    assert second.unit_id != first.unit_id


def test_a_trusted_device_holds_up_to_its_quota_in_total(trusted_device, submit_job, make_device, people, policy):
    policy.IDLEGRID_MAX_LEASES = 5
    submit_job(rows=40, rows_per_unit=4)
    device = trusted_device(people[0])

    assert len(workunit_lease(device=device.device, max_units=3)) == 3
    assert len(workunit_lease(device=device.device, max_units=3)) == 2
    assert workunit_lease(device=device.device, max_units=3) == []


def test_attack_one_device_on_probation_no_longer_stalls_every_job(submit_job, make_device, people, report):
    # Before: the per-request quota let one device lease every unit of a job, request after request, and
    # one heartbeat renewed them all, forever. Now it holds one, which it cannot keep past its deadline.
    job = submit_job(rows=12, rows_per_unit=4, unit_timeout_seconds=10)
    hoarder = make_device(people[0])
    for _ in range(6):
        workunit_lease(device=hoarder.device, max_units=64)
    held = list(Result.objects.filter(device=hoarder.device, state=Result.State.IN_PROGRESS).values_list("pk", flat=True))
    assert len(held) == 1

    work_through([make_device(people[1]), make_device(people[2])], report)
    lease_renew(device=hoarder.device, result_ids=held)  # the heartbeat of a hoarder: no use
    Result.objects.filter(pk__in=held).update(lease_deadline=timezone.now() - timedelta(seconds=1),
                                              lease_expires_at=timezone.now() - timedelta(seconds=1))
    leases_expire()
    work_through([make_device(people[3])], report)

    job.refresh_from_db()
    assert job.state == Job.State.MERGING  # every unit decided by honest devices; the merge task is next
    assert not WorkUnit.objects.filter(job=job, canonical_result__device=hoarder.device).exists()


# --- a lease's life is bounded --------------------------------------------------------------------

def test_a_lease_has_a_deadline_of_the_units_time_limit_plus_the_grace(submit_job, make_device, people, policy):
    policy.IDLEGRID_LEASE_GRACE_SECONDS = 30
    submit_job(rows=4, rows_per_unit=4, unit_timeout_seconds=20)
    (lease,) = workunit_lease(device=make_device(people[0]).device, max_units=1)

    result = Result.objects.get(pk=lease.result_id)

    assert result.lease_deadline - result.leased_at == timedelta(seconds=50)
    assert result.lease_expires_at == lease.expires_at == min(result.lease_deadline, result.lease_expires_at)


def test_heartbeats_cannot_extend_a_lease_past_its_deadline(submit_job, make_device, people, policy):
    policy.IDLEGRID_LEASE_SECONDS = 120
    submit_job(rows=4, rows_per_unit=4, unit_timeout_seconds=5)
    device = make_device(people[0])
    (lease,) = workunit_lease(device=device.device, max_units=1)
    deadline = Result.objects.get(pk=lease.result_id).lease_deadline

    for _ in range(3):
        renewed, _ = lease_renew(device=device.device, result_ids=[lease.result_id])
        assert renewed == [lease.result_id]
        assert Result.objects.get(pk=lease.result_id).lease_expires_at == deadline

    Result.objects.filter(pk=lease.result_id).update(lease_deadline=timezone.now() - timedelta(seconds=1))
    renewed, _ = lease_renew(device=device.device, result_ids=[lease.result_id])
    assert renewed == []  # past its deadline: the heartbeat reports it lost
    assert Result.objects.get(pk=lease.result_id).lease_expires_at < timezone.now()
    assert leases_expire() == 1


# --- giving up ------------------------------------------------------------------------------------

def test_giving_up_costs_a_cool_down_the_trust_run_and_is_counted(trusted_device, submit_job, make_device, people, report, policy):
    submit_job(rows=16, rows_per_unit=4)
    device = trusted_device(people[0])
    (lease,) = workunit_lease(device=device.device, max_units=1)

    result_fail(device=device.device, result_id=lease.result_id, error="out of memory")

    refreshed = device.refresh()
    assert refreshed.gave_up == 1
    assert refreshed.cooldown_until > timezone.now() + timedelta(seconds=55)
    assert workunit_lease(device=refreshed, max_units=1) == []
    trust = DeviceTrust.objects.get(device=device.device)
    assert (trust.consecutive_valid, trust.trusted_since) == (0, None)
    Device.objects.filter(pk=device.pk).update(cooldown_until=timezone.now() - timedelta(seconds=1))
    assert len(workunit_lease(device=device.refresh(), max_units=1)) == 1


def test_the_api_tells_a_cooling_device_when_to_ask_again(submit_job, make_device, people, policy):
    policy.IDLEGRID_GIVE_UP_COOLDOWN_SECONDS = 300
    submit_job(rows=16, rows_per_unit=4)
    device = make_device(people[0])
    (lease,) = workunit_lease(device=device.device, max_units=1)
    device.client().post(f"/api/v1/agent/results/{lease.result_id}/fail", {"error": "oops"}, format="json")

    answer = device.client().post("/api/v1/agent/lease", {"max_units": 1}, format="json").json()

    assert answer["leases"] == []
    assert 290 <= answer["retry_after"] <= 300
    listed = {d["name"]: d for d in _devices(people[0])}
    assert listed["laptop"]["gave_up"] == 1 and listed["laptop"]["cooldown_until"] is not None


def _devices(person):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(person)
    return client.get("/api/v1/devices/").json()["results"]


def test_an_owner_never_gets_a_unit_back_that_one_of_its_devices_gave_up(submit_job, make_device, people, policy):
    policy.IDLEGRID_GIVE_UP_COOLDOWN_SECONDS = 0
    submit_job(rows=4, rows_per_unit=4)
    laptop = make_device(people[0])
    (lease,) = workunit_lease(device=laptop.device, max_units=1)
    result_fail(device=laptop.device, result_id=lease.result_id, error="crashed")

    assert workunit_lease(device=laptop.device, max_units=1) == []
    assert workunit_lease(device=make_device(people[0], name="desktop").device, max_units=1) == []
    assert len(workunit_lease(device=make_device(people[1]).device, max_units=1)) == 1


def test_attack_one_device_can_no_longer_fail_a_job(submit_job, make_device, people, report, policy):
    # Before: lease, `fail`, repeated: 22 calls from one device failed a 2-unit job (the cap counted the
    # give-ups, and the same owner could lease the unit again).
    policy.IDLEGRID_GIVE_UP_COOLDOWN_SECONDS = 0
    job = submit_job(rows=8, rows_per_unit=4, max_results_per_unit=2)
    attacker = make_device(people[0])
    calls = 0
    for _ in range(11):
        for lease in workunit_lease(device=attacker.device, max_units=1):
            result_fail(device=attacker.device, result_id=lease.result_id, error="no")
        calls += 2
    assert calls == 22
    assert attacker.refresh().gave_up == 2  # once per unit: it is kept off each unit it gave up
    assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING

    work_through([make_device(people[1]), make_device(people[2])], report)

    assert Job.objects.get(pk=job.pk).state == Job.State.MERGING


def test_a_unit_fails_its_job_once_devices_of_several_owners_gave_up_and_the_error_says_so(
    submit_job, make_device, people, policy
):
    policy.IDLEGRID_GIVE_UP_COOLDOWN_SECONDS = 0
    job = submit_job(rows=4, rows_per_unit=4)

    def give_up(person, error, *, proven=True):
        device = make_device(person)
        if proven:  # it has validated work elsewhere: its give-up is credible
            Device.objects.filter(pk=device.pk).update(valid_results=5)
        (lease,) = workunit_lease(device=device.refresh(), max_units=1)
        result_fail(device=device.device, result_id=lease.result_id, error=error)

    give_up(people[0], "out of memory")
    give_up(people[1], "segfault")
    assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING  # two owners are not enough
    give_up(people[2], "nope", proven=False)
    assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING  # nor a fresh account that proved nothing

    give_up(people[3], "out of memory")

    job.refresh_from_db()
    assert job.state == Job.State.FAILED
    assert "devices of 4 different owners gave up on it or let its lease expire, 3 of them with validated" in job.error
    assert "out of memory" in job.error and "segfault" in job.error


def test_fresh_accounts_alone_fail_a_unit_only_in_numbers_no_one_computes_it_with(
    submit_job, make_device, django_user_model, policy
):
    # A unit nobody can compute must still end on a network of newcomers: three times the owners.
    policy.IDLEGRID_GIVE_UP_COOLDOWN_SECONDS = 0
    job = submit_job(rows=4, rows_per_unit=4)
    for index in range(9):
        device = make_device(django_user_model.objects.create_user(f"new{index}"))
        (lease,) = workunit_lease(device=device.device, max_units=1)
        result_fail(device=device.device, result_id=lease.result_id, error="out of memory")
        assert (Job.objects.get(pk=job.pk).state == Job.State.FAILED) == (index == 8)


# --- handing back at shutdown ---------------------------------------------------------------------

def test_a_release_is_free_but_keeps_the_owner_off_the_unit(trusted_device, submit_job, make_device, people, policy):
    submit_job(rows=8, rows_per_unit=4)
    device = trusted_device(people[0])
    (first, second) = workunit_lease(device=device.device, max_units=2)

    result_release(device=device.device, result_id=second.result_id)

    refreshed = device.refresh()
    assert (refreshed.released, refreshed.gave_up, refreshed.cooldown_until) == (1, 0, None)
    assert DeviceTrust.objects.get(device=device.device).trusted_since is not None
    assert Result.objects.get(pk=second.result_id).state == Result.State.RELEASED
    assert {lease.unit_id for lease in workunit_lease(device=refreshed, max_units=8)} == set()  # only second's unit was left
    (other,) = workunit_lease(device=make_device(people[1]).device, max_units=8)[:1]
    assert other.unit_id in {first.unit_id, second.unit_id}


def test_releases_never_fail_a_job(submit_job, make_device, people):
    job = submit_job(rows=4, rows_per_unit=4, max_results_per_unit=2)
    for person in people[:6]:
        device = make_device(person)
        (lease,) = workunit_lease(device=device.device, max_units=1)
        result_release(device=device.device, result_id=lease.result_id)

    assert Job.objects.get(pk=job.pk).state == Job.State.RUNNING
    assert Result.objects.filter(job=job, state=Result.State.UNSENT).count() == 2


def test_a_device_cannot_release_another_devices_lease_or_a_reported_one(submit_job, make_device, people, report):
    submit_job(rows=4, rows_per_unit=4)
    device, other = make_device(people[0]), make_device(people[1])
    (lease,) = workunit_lease(device=device.device, max_units=1)

    response = other.client().post(f"/api/v1/agent/results/{lease.result_id}/release")
    assert response.status_code == 403
    report(device, lease.result_id)
    with pytest.raises(Exception) as refused:
        result_release(device=device.device, result_id=lease.result_id)
    assert refused.value.code == "already_reported"
    assert Result.objects.get(pk=lease.result_id).state == Result.State.REPORTED


def test_a_release_of_a_lease_the_sweep_expired_is_refused(submit_job, make_device, people):
    submit_job(rows=4, rows_per_unit=4)
    device = make_device(people[0])
    (lease,) = workunit_lease(device=device.device, max_units=1)
    overdue(lease.result_id)
    leases_expire()

    with pytest.raises(LeaseExpired):
        result_release(device=device.device, result_id=lease.result_id)


# --- who shares which unit with whom --------------------------------------------------------------

def test_two_devices_leasing_back_to_back_do_not_get_the_same_units(trusted_device, submit_job, make_device, people, policy):
    # Before: leases went out oldest first, so two colluders leasing one after the other received the two
    # replicas of the same units and decided them together. Now each batch is drawn at random from a
    # window of the oldest work: sharing all 8 units of a batch has a chance of about 1 in 100,000.
    policy.IDLEGRID_LEASE_DRAW_WINDOW = 32
    submit_job(rows=160, rows_per_unit=4)
    first, second = trusted_device(people[0]), trusted_device(people[1])

    mine = {lease.unit_id for lease in workunit_lease(device=first.device, max_units=8)}
    theirs = {lease.unit_id for lease in workunit_lease(device=second.device, max_units=8)}

    assert len(mine) == len(theirs) == 8
    assert mine != theirs
    oldest = set(WorkUnit.objects.filter(job__isnull=False).order_by("pk").values_list("pk", flat=True)[:20])
    assert mine <= oldest  # still from the oldest work (16 units fill the window of 32 replicas)


def test_the_order_of_a_batch_is_random_too(trusted_device, submit_job, make_device, people, policy):
    policy.IDLEGRID_LEASE_DRAW_WINDOW = 32
    submit_job(rows=400, rows_per_unit=4)
    orders = set()
    for person in people[:4]:
        leases = workunit_lease(device=trusted_device(person).device, max_units=8)
        orders.add(tuple(lease.unit_id for lease in leases) == tuple(sorted(lease.unit_id for lease in leases)))
    assert orders != {True}  # four sorted batches of 8 by chance: 1 in 40320**4
