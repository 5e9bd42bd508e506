"""A job's use cases: submit (validated, escrowed), split into signed units, merge the decided outputs.

State moves caused by units (fail, merge when done, reopen, complete) are in jobs/lifecycle.py; a federated
job's rounds in jobs/rounds.py."""

from __future__ import annotations

import logging
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from marketplace.artifacts.services import artifact_store
from marketplace.artifacts.storage import get_storage
from marketplace.core.tasks import enqueue_on_commit
from marketplace.core.tensors import write_single
from marketplace.jobs.events import job_event
from marketplace.jobs.kinds import kind_module
from marketplace.jobs.lifecycle import job_complete
from marketplace.jobs.models import Job
from marketplace.jobs.rounds import round_aggregate
from marketplace.ledger.escrow import escrow_amount, job_escrow_fund, job_price_take
from marketplace.webhooks import catalog
from marketplace.workunits.creation import units_create
from marketplace.workunits.models import WorkUnit

log = logging.getLogger(__name__)
UNIT_BATCH = 500


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
    """Create the job's units and their first replicas. Idempotent: a job leaves `pending` once."""
    job = Job.objects.get(pk=job_id)
    if job.state != Job.State.PENDING:
        return 0
    kind = kind_module(job.kind)
    with transaction.atomic():
        if not Job.objects.select_for_update().filter(pk=job_id, state=Job.State.PENDING).exists():
            return 0
        WorkUnit.objects.filter(job=job).delete()  # a split that crashed half-way left nothing committed; be sure
        count = 0
        plans = kind.plan_units(job.spec)
        while batch := [plan for _, plan in zip(range(UNIT_BATCH), plans)]:
            units_create(job=job, plans=batch)
            count += len(batch)
        Job.objects.filter(pk=job_id, state=Job.State.PENDING).update(
            state=Job.State.RUNNING, units_total=count, started_at=timezone.now()
        )
        job_event(job_id=job_id, type=catalog.JOB_STARTED)
    log.info("job %s split into %s units", job_id, count)
    return count


def job_merge(*, job_id: int) -> Job:
    """Concatenate the canonical outputs in unit order into one artifact, streamed. Safe to run twice:
    the artifact is content-addressed and only one conditional UPDATE completes the job."""
    job = Job.objects.get(pk=job_id)
    if job.state != Job.State.MERGING:
        return job
    kind, storage = kind_module(job.kind), get_storage()
    if getattr(kind, "ROUNDS", False):  # a round ends: aggregate it, then the next round or the end
        return round_aggregate(job_id=job_id)
    outputs = list(
        WorkUnit.objects.filter(job=job, known_answer_of__isnull=True)
        .order_by("index")
        .values_list("canonical_result__output_id", "hidden_rows")
    )

    def chunks():
        for sha, hidden in outputs:
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
