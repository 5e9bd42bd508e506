r"""A job's state moves that its units cause: fail, merge when done, reopen, complete.

Units call down into this module (marketplace/workunits: an errored unit fails its job, a decided
unit may finish it, a ban reopens it); it never calls back up into units' use cases or into tasks
modules: what runs later is enqueued by task name after commit (marketplace/core/tasks.py).

    pending --split--> running --last unit decided--> merging --merged--> completed
                          ^  \--a unit errored--> failed         |
                          +--------- reopened (a ban) <----------+

A cancelled job (jobs/cancel.py) is never moved back to running: a ban that re-decides one of its
units moves it to cancelling again, and its partial output is made anew without that unit.
"""

from __future__ import annotations

import logging

from django.db.models import F
from django.utils import timezone

from marketplace.core.tasks import enqueue_on_commit
from marketplace.jobs.events import job_event
from marketplace.jobs.models import Job
from marketplace.ledger import hooks as ledger_hooks
from marketplace.webhooks import catalog
from marketplace.workunits.models import Result, WorkUnit

log = logging.getLogger(__name__)


def job_fail(*, job_id: int, reason: str) -> bool:
    """Fail a job that has not ended: its unsent replicas are cancelled and its unused escrow goes back."""
    failed = Job.objects.filter(pk=job_id, state__in=(Job.State.PENDING, Job.State.RUNNING, Job.State.MERGING)).update(
        state=Job.State.FAILED, error=reason, finished_at=timezone.now()
    )
    if failed:
        Result.objects.filter(job_id=job_id, state=Result.State.UNSENT).update(state=Result.State.CANCELLED)
        ledger_hooks.job_ended(job_id)
        job_event(job_id=job_id, type=catalog.JOB_FAILED)
        log.warning("job %s failed: %s", job_id, reason)
    return bool(failed)


def job_merge_if_done(*, job_id: int) -> None:
    """Called when a unit is decided: if none is left pending and the split has made them all, move the job
    to merging (once) and merge."""
    if WorkUnit.objects.filter(job_id=job_id, known_answer_of__isnull=True).exclude(state=WorkUnit.State.DONE).exists():
        return
    if Job.objects.filter(pk=job_id, state=Job.State.RUNNING, splitting=False).update(state=Job.State.MERGING):
        enqueue_on_commit("jobs.merge", job_id)


def job_reopen(*, job_id: int) -> None:
    """A job whose output is being re-verified runs again until its units are re-decided, then is merged anew."""
    reopened = Job.objects.filter(pk=job_id, state__in=(Job.State.COMPLETED, Job.State.MERGING)).update(
        state=Job.State.RUNNING, finished_at=None, corrections=F("corrections") + 1, reopened_at=timezone.now()
    )
    if reopened:
        log.warning("job %s reopened: a device it relied on was banned", job_id)
    elif Job.objects.filter(pk=job_id, state=Job.State.CANCELLED).update(
        state=Job.State.CANCELLING, finished_at=None, corrections=F("corrections") + 1, reopened_at=timezone.now()
    ):
        log.warning("job %s: its partial output is made again: a device it relied on was banned", job_id)
        enqueue_on_commit("jobs.cancel_finish", job_id)
    job_merge_if_done(job_id=job_id)


def job_complete(*, job_id: int, output_id: str) -> bool:
    """A merging job ends with its output (merged rows, or a federated job's final weights): once, however
    many merges race here; its unused escrow goes back to the submitter."""
    completed = Job.objects.filter(pk=job_id, state=Job.State.MERGING).update(
        state=Job.State.COMPLETED, output_id=output_id, finished_at=timezone.now()
    )
    if completed:
        ledger_hooks.job_ended(job_id)
        job_event(job_id=job_id, type=catalog.JOB_COMPLETED)
    return bool(completed)
