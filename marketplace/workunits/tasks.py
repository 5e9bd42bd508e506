"""Celery tasks of work units: thin, take ids, call one service each. The registered names are the
contract with queued messages, beat's schedule and enqueue_on_commit: never rename them."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from django.conf import settings

from marketplace.core.tasks import coalesced_started, enqueue_coalesced_on_commit
from marketplace.workunits import archive, leasing, verification_batch
from marketplace.workunits import sweep as sweeping
from marketplace.workunits.archive import ArchiveReport
from marketplace.workunits.sweep import SweepReport

# A unit locked by a concurrent report or validation is retried this often, a second apart; past that it
# keeps its need_validate flag for the sweep.
VALIDATE_RETRIES = 5
VALIDATE_WAITING = "workunits.validate_waiting"


@shared_task(name="workunits.validate", acks_late=True, bind=True, max_retries=VALIDATE_RETRIES)
def unit_validate_task(self: Task[Any, Any], unit_id: int) -> str:
    """Validate the unit, and with it up to IDLEGRID_VALIDATE_BATCH - 1 other units waiting: a burst of
    reports, one message each, is judged in a few batches, and the messages of units a batch already
    judged find nothing left to do (verification_batch.unit_validate_waiting)."""
    verdict = verification_batch.unit_validate_waiting(unit_id=unit_id, claim=settings.IDLEGRID_VALIDATE_BATCH - 1)
    if verdict == verification_batch.SKIPPED and not self.request.called_directly:
        raise self.retry(countdown=1)
    return verdict


@shared_task(name="workunits.validate_waiting", acks_late=True)
def units_validate_waiting_task(limit: int = 5000) -> int:
    """Validate up to `limit` units waiting with need_validate, in batches; returns how many were judged.
    Reports send it once per burst (enqueue_coalesced_on_commit); units it could not claim (locked by a
    report or another validation as it looked) or left past its limit get one more message."""
    coalesced_started(VALIDATE_WAITING)
    verdicts = verification_batch.units_validate_waiting(limit=limit)
    if verification_batch.units_waiting(besides=verdicts):
        enqueue_coalesced_on_commit(VALIDATE_WAITING, countdown=1)
    return len(verdicts)


@shared_task(name="workunits.expire_leases", acks_late=True)
def leases_expire_task() -> int:
    return leasing.leases_expire()


@shared_task(name="workunits.sweep", acks_late=True)
def sweep_run_task(limit: int = 500) -> SweepReport:
    return sweeping.sweep_run(limit=limit)


@shared_task(name="workunits.archive_results", acks_late=True)
def results_archive_task() -> ArchiveReport:
    return archive.results_archive()
