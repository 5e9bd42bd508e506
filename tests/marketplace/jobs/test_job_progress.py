"""Job progress and ETA count the units being computed, by the fraction their devices last reported."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.jobs.live import job_live
from marketplace.jobs.selectors import job_progress, job_progress_annotated, jobs_for_owner, units_in_progress
from marketplace.workunits.models import Result, WorkUnit


@pytest.fixture
def job(submit_job):
    return submit_job(rows=12, rows_per_unit=4)  # three units, each replicated to the quorum


def computing(unit: WorkUnit, *fractions: float | None) -> None:
    """Put the unit's first replicas in progress, each having reported the fraction given (None: nothing)."""
    replicas = list(Result.objects.filter(unit=unit).order_by("pk"))
    assert len(replicas) >= len(fractions)
    for replica, fraction in zip(replicas, fractions, strict=False):
        Result.objects.filter(pk=replica.pk).update(state=Result.State.IN_PROGRESS, progress=fraction)


def test_units_in_progress_sums_the_furthest_replica_of_each_undecided_unit(submit_job):
    job = submit_job(rows=16, rows_per_unit=4)
    first, second, third, fourth = WorkUnit.objects.filter(job=job).order_by("index")
    computing(first, 0.6, 0.6)  # two devices as far on one unit: 0.6 of a unit, not 1.2
    computing(second, 0.1, 0.3)  # the furthest counts
    computing(third, None)  # computing, has not said how far
    computing(fourth, 0.9)
    WorkUnit.objects.filter(pk=fourth.pk).update(state=WorkUnit.State.DONE)  # decided: counted as done already

    assert units_in_progress(job=job) == pytest.approx(0.9)
    assert job_progress(job=job)["units_in_progress"] == pytest.approx(0.9)
    (listed,) = jobs_for_owner(owner=job.owner)  # a list's row says the same, in its one query
    assert job_progress_annotated(job=listed) == job_progress(job=job)


def test_the_live_fraction_and_eta_count_the_units_in_progress(job):
    first, second, third = WorkUnit.objects.filter(job=job).order_by("index")
    WorkUnit.objects.filter(pk=first.pk).update(state=WorkUnit.State.DONE, finished_at=timezone.now())
    job.started_at = timezone.now() - timedelta(minutes=10)  # one unit decided in the last 5 minutes
    job.save(update_fields=["started_at"])
    before = job_live(job=job)

    computing(second, 0.5)
    computing(third, 0.25)
    after = job_live(job=job)

    assert before["fraction"] == pytest.approx(1 / 3) and after["fraction"] == pytest.approx((1 + 0.75) / 3)
    assert before["units_per_minute"] == after["units_per_minute"] == pytest.approx(0.2)
    assert (before["eta_seconds"], after["eta_seconds"]) == (600, 375)  # 2 units left, then 1.25, at 0.2/min
