"""Once devices are trusted, devices on probation cannot decide a unit among themselves; two owners sending
the same wrong bytes against a trusted answer are banned as colluders; probation caps the lease batch."""

import pytest
from django.utils import timezone

from marketplace.workers.models import Device, DeviceTrust
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.verification import unit_validate

KIND = "inference"


@pytest.fixture(autouse=True)
def rules(settings):
    settings.IDLEGRID_TRUST_THRESHOLD = 1000
    settings.IDLEGRID_AUDIT_RATE = 0.0
    settings.IDLEGRID_KNOWN_ANSWER_RATE = 0.0
    settings.IDLEGRID_TRUSTED_POOL_MIN = 2
    settings.IDLEGRID_TRUSTED_CONFIRMATION = True
    return settings



@pytest.fixture
def job(submit_job):
    return submit_job(rows=4, rows_per_unit=4, adaptive=True, max_results_per_unit=6)


def trusted(make_device, person):
    enrolled = make_device(person)
    DeviceTrust.objects.create(device=enrolled.device, kind=KIND, hardware_class=enrolled.device.hardware_class,
                               consecutive_valid=1000, trusted_since=timezone.now())
    return enrolled


def compute(enrolled, report, *, wrong=None):
    (lease,) = workunit_lease(device=enrolled.device, max_units=1)
    y = None
    if wrong is not None:
        from tests.conftest import infer

        y = infer(WorkUnit.objects.get(pk=lease.unit_id)) + wrong
    report(enrolled, lease.result_id, y)
    return lease


def test_in_a_cold_start_two_owners_on_probation_decide_a_unit(job, make_device, people, report):
    first = compute(make_device(people[0]), report)
    compute(make_device(people[1]), report)

    assert unit_validate(unit_id=first.unit_id) == "done"


def test_once_devices_are_trusted_two_owners_on_probation_do_not_decide_a_unit(job, make_device, people, report):
    trusted(make_device, people[6]), trusted(make_device, people[7])  # the pool exists, busy elsewhere
    first = compute(make_device(people[0]), report)
    compute(make_device(people[1]), report)

    assert unit_validate(unit_id=first.unit_id) == "pending"

    unit = WorkUnit.objects.get(pk=first.unit_id)
    assert unit.results.filter(state=Result.State.UNSENT).count() == 1  # a replica for a trusted device to confirm
    assert unit.results.filter(state=Result.State.REPORTED).count() == 2


def test_a_trusted_device_confirming_the_answer_decides_the_unit(job, make_device, people, report):
    judge, _ = trusted(make_device, people[6]), trusted(make_device, people[7])
    first = compute(make_device(people[0]), report)
    compute(make_device(people[1]), report)
    unit_validate(unit_id=first.unit_id)

    compute(judge, report)

    assert unit_validate(unit_id=first.unit_id) == "done"
    assert Result.objects.filter(unit_id=first.unit_id, state=Result.State.VALID).count() == 3


def test_past_its_cap_a_unit_is_decided_without_a_trusted_device(submit_job, make_device, people, report):
    trusted(make_device, people[6]), trusted(make_device, people[7])
    submit_job(rows=4, rows_per_unit=4, adaptive=True, max_results_per_unit=2)
    first = compute(make_device(people[0]), report)
    compute(make_device(people[1]), report)

    assert unit_validate(unit_id=first.unit_id) == "done"


def test_two_owners_sending_the_same_wrong_bytes_against_a_trusted_answer_are_banned(job, make_device, people, report):
    judge, _ = trusted(make_device, people[6]), trusted(make_device, people[7])
    first = compute(colluder := make_device(people[0]), report, wrong=1.0)
    compute(accomplice := make_device(people[1]), report, wrong=1.0)
    assert unit_validate(unit_id=first.unit_id) == "pending"
    compute(judge, report)
    assert unit_validate(unit_id=first.unit_id) == "pending"  # 2 owners against 1: still no decision
    compute(make_device(people[2]), report)

    assert unit_validate(unit_id=first.unit_id) == "done"

    for enrolled in (colluder, accomplice):
        banned = Device.objects.get(pk=enrolled.device.pk)
        assert banned.state == Device.State.BANNED
        assert "same wrong answer" in banned.ban_reason
    assert Device.objects.get(pk=judge.device.pk).state == Device.State.ACTIVE


def test_a_lone_wrong_answer_on_probation_loses_without_a_ban(job, make_device, people, report):
    judge, _ = trusted(make_device, people[6]), trusted(make_device, people[7])
    first = compute(loner := make_device(people[0]), report, wrong=1.0)
    compute(judge, report)
    unit_validate(unit_id=first.unit_id)
    compute(make_device(people[1]), report)

    assert unit_validate(unit_id=first.unit_id) == "done"

    assert Result.objects.get(pk=first.result_id).state == Result.State.INVALID
    assert Device.objects.get(pk=loner.device.pk).state == Device.State.ACTIVE


def test_the_rule_can_be_switched_off(job, make_device, people, report, rules):
    rules.IDLEGRID_TRUSTED_CONFIRMATION = False
    trusted(make_device, people[6]), trusted(make_device, people[7])
    first = compute(make_device(people[0]), report)
    compute(make_device(people[1]), report)

    assert unit_validate(unit_id=first.unit_id) == "done"


def test_a_batch_gives_each_unconfirmed_unit_its_replica_in_statements_that_do_not_grow_with_it(
    submit_job, make_device, people, report
):
    # Before: each such unit left the batch for verification._validate, ~24 ms and ~20 statements apiece.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from marketplace.workunits.verification_batch import units_validate

    trusted(make_device, people[6]), trusted(make_device, people[7])
    probation = make_device(people[0]), make_device(people[1])

    def batch(size):
        units = [WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4, adaptive=True, max_results_per_unit=6))
                 for _ in range(size)]
        for enrolled in probation:
            for _ in units:
                compute(enrolled, report)
        with CaptureQueriesContext(connection) as queries:
            verdicts = units_validate(claim=100)
        assert verdicts == {u.pk: "pending" for u in units}
        for unit in units:
            unit.refresh_from_db()
            assert unit.results_created == 3 and not unit.need_validate
            assert unit.results.filter(state=Result.State.UNSENT).count() == 1
            assert unit.results.filter(state=Result.State.REPORTED).count() == 2
        return len(queries)

    assert batch(1) == batch(5)


def test_in_a_batch_a_unit_at_its_cap_is_decided_one_by_one_as_without_a_batch(submit_job, make_device, people, report):
    from marketplace.workunits.verification_batch import units_validate

    trusted(make_device, people[6]), trusted(make_device, people[7])
    roomy = WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4, adaptive=True, max_results_per_unit=6))
    capped = WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4, adaptive=True, max_results_per_unit=2))
    for enrolled in (make_device(people[0]), make_device(people[1])):
        compute(enrolled, report), compute(enrolled, report)

    assert units_validate(claim=10) == {roomy.pk: "pending", capped.pk: "done"}

    assert Result.objects.filter(unit=capped, state=Result.State.VALID).count() == 2
    assert not Result.objects.filter(unit=capped, state=Result.State.UNSENT).exists()
    assert Result.objects.filter(unit=roomy, state=Result.State.UNSENT).count() == 1
