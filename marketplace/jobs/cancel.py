r"""A submitter cancels a job: it stops at once, and ends once what was already answered is judged.

    pending | running | merging --cancel--> cancelling --finish (task, or the sweep)--> cancelled
                                                ^                                           |
                                                +------- reopened (a ban re-verifies) ------+

`job_cancel` (the request) moves the job to `cancelling` and, in the same transaction, cancels every
replica not yet answered: nothing of the job is leased any more, and leases held now are revoked (the
agents learn it from their next heartbeat, which answers them `lost`, and kill the unit). Nothing moves
the job back: the split, merges, rounds, replicas and replacements all act on pending, running or
merging jobs only. Asking again is harmless (the job is answered as it is); a completed or failed job
cannot be cancelled (409).

`job_cancel_finish` (the task "jobs.cancel_finish", sent after the request commits, and sent again by
every sweep while the job is `cancelling`, so a crash only delays it) judges the results reported
before the cancellation, with what they are: a unit they decide is done and its valid results are paid
from the escrow like any others; a unit they cannot decide (too few answers: no replica is issued for a
cancelled job) errors and its undecided results are cancelled, unpaid. Then it stores the partial
output and moves the job to `cancelled`; the escrow left returns to the submitter.

The partial output: an inference job's rows decided so far, in one safetensors file with `y` over every
row of the dataset (undecided rows zero) and a bool `mask` over the rows (jobs/kinds/inference.py,
docs/api/cancel.md); a federated job's global weights of its last aggregated round. No output when
nothing was decided (no unit, or no round).
"""

from __future__ import annotations

import logging
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from marketplace.artifacts.services import artifact_store
from marketplace.core.exceptions import Conflict
from marketplace.core.tasks import enqueue_on_commit
from marketplace.core.tensors import write_many
from marketplace.jobs.events import job_event
from marketplace.jobs.kinds import kind_module
from marketplace.jobs.models import FedRound, Job
from marketplace.jobs.selectors import job_get_for_owner
from marketplace.ledger import hooks as ledger_hooks
from marketplace.ledger.earnings import job_earnings_credit
from marketplace.webhooks import catalog
from marketplace.workunits.cancel import job_reports_queue, job_results_revoke, job_units_close, job_units_waiting
from marketplace.workunits.models import WorkUnit
from marketplace.workunits.verification import unit_validate

log = logging.getLogger(__name__)
CANCELLABLE = (Job.State.PENDING, Job.State.RUNNING, Job.State.MERGING)
VALIDATION_PASSES = 3  # a pass can queue a unit again (a disputed known answer reopens its original)

Decided = dict[int, tuple[str, list[list[int]]]]  # unit index -> (canonical output, hidden rows)


def job_cancel(*, job_id: int, owner: AbstractBaseUser) -> Job:
    """Cancel the owner's job: `cancelling` now, `cancelled` once its reports are judged. Idempotent: a job
    cancelling or cancelled already is returned as it is; a completed or failed one is refused (409)."""
    job = job_get_for_owner(job_id=job_id, owner=owner)
    with transaction.atomic():
        moved = Job.objects.filter(pk=job.pk, state__in=CANCELLABLE).update(state=Job.State.CANCELLING)
        if moved:
            revoked = job_results_revoke(job_id=job.pk)
            queued = job_reports_queue(job_id=job.pk)
            enqueue_on_commit("jobs.cancel_finish", job.pk)
    job.refresh_from_db()
    if moved:
        log.info("job %s cancelling: %s replicas revoked, %s units with reports to judge", job.pk, revoked, queued)
    elif job.state in (Job.State.COMPLETED, Job.State.FAILED):
        raise Conflict(f"job {job.pk} is already {job.state}; only a pending, running or merging job can be cancelled")
    return job


def job_cancel_finish(*, job_id: int) -> Job:
    """Finish a cancelling job: judge what was reported, pay what is valid, store the partial output, then
    `cancelled` (once: a conditional UPDATE under the job's row lock). Safe to run twice and concurrently;
    a run that finds reports still being judged leaves the job cancelling for the next sweep."""
    job = Job.objects.get(pk=job_id)
    if job.state != Job.State.CANCELLING:
        return job
    job_results_revoke(job_id=job_id)  # a replica a lease claimed while the request committed
    if not _reports_judged(job_id):
        log.info("job %s: reports still being judged; the sweep finishes the cancellation", job_id)
        return job
    job_earnings_credit(job_id=job_id)  # validated work is paid from the escrow before the rest goes back
    decided = _decided(job)
    output = _partial_output(job, decided)
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job_id)
        if locked.state != Job.State.CANCELLING or _decided(locked) != decided:
            return locked  # finished by another run, or a ban re-decided a unit meanwhile: the next run
        closed = job_units_close(job_id=job_id)
        Job.objects.filter(pk=job_id, state=Job.State.CANCELLING).update(
            state=Job.State.CANCELLED, output_id=output, finished_at=timezone.now()
        )
        ledger_hooks.job_ended(job_id)
        job_event(job_id=job_id, type=catalog.JOB_CANCELLED)  # sent once this commits
    log.info("job %s cancelled: %s units undecided, output %s", job_id, closed, output)
    job.refresh_from_db()
    return job


def _reports_judged(job_id: int) -> bool:
    """Validate the job's units queued for it, here and now; whether none is left queued."""
    for _ in range(VALIDATION_PASSES):
        waiting = job_units_waiting(job_id=job_id)
        if not waiting:
            return True
        for unit_id in waiting:
            unit_validate(unit_id=unit_id)
    return not job_units_waiting(job_id=job_id)


def _decided(job: Job) -> Decided | str | None:
    """What the partial output is made of: an inference job's decided units, a federated job's last round."""
    if getattr(kind_module(job.kind), "ROUNDS", False):
        last = FedRound.objects.filter(job=job).order_by("-index").values_list("weights_out_id", flat=True).first()
        return last
    return {
        index: (output, hidden)
        for index, output, hidden in WorkUnit.objects.filter(
            job=job, known_answer_of__isnull=True, state=WorkUnit.State.DONE
        ).values_list("index", "canonical_result__output_id", "hidden_rows")
    }


def _partial_output(job: Job, decided: Decided | str | None) -> str | None:
    """The artifact of the partial output (sha256), or None when nothing was decided."""
    if not isinstance(decided, dict):
        return decided  # a federated job's last aggregated weights, if any round was aggregated
    if not decided:
        return None
    tensors: Any = kind_module(job.kind).partial_tensors(job.spec, decided)
    artifact, _ = artifact_store(chunks=write_many(tensors), uploaded_by=job.owner, max_bytes=2**62)
    return artifact.sha256
