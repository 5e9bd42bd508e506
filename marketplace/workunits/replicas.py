"""Issuing replicas of a unit under its cap, and what happens when the cap is reached."""

from __future__ import annotations

from django.db.models import F
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.workers.models import Device
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


def replication_decide(*, device: Device, unit_ids: list[int]) -> None:
    """At a unit's first lease, choose its replication from the leasing device's trust: a trusted device's
    unit is accepted on its word (quorum 1) unless audited; anyone else's is replicated to the quorum.
    Runs in the lease transaction; the conditional UPDATE makes the choice once per unit."""
    from marketplace.workers.trust import replication_choose

    undecided = WorkUnit.objects.filter(pk__in=unit_ids, replication_decided=False).values_list(
        "pk", "job_id", "quorum", "payload__kind"
    )
    extra: list[Result] = []
    for unit_id, job_id, quorum, kind in undecided:
        replicate, audit = replication_choose(device=device, kind=kind)
        more = quorum - 1 if replicate else 0
        decided = WorkUnit.objects.filter(pk=unit_id, replication_decided=False).update(
            replication_decided=True, quorum=quorum if replicate else 1, audit=audit,
            results_created=F("results_created") + more,
        )
        if decided:
            extra += [Result(unit_id=unit_id, job_id=job_id) for _ in range(more)]
    Result.objects.bulk_create(extra)


def unit_error(*, unit_id: int, reason: str) -> None:
    from marketplace.jobs.services import job_fail  # jobs depend on units; the reverse only here

    errored = WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.PENDING).update(
        state=WorkUnit.State.ERROR, error=reason, finished_at=timezone.now(), need_validate=False
    )
    if errored:
        Result.objects.filter(unit_id=unit_id, state=Result.State.UNSENT).update(state=Result.State.CANCELLED)
        unit = WorkUnit.objects.only("job_id", "index", "known_answer_of_id").get(pk=unit_id)
        if unit.known_answer_of_id is not None:
            return  # a known-answer copy that came to nothing costs its job nothing
        job_fail(job_id=unit.job_id, reason=f"unit #{unit.index} failed: {reason}")
