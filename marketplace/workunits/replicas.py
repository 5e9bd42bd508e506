"""Issuing replicas of a unit under its cap, and what happens when the cap is reached."""

from __future__ import annotations

from django.db.models import F
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.workunits.models import Result, WorkUnit

IN_FLIGHT = (Result.State.UNSENT, Result.State.IN_PROGRESS, Result.State.REPORTED)


def replica_issue(*, unit_id: int, reason: str) -> bool:
    """Create one more unsent replica if the unit is pending, its job running and the unit under its cap; else
    error the unit when nothing is left in flight, or queue it for validation when only reported results are.
    Runs inside the caller's transaction. Returns whether a replica was made."""
    from marketplace.workunits.tasks import validate_unit  # tasks import leasing, which imports this module

    # A failed job computes nothing more: its unsent replicas were cancelled, so issue none.
    counted = WorkUnit.objects.filter(
        pk=unit_id, state=WorkUnit.State.PENDING, results_created__lt=F("max_results"), job__state=Job.State.RUNNING
    ).update(results_created=F("results_created") + 1)
    if counted:
        job_id = WorkUnit.objects.values_list("job_id", flat=True).get(pk=unit_id)
        Result.objects.create(unit_id=unit_id, job_id=job_id)
        return True
    in_flight = Result.objects.filter(unit_id=unit_id, state__in=IN_FLIGHT)
    if not in_flight.exists():
        unit_error(unit_id=unit_id, reason=f"{reason}, and the unit reached its cap of results without a quorum")
    elif not in_flight.exclude(state=Result.State.REPORTED).exists():
        # Only reported results are left and none can be added: validation must decide (quorum or error),
        # or nothing would ever look at this unit again.
        if WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.PENDING).update(need_validate=True):
            validate_unit.delay_on_commit(unit_id)
    return False


def unit_error(*, unit_id: int, reason: str) -> None:
    from marketplace.jobs.services import job_fail  # jobs depend on units; the reverse only here

    errored = WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.PENDING).update(
        state=WorkUnit.State.ERROR, error=reason, finished_at=timezone.now(), need_validate=False
    )
    if errored:
        Result.objects.filter(unit_id=unit_id, state=Result.State.UNSENT).update(state=Result.State.CANCELLED)
        unit = WorkUnit.objects.only("job_id", "index").get(pk=unit_id)
        job_fail(job_id=unit.job_id, reason=f"unit #{unit.index} failed: {reason}")
