"""What a job's cancellation does to its units and replicas (the job's own state moves are in
marketplace/jobs/cancel.py).

At the request (`job_results_revoke`, `job_reports_queue`): every replica not yet answered is cancelled, the job's own units'
and their known-answer copies' alike. An unsent replica is never leased again (the lease query takes
only `unsent` rows); a leased one is revoked: the next heartbeat no longer renews it (it renews only
`in_progress` rows) and answers it `lost`, so the agent kills the unit's child, and a report or give-up
for it is refused (409 `lease_cancelled`). Results already reported are kept and their units queued for
validation: what a quorum of them decides is valid work, and is paid.

At the end (`job_units_close`): whatever that validation could not decide (too few answers, and no
replica may be issued for a job that is not running) is closed: pending units error with the reason,
and reported results left undecided are cancelled, never paid (nothing the marketplace verified).
"""

from __future__ import annotations

from django.utils import timezone

from marketplace.core.tasks import enqueue_on_commit
from marketplace.workunits.models import Result, WorkUnit

UNANSWERED = (Result.State.UNSENT, Result.State.IN_PROGRESS)
UNDECIDED_REASON = "the job was cancelled before this unit was decided"


def job_results_revoke(*, job_id: int) -> int:
    """Cancel the job's unanswered replicas. Runs inside the caller's transaction; safe to repeat (a
    replica that a lease racing the cancellation made is cancelled the next time). Returns how many."""
    return Result.objects.filter(job_id=job_id, state__in=UNANSWERED).update(
        state=Result.State.CANCELLED, error="the job was cancelled"
    )


def job_reports_queue(*, job_id: int) -> int:
    """Queue for validation every pending unit of the job with a report waiting: a replicated unit short
    of its quorum waits for replicas that will never come now, so it must be judged on what it has.
    Runs inside the caller's transaction. Returns the units queued."""
    waiting = list(
        WorkUnit.objects.filter(job_id=job_id, state=WorkUnit.State.PENDING, results__state=Result.State.REPORTED)
        .values_list("pk", flat=True).distinct()
    )
    WorkUnit.objects.filter(pk__in=waiting).update(need_validate=True)
    for unit_id in waiting:
        enqueue_on_commit("workunits.validate", unit_id)
    return len(waiting)


def job_units_waiting(*, job_id: int) -> list[int]:
    """The job's units still queued for validation (the cancellation waits for them)."""
    return list(WorkUnit.objects.filter(job_id=job_id, need_validate=True).order_by("pk").values_list("pk", flat=True))


def job_units_close(*, job_id: int) -> int:
    """Close what the cancelled job left undecided: pending units (its own and known-answer copies) error,
    and results not judged are cancelled, unpaid. Runs inside the caller's transaction. Returns the units
    closed."""
    now = timezone.now()
    closed = WorkUnit.objects.filter(job_id=job_id, state=WorkUnit.State.PENDING).update(
        state=WorkUnit.State.ERROR, error=UNDECIDED_REASON, finished_at=now, need_validate=False
    )
    Result.objects.filter(job_id=job_id, state__in=(*UNANSWERED, Result.State.REPORTED)).update(
        state=Result.State.CANCELLED, error="the job was cancelled before this result was judged"
    )
    return closed
