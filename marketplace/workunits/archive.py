"""Finished rows leave the hot table: a finished job's results move to ResultArchive, so the table that
leases, reports and validations work on (workunits_result) holds live work and the recent past only, and
the lease's cost does not grow with every result ever computed (docs/ARCHITECTURE.md, invariant 2).

Why an archive table and not PostgreSQL partitioning. A partitioned workunits_result needs its partition
key in every unique constraint: by state, the primary key becomes (id, state), so neither the Earning that
paid a result nor the unit naming its canonical result could keep a foreign key to it by id, and every
state move of the hot path (unsent -> in_progress -> reported -> valid) becomes a delete and an insert
across partitions, one that a concurrent `FOR UPDATE` sees as "moved to another partition" and fails on. By
id or by time, no partition is ever pruned from the lease (it filters on state, and its NOT EXISTS probes
(unit, owner) in every partition), so each new partition adds planning and an index probe to every lease:
the cost would grow with history again, only in steps. And SQLite, the embedded default, has neither.
An archive table keeps the hot table one ordinary table with its partial indexes, works the same on both
engines, and costs one short transaction per batch, off the hot path.

What moves, and why each condition (every one re-checked inside the batch's transaction):
- the job ended (completed, failed or cancelled) at least IDLEGRID_ARCHIVE_AFTER_SECONDS ago and was not
  reopened since. That is at least the audit window (settings refuse less): a ban re-verifies its device's
  valid results of the window (reverify.device_results_reverify) and a failed known-row check re-decides
  its owner's answers of the window (reverify.owner_answers_recheck), so no re-decision ever reads a
  moved row, and no moved unit is ever judged again. The job row is locked for the batch (FOR NO KEY
  UPDATE), so a reopen that races it waits for it and then sees the rows in the archive, or wins and the
  batch moves nothing;
- no result of the job is still live (unsent, in progress or reported): a late replica of a decided unit,
  or a known-answer copy of one of its units (copies belong to the copied job), would be judged against
  the unit's canonical result, which must still be in the hot table then. Known-answer copies are made
  only of units of jobs that ended less than half of IDLEGRID_ARCHIVE_AFTER_SECONDS ago
  (known_answers._pick_source), so no lease can make a copy of a unit being moved: it would have to last
  half the archive delay (days; seconds in the bench);
- the row itself is terminal and was created and reported before the cutoff, and no earning of it is
  still held: the ledger settles a held earning by joining its result (ledger/earnings.py), and it credits
  a valid result without an earning only within the audit window (earnings_sync), which has passed.

What keeps every reference valid. A row keeps its id. Earning.result and WorkUnit.canonical_result have no
database constraint (the foreign key would forbid the delete), so the ledger still names its result and the
unit its canonical one; the move is an INSERT and a DELETE in one transaction, so a row is in exactly one
of the two tables at every moment, and ledger_check proves that every earning's result is in one of them
and agrees with it (ledger/selectors._credits_traced). Readers of a finished job's history count both
tables in one statement (jobs/selectors.py, jobs/live.py: job progress and the verification panel), and
artifact collection counts an archived result's output as a reference (jobs/artifacts.py). The deletes
bypass Django's collector on purpose: it would set the units' canonical_result to NULL.

Safe to run twice and concurrently, with itself and with leases and reports: a batch locks the rows it
moves with SKIP LOCKED (PostgreSQL) and touches terminal rows only, which no lease or report updates; on
SQLite every transaction takes the write lock first (settings: transaction_mode IMMEDIATE), so batches
simply queue. A crash rolls its batch back whole.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TypedDict

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.ledger.models import Earning
from marketplace.workunits.models import Result, ResultArchive

log = logging.getLogger(__name__)

ENDED = (Job.State.COMPLETED, Job.State.FAILED, Job.State.CANCELLED)
LIVE = (Result.State.UNSENT, Result.State.IN_PROGRESS, Result.State.REPORTED)
TERMINAL = tuple(state for state in Result.State.values if state not in LIVE)


class ArchiveReport(TypedDict):
    moved: int
    jobs: int  # jobs some of whose results moved in this run
    batches: int


def archive_cutoff(*, now: datetime | None = None) -> datetime:
    """Rows and jobs older than this may move."""
    return (now or timezone.now()) - timedelta(seconds=settings.IDLEGRID_ARCHIVE_AFTER_SECONDS)


def _jobs_due(cutoff: datetime) -> QuerySet[Job]:
    return (Job.objects.filter(state__in=ENDED, finished_at__lt=cutoff)
            .filter(Q(reopened_at__isnull=True) | Q(reopened_at__lt=cutoff))
            .exclude(Exists(Result.objects.filter(job=OuterRef("pk"), state__in=LIVE))))


def _movable(job_id: int | OuterRef, cutoff: datetime) -> QuerySet[Result]:
    held = Earning.objects.filter(result_id=OuterRef("pk"), state=Earning.State.HELD)
    return (Result.objects.filter(Q(job=job_id), state__in=TERMINAL, created_at__lt=cutoff)
            .filter(Q(reported_at__isnull=True) | Q(reported_at__lt=cutoff)).exclude(Exists(held)))


def results_archive(*, now: datetime | None = None, batch: int | None = None,
                    batches: int | None = None) -> ArchiveReport:
    """Move the results of long-finished jobs to the archive, oldest job first: at most `batches`
    transactions of `batch` rows (settings IDLEGRID_ARCHIVE_BATCH and _BATCHES by default)."""
    batch = batch or settings.IDLEGRID_ARCHIVE_BATCH
    batches = batches or settings.IDLEGRID_ARCHIVE_BATCHES
    if not 1 <= batch <= 10_000 or not 1 <= batches <= 10_000:
        raise ValueError("batch and batches must be between 1 and 10000")
    now = now or timezone.now()
    cutoff = archive_cutoff(now=now)
    due = list(_jobs_due(cutoff).filter(Exists(_movable(OuterRef("pk"), cutoff)))
               .order_by("finished_at", "pk").values_list("pk", flat=True)[:batches])
    report: ArchiveReport = {"moved": 0, "jobs": 0, "batches": 0}
    for job_id in due:
        moved_here = 0
        while report["batches"] < batches:
            moved = _batch_move(job_id=job_id, cutoff=cutoff, size=batch, now=now)
            report["batches"] += 1
            moved_here += moved
            if moved < batch:
                break
        report["moved"] += moved_here
        report["jobs"] += moved_here > 0
        if report["batches"] >= batches:
            break
    if report["moved"]:
        log.info("archived %s results of %s jobs in %s batches", report["moved"], report["jobs"], report["batches"])
    return report


# Every column of the hot table, in the archive under the same name (test_archive checks that they match).
def _columns() -> list[str]:
    return [field.column for field in Result._meta.concrete_fields]


def _batch_move(*, job_id: int, cutoff: datetime, size: int, now: datetime) -> int:
    """One transaction: lock the job (still ended long ago, nothing live), lock up to `size` movable rows
    (skipping rows another archiver holds), copy them to the archive and delete them from the hot table."""
    with transaction.atomic():
        if not _jobs_due(cutoff).filter(pk=job_id).select_for_update(no_key=True).values_list("pk", flat=True):
            return 0
        ids = list(_movable(job_id, cutoff).select_for_update(skip_locked=True, of=("self",))
                   .order_by("pk").values_list("pk", flat=True)[:size])
        if not ids:
            return 0
        columns = ", ".join(connection.ops.quote_name(c) for c in _columns())
        marks = ", ".join(["%s"] * len(ids))
        archive, hot = ResultArchive._meta.db_table, Result._meta.db_table
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {archive} ({columns}, archived_at) "
                           f"SELECT {columns}, %s FROM {hot} WHERE id IN ({marks})", [now, *ids])
            copied = cursor.rowcount
            cursor.execute(f"DELETE FROM {hot} WHERE id IN ({marks})", ids)
            deleted = cursor.rowcount
        if copied != len(ids) or deleted != len(ids):  # the rows are locked: this is a bug, never a race
            raise RuntimeError(f"archive of job {job_id}: {len(ids)} rows locked, {copied} copied, {deleted} deleted")
    return len(ids)
