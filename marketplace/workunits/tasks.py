"""Celery tasks of work units: thin, take ids, call one service each. The registered names are the
contract with queued messages, beat's schedule and enqueue_on_commit: never rename them."""

from celery import shared_task

from marketplace.workunits import archive, leasing, verification
from marketplace.workunits import sweep as sweeping
from marketplace.workunits.archive import ArchiveReport
from marketplace.workunits.sweep import SweepReport


@shared_task(name="workunits.validate", acks_late=True)
def unit_validate_task(unit_id: int) -> str:
    return verification.unit_validate(unit_id=unit_id)


@shared_task(name="workunits.expire_leases", acks_late=True)
def leases_expire_task() -> int:
    return leasing.leases_expire()


@shared_task(name="workunits.sweep", acks_late=True)
def sweep_run_task(limit: int = 500) -> SweepReport:
    return sweeping.sweep_run(limit=limit)


@shared_task(name="workunits.archive_results", acks_late=True)
def results_archive_task() -> ArchiveReport:
    return archive.results_archive()
