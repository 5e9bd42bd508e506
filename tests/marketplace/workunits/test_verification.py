"""unit_validate: a unit is done when `quorum` results from different owners agree."""

from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_issue
from marketplace.workunits.verification import unit_validate

# A device of another hardware class than conftest.HARDWARE: results are compared by the job's tolerance.
ANOTHER_CLASS = {"os": "linux", "machine": "x86_64", "cpu_capability": "DEFAULT"}


@pytest.fixture
def unit(submit_job):
    """The one unit of a 4-row job, with its two replicas unsent."""
    return WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4))


@pytest.fixture
def compute(unit, make_device, report):
    """compute(owner, y=None): a new device of that owner leases the unit and reports (honestly without y)."""

    def run(owner, y=None, **device_options):
        device = make_device(owner, **device_options)
        (lease,) = workunit_lease(device=device.device, max_units=1)
        assert lease.unit_id == unit.pk
        return device, report(device, lease.result_id, y)

    return run


@pytest.fixture
def wrong(unit, honest_output):
    """A cheater's output: the right shape, far from the truth."""
    return honest_output(unit) + 1.0


def states(unit):
    return list(unit.results.order_by("pk").values_list("state", flat=True))


def test_two_agreeing_owners_make_the_unit_done(unit, compute, contributor, other_contributor):
    first, r1 = compute(contributor)
    second, r2 = compute(other_contributor)

    assert unit_validate(unit_id=unit.pk) == "done"

    unit.refresh_from_db()
    assert unit.state == WorkUnit.State.DONE
    assert unit.canonical_result_id == r1.pk
    assert unit.finished_at is not None
    assert unit.need_validate is False
    assert states(unit) == [Result.State.VALID, Result.State.VALID]
    for device in (first, second):
        assert (device.refresh().valid_results, device.device.invalid_results) == (1, 0)


def test_a_single_report_is_not_enough(unit, compute, contributor):
    compute(contributor)

    assert unit_validate(unit_id=unit.pk) == "pending"

    unit.refresh_from_db()
    assert unit.state == WorkUnit.State.PENDING
    assert states(unit) == [Result.State.REPORTED, Result.State.UNSENT]
    assert unit.results_created == 2


def test_outputs_that_differ_by_1e_7_still_agree(unit, compute, honest_output, contributor, other_contributor):
    honest = honest_output(unit)
    compute(contributor, honest)
    compute(other_contributor, honest + 1e-7, hardware=ANOTHER_CLASS)  # same class: bitwise (test_hardware_classes)

    assert unit_validate(unit_id=unit.pk) == "done"
    assert states(unit) == [Result.State.VALID, Result.State.VALID]


def test_outputs_with_another_top1_class_disagree_even_within_tolerance(unit, compute, contributor, other_contributor):
    tie = np.zeros((4, 3), dtype=np.float32)
    nudged = tie.copy()
    nudged[:, 1] += 1e-7  # allclose to the tie, but argmax moves from class 0 to class 1
    compute(contributor, tie)
    compute(other_contributor, nudged, hardware=ANOTHER_CLASS)

    assert unit_validate(unit_id=unit.pk) == "pending"


def test_a_faulty_result_costs_one_more_replica_and_is_then_judged_invalid(
    unit, compute, wrong, contributor, cheater, other_contributor
):
    honest_device, honest = compute(contributor)
    cheater_device, faulty = compute(cheater, wrong)

    assert unit_validate(unit_id=unit.pk) == "pending"
    unit.refresh_from_db()
    assert unit.results_created == 3
    assert states(unit) == [Result.State.REPORTED, Result.State.REPORTED, Result.State.UNSENT]

    third_device, third = compute(other_contributor)
    assert unit_validate(unit_id=unit.pk) == "done"

    unit.refresh_from_db()
    assert unit.canonical_result_id == honest.pk
    assert states(unit) == [Result.State.VALID, Result.State.INVALID, Result.State.VALID]
    assert (cheater_device.refresh().valid_results, cheater_device.device.invalid_results) == (0, 1)
    assert third_device.refresh().valid_results == 1


def test_two_devices_of_one_owner_do_not_make_a_quorum(unit, make_device, report, compute, contributor,
                                                      other_contributor):
    # Leasing already keeps two replicas of a unit off one owner; validation must hold on its own.
    laptop, desktop = make_device(contributor, name="laptop"), make_device(contributor, name="desktop")
    first, second = unit.results.order_by("pk")
    now = timezone.now()
    for device, result in ((laptop, first), (desktop, second)):
        Result.objects.filter(pk=result.pk, state=Result.State.UNSENT).update(
            state=Result.State.IN_PROGRESS, device=device.device, owner=contributor, leased_at=now,
            lease_expires_at=now + timedelta(minutes=5),
        )
        report(device, result)

    assert unit_validate(unit_id=unit.pk) == "pending"

    unit.refresh_from_db()
    assert unit.state == WorkUnit.State.PENDING
    assert states(unit) == [Result.State.REPORTED, Result.State.REPORTED, Result.State.UNSENT]
    assert laptop.refresh().valid_results == 0

    compute(other_contributor)
    assert unit_validate(unit_id=unit.pk) == "done"
    assert states(unit) == [Result.State.VALID, Result.State.VALID, Result.State.VALID]


def test_at_the_cap_of_results_disagreement_errors_the_unit_and_fails_the_job(
    submit_job, make_device, report, honest_output, contributor, cheater
):
    job = submit_job(rows=8, rows_per_unit=4, quorum=2, max_results_per_unit=2)
    first_unit, second_unit = WorkUnit.objects.filter(job=job).order_by("index")
    honest_device, cheater_device = make_device(contributor), make_device(cheater)
    report(honest_device, workunit_lease(device=honest_device.device, max_units=1)[0].result_id)
    report(cheater_device, workunit_lease(device=cheater_device.device, max_units=1)[0].result_id,
           honest_output(first_unit) + 1.0)

    assert unit_validate(unit_id=first_unit.pk) == "error"

    first_unit.refresh_from_db()
    assert first_unit.state == WorkUnit.State.ERROR
    assert first_unit.results_created == 2
    assert "no 2 agreeing results" in first_unit.error
    job.refresh_from_db()
    assert job.state == Job.State.FAILED
    assert "unit #0 failed" in job.error
    assert set(second_unit.results.values_list("state", flat=True)) == {Result.State.CANCELLED}


def test_a_replica_reported_after_the_unit_is_done_is_judged_against_the_canonical_result(
    unit, compute, contributor, other_contributor, cheater, wrong, make_device, report
):
    replica_issue(unit_id=unit.pk, reason="a third replica went out before the quorum")
    late_device = make_device(cheater)
    (late,) = workunit_lease(device=late_device.device, max_units=1)
    _, canonical = compute(contributor)
    compute(other_contributor)
    assert unit_validate(unit_id=unit.pk) == "done"

    report(late_device, late.result_id, wrong)
    assert unit_validate(unit_id=unit.pk) == "done"

    unit.refresh_from_db()
    assert unit.canonical_result_id == canonical.pk
    assert Result.objects.get(pk=late.result_id).state == Result.State.INVALID
    assert (late_device.refresh().valid_results, late_device.device.invalid_results) == (0, 1)


def test_an_honest_late_replica_is_judged_valid(unit, compute, contributor, other_contributor, cheater, make_device,
                                               report):
    replica_issue(unit_id=unit.pk, reason="a third replica went out before the quorum")
    late_device = make_device(cheater)
    (late,) = workunit_lease(device=late_device.device, max_units=1)
    compute(contributor)
    compute(other_contributor)
    unit_validate(unit_id=unit.pk)

    report(late_device, late.result_id)
    unit_validate(unit_id=unit.pk)

    assert Result.objects.get(pk=late.result_id).state == Result.State.VALID
    assert late_device.refresh().valid_results == 1


def test_validating_twice_changes_nothing(unit, compute, contributor, other_contributor):
    first, _ = compute(contributor)
    compute(other_contributor)
    unit_validate(unit_id=unit.pk)
    unit.refresh_from_db()
    before = (unit.state, unit.canonical_result_id, unit.finished_at, states(unit), unit.results_created)

    assert unit_validate(unit_id=unit.pk) == "done"

    unit.refresh_from_db()
    assert (unit.state, unit.canonical_result_id, unit.finished_at, states(unit), unit.results_created) == before
    assert first.refresh().valid_results == 1


def test_validating_a_pending_disagreement_twice_issues_one_replica(unit, compute, wrong, contributor, cheater):
    compute(contributor)
    compute(cheater, wrong)

    unit_validate(unit_id=unit.pk)
    unit_validate(unit_id=unit.pk)

    unit.refresh_from_db()
    assert unit.results_created == 3
    assert unit.results.filter(state=Result.State.UNSENT).count() == 1


def test_the_last_unit_done_moves_the_job_to_merging_and_enqueues_the_merge(
    unit, compute, contributor, other_contributor, enqueued, django_capture_on_commit_callbacks
):
    compute(contributor)
    compute(other_contributor)

    with django_capture_on_commit_callbacks(execute=True):
        unit_validate(unit_id=unit.pk)

    assert Job.objects.get(pk=unit.job_id).state == Job.State.MERGING
    assert enqueued == [("jobs.merge", (unit.job_id,))]
