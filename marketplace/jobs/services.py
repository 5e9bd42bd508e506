from __future__ import annotations

import logging
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from marketplace.artifacts.services import artifact_store
from marketplace.artifacts.storage import get_storage
from marketplace.core.signing import keyring
from marketplace.core.tensors import write_single
from marketplace.jobs.kinds import kind_module
from marketplace.jobs.models import Job
from marketplace.ledger import hooks as ledger_hooks
from marketplace.workunits.models import Result, WorkUnit
from worker_agent.protocol import unit_message

log = logging.getLogger(__name__)
UNIT_BATCH = 500


def job_submit(*, owner: AbstractBaseUser, kind: Any, spec: Any) -> Job:
    """Validate a job completely, then create it; splitting happens in a task after commit."""
    from marketplace.jobs.tasks import split_job
    from marketplace.ledger.services import escrow_amount, job_escrow_fund, job_price_take

    spec, price = job_price_take(spec)  # the ledger's part of the spec, whatever the kind
    module = kind_module(kind)
    normal = {**module.validate_spec(spec, owner=owner), "price_per_result": price}
    with transaction.atomic(durable=True):  # the job and its escrow commit together, or neither
        job = Job.objects.create(owner=owner, kind=kind, spec=normal)
        job_escrow_fund(job=job, amount=escrow_amount(kind_module=module, spec=normal))
        split_job.delay_on_commit(job.pk)
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
            _create_units(job, batch)
            count += len(batch)
        Job.objects.filter(pk=job_id, state=Job.State.PENDING).update(
            state=Job.State.RUNNING, units_total=count, started_at=timezone.now()
        )
    log.info("job %s split into %s units", job_id, count)
    return count


def _create_units(job: Job, plans: list) -> None:
    quorum, cap = job.spec["quorum"], job.spec["max_results_per_unit"]
    # Adaptive: one replica now; the first lease decides how many more (marketplace/workers/trust.py).
    adaptive = job.spec.get("adaptive", False)
    first = 1 if adaptive else quorum
    units, inputs = [], []
    for plan in plans:
        weights = plan.payload["model"]["weights"]  # a fedavg round trains its own global weights
        shas = [artifact_store(chunks=[data], uploaded_by=job.owner)[0].sha256 for data in plan.inputs]
        plan.payload["inputs"] = dict(zip(plan.payload["inputs"], shas))
        units.append(
            WorkUnit(job=job, index=plan.index, payload=plan.payload, quorum=quorum, max_results=cap,
                     results_created=first, replication_decided=not adaptive, hidden_rows=plan.hidden_rows)
        )
        inputs.append([weights, *shas])
    WorkUnit.objects.bulk_create(units)
    _sign_units(units)
    through = WorkUnit.inputs.through
    through.objects.bulk_create(
        [through(workunit_id=unit.pk, artifact_id=sha) for unit, shas in zip(units, inputs) for sha in shas]
    )
    Result.objects.bulk_create([Result(unit_id=unit.pk, job_id=job.pk) for unit in units for _ in range(first)])


def _sign_units(units: list[WorkUnit]) -> None:
    """The signature covers the unit id, which exists only after the insert: sign, then one bulk UPDATE."""
    ring = keyring()
    for unit in units:
        unit.signing_key_id, unit.signature = ring.sign(unit_message(unit_id=unit.pk, payload=unit.payload))
    WorkUnit.objects.bulk_update(units, ["signature", "signing_key_id"])


def job_merge_if_done(*, job_id: int) -> None:
    """Called when a unit is decided: if none is left pending, move the job to merging (once) and merge."""
    from marketplace.jobs.tasks import merge_job

    if WorkUnit.objects.filter(job_id=job_id, known_answer_of__isnull=True).exclude(state=WorkUnit.State.DONE).exists():
        return
    if Job.objects.filter(pk=job_id, state=Job.State.RUNNING).update(state=Job.State.MERGING):
        merge_job.delay_on_commit(job_id)


def job_merge(*, job_id: int) -> Job:
    """Concatenate the canonical outputs in unit order into one artifact, streamed. Safe to run twice:
    the artifact is content-addressed and only one conditional UPDATE completes the job."""
    job = Job.objects.get(pk=job_id)
    if job.state != Job.State.MERGING:
        return job
    kind, storage = kind_module(job.kind), get_storage()
    if getattr(kind, "ROUNDS", False):  # a round ends: aggregate it, then the next round or the end
        from marketplace.jobs.rounds import round_aggregate

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
    if Job.objects.filter(pk=job_id, state=Job.State.MERGING).update(
        state=Job.State.COMPLETED, output=artifact, finished_at=timezone.now()
    ):
        ledger_hooks.job_ended(job_id)  # unused escrow back to the submitter
    log.info("job %s completed: output %s", job_id, artifact.sha256)
    job.refresh_from_db()
    return job


def job_fail(*, job_id: int, reason: str) -> bool:
    failed = Job.objects.filter(pk=job_id, state__in=(Job.State.PENDING, Job.State.RUNNING, Job.State.MERGING)).update(
        state=Job.State.FAILED, error=reason, finished_at=timezone.now()
    )
    if failed:
        Result.objects.filter(job_id=job_id, state=Result.State.UNSENT).update(state=Result.State.CANCELLED)
        ledger_hooks.job_ended(job_id)
        log.warning("job %s failed: %s", job_id, reason)
    return bool(failed)
