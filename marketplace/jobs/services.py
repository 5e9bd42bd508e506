"""A job's use cases: submit (validated, escrowed), split into signed units, merge the decided outputs.

State moves caused by units (fail, merge when done, reopen, complete) are in jobs/lifecycle.py; a federated
job's rounds in jobs/rounds.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from marketplace.artifacts.services import artifact_store
from marketplace.artifacts.storage import get_storage
from marketplace.core.tasks import enqueue_on_commit
from marketplace.core.tensors import write_single
from marketplace.jobs.events import job_event
from marketplace.jobs.kinds import kind_module
from marketplace.jobs.lifecycle import job_complete, job_merge_if_done
from marketplace.jobs.models import Job
from marketplace.jobs.rounds import round_aggregate
from marketplace.ledger.escrow import escrow_amount, job_escrow_fund, job_price_take
from marketplace.webhooks import catalog
from marketplace.workunits.creation import units_create
from marketplace.workunits.models import WorkUnit

log = logging.getLogger(__name__)
# Units per committed chunk of a split: each chunk's transaction holds the job row and its new rows for
# a fraction of a second (bench/pipeline.py prints the longest hold).
SPLIT_CHUNK = 2000
MERGE_PAGE = 2000  # units read per query by a merge


def job_submit(*, owner: AbstractBaseUser, kind: Any, spec: Any) -> Job:
    """Validate a job completely, then create it; splitting happens in a task after commit."""
    spec, price = job_price_take(spec)  # the ledger's part of the spec, whatever the kind
    module = kind_module(kind)
    normal = {**module.validate_spec(spec, owner=owner), "price_per_result": price}
    with transaction.atomic(durable=True):  # the job and its escrow commit together, or neither
        job = Job.objects.create(owner=owner, kind=kind, spec=normal)
        job_escrow_fund(job=job, amount=escrow_amount(kind_module=module, spec=normal))
        enqueue_on_commit("jobs.split", job.pk)
    log.info("job %s submitted by %s: %s rows", job.pk, owner, normal.get("rows"))
    return job


def job_split(*, job_id: int) -> int:
    """Create the job's units and their first replicas, SPLIT_CHUNK units per transaction, each committed on
    its own: no lock is held for the whole split (a 100,000-unit job is ~50 chunks of a fraction of a
    second), and a crash midway loses only the chunk in flight. Returns the units this call made.

    Made leasable progressively and consistently: a unit is visible only with its inputs, its signature and
    its replicas (one chunk's transaction), the job is `running` from its first chunk, and `splitting` keeps
    it from merging until the last chunk committed (lifecycle.job_merge_if_done). Resumable and safe to run
    twice, even at once: each chunk locks the job row and starts after the last unit made (the highest
    index); a job that stopped meanwhile (cancelled, failed) is split no further."""
    job = Job.objects.get(pk=job_id)
    if not _splittable(job):
        return 0
    plans = kind_module(job.kind).plan_units(job.spec)
    planned = made = 0  # plans drawn from the generator; units this call made
    while True:
        with transaction.atomic():
            locked = Job.objects.select_for_update().filter(pk=job_id).first()
            if locked is None or not _splittable(locked):
                return made
            start = _units_made(job_id)
            if start < planned:
                raise RuntimeError(f"job {job_id}: {planned - start} of the units this split made are gone")
            for _ in zip(range(start - planned), plans):  # made before (a crash, a concurrent split): skipped
                pass
            batch = [plan for _, plan in zip(range(SPLIT_CHUNK), plans)]
            planned = start + len(batch)
            units_create(job=locked, plans=batch)
            made += len(batch)
            last = len(batch) < SPLIT_CHUNK
            Job.objects.filter(pk=job_id).update(state=Job.State.RUNNING, units_total=planned, splitting=not last,
                                                 started_at=locked.started_at or timezone.now())
            if locked.state == Job.State.PENDING:
                job_event(job_id=job_id, type=catalog.JOB_STARTED)
            if last:
                job_merge_if_done(job_id=job_id)  # every unit may have been decided while the split went on
                log.info("job %s split into %s units", job_id, planned)
                return made


def _splittable(job: Job) -> bool:
    return job.state == Job.State.PENDING or (job.state == Job.State.RUNNING and job.splitting)


def _units_made(job_id: int) -> int:
    """How many of the job's units exist: units are made in index order, so the highest index + 1."""
    top = WorkUnit.objects.filter(job_id=job_id, known_answer_of__isnull=True).aggregate(top=Max("index"))["top"]
    return 0 if top is None else top + 1


def job_merge(*, job_id: int) -> Job:
    """Concatenate the canonical outputs in unit order into one artifact, streamed: the units are read a
    page at a time and each output's bytes go straight to the file being stored, so memory stays bounded
    whatever the job's size (bench/pipeline.py measures the peak). Safe to run twice: the artifact is
    content-addressed and only one conditional UPDATE completes the job."""
    job = Job.objects.get(pk=job_id)
    if job.state != Job.State.MERGING:
        return job
    kind, storage = kind_module(job.kind), get_storage()
    if getattr(kind, "ROUNDS", False):  # a round ends: aggregate it, then the next round or the end
        return round_aggregate(job_id=job_id)

    def chunks() -> Iterator[bytes]:
        for sha, hidden in _canonical_outputs(job_id):
            with storage.local_path(sha) as path:
                yield from kind.output_rows_bytes(path, hidden_rows=hidden)

    shape = kind.merged_shape(job.spec)
    artifact, _ = artifact_store(
        chunks=write_single(chunks(), name=kind.OUTPUT_NAME, dtype="F32", shape=shape),
        uploaded_by=job.owner,
        max_bytes=2**62,
    )
    job_complete(job_id=job_id, output_id=artifact.sha256)
    log.info("job %s completed: output %s", job_id, artifact.sha256)
    job.refresh_from_db()
    return job


def _canonical_outputs(job_id: int) -> Iterator[tuple[str, list[list[int]]]]:
    """(canonical output, hidden rows) of the job's units in index order, MERGE_PAGE units per query (by
    index, not a server-side cursor: those do not survive a transaction-pooling PgBouncer)."""
    after = -1
    while page := list(
        WorkUnit.objects.filter(job_id=job_id, known_answer_of__isnull=True, index__gt=after)
        .order_by("index").values_list("index", "canonical_result__output_id", "hidden_rows")[:MERGE_PAGE]
    ):
        for _, sha, hidden in page:
            yield sha, hidden
        after = page[-1][0]
