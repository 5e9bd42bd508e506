"""The safety net: whatever a lost broker message left undone, the database still says, so redo it.

Every unit and job is handled on its own: one that fails (a corrupt file, a bug that a hostile value
found) is logged with its traceback and counted, and the sweep goes on with everything else. Nothing
is marked done for a failure, so the next sweep tries it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypedDict

from django.utils import timezone

from marketplace.core.tasks import enqueue
from marketplace.jobs.lifecycle import job_merge_if_done
from marketplace.jobs.models import Job
from marketplace.workunits.verification_batch import FAILED, units_validate_waiting

log = logging.getLogger(__name__)


class SweepReport(TypedDict):
    validated: int
    split: int
    merging: int
    cancelling: int
    failed: int
    failures: list[str]  # the first 20 named


def _each(what: str, ids: Iterable[int], work: Callable[[int], Any], failures: list[str]) -> int:
    done = 0
    for pk in ids:
        try:
            work(pk)
            done += 1
        except Exception:  # isolated: the next one must still be looked at
            log.exception("sweep: %s %s failed; the next sweep tries it again", what, pk)
            failures.append(f"{what} {pk}")
    return done


def sweep_run(*, limit: int = 500) -> SweepReport:
    """Validate units left waiting, split jobs left pending, move finished jobs on to merging, requeue
    merges and the end of cancellations. Returns what it did, with the failures named."""
    failures: list[str] = []
    stale = timezone.now() - timedelta(seconds=5)
    # In batches; a unit whose validation raises is left waiting for the next sweep, the others are judged.
    verdicts = units_validate_waiting(limit=limit)
    failures += [f"unit {pk}" for pk, verdict in verdicts.items() if verdict == FAILED]
    validated = sum(verdict != FAILED for verdict in verdicts.values())
    pending = list(Job.objects.filter(state=Job.State.PENDING, created_at__lt=stale).values_list("pk", flat=True))
    split = _each("split of job", pending, lambda pk: enqueue("jobs.split", pk), failures)
    running = Job.objects.filter(state=Job.State.RUNNING).values_list("pk", flat=True)
    _each("merge check of job", running, lambda pk: job_merge_if_done(job_id=pk), failures)
    merging = list(Job.objects.filter(state=Job.State.MERGING).values_list("pk", flat=True))
    merged = _each("merge of job", merging, lambda pk: enqueue("jobs.merge", pk), failures)
    cancelling = list(Job.objects.filter(state=Job.State.CANCELLING).values_list("pk", flat=True))
    finishing = _each("cancellation of job", cancelling, lambda pk: enqueue("jobs.cancel_finish", pk), failures)
    return {"validated": validated, "split": split, "merging": merged, "cancelling": finishing,
            "failed": len(failures), "failures": failures[:20]}
