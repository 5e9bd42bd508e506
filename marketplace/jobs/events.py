"""What a job's webhook events say (docs/api/webhooks.md, "Events"), and the throttle of job.progress.

The job's use cases call these where the state moves (services.job_split, lifecycle.job_complete and
job_fail, rounds.round_aggregate, and verification._accept for progress), inside their transactions: the
event exists if and only if the move committed. Payloads are built only when the owner has an endpoint that
listens (webhooks.services.event_emit takes a function), so a person without webhooks pays one query.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, Q

from marketplace.jobs.models import FedRound, Job
from marketplace.webhooks import catalog
from marketplace.webhooks.services import event_emit, owners_listening
from marketplace.workunits.models import WorkUnit


def _units(job: Job) -> dict[str, int]:
    counts = WorkUnit.objects.filter(job=job, known_answer_of__isnull=True).aggregate(
        done=Count("pk", filter=Q(state=WorkUnit.State.DONE)), error=Count("pk", filter=Q(state=WorkUnit.State.ERROR)))
    return {"units_total": job.units_total, "units_done": counts["done"], "units_error": counts["error"]}


def job_data(job: Job) -> dict[str, Any]:
    units = _units(job)
    return {"job": {
        "id": job.pk, "kind": job.kind, "state": job.state, **units,
        "fraction_done": round(units["units_done"] / units["units_total"], 4) if units["units_total"] else 0.0,
        "output_sha256": job.output_id, "error": job.error, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at,
    }}


def job_event(*, job_id: int, type: str) -> None:
    """job.started, job.completed, job.failed (or job.cancelled): the job as it is now, in the caller's
    transaction."""
    job = Job.objects.get(pk=job_id)
    event_emit(owner_id=job.owner_id, type=type, data=lambda: job_data(job))


def job_round_event(*, job_id: int, round_id: int, last: bool) -> None:
    job = Job.objects.get(pk=job_id)

    def data() -> dict[str, Any]:
        fed = FedRound.objects.get(pk=round_id)
        return {**job_data(job), "round": {
            "index": fed.index, "rounds_planned": job.spec["rounds"], "last": last, "updates": len(fed.updates),
            "samples": fed.samples, "train_loss": fed.train_loss, "eval_loss": fed.eval_loss,
            "eval_accuracy": fed.eval_accuracy, "weights_sha256": fed.weights_out_id}}

    event_emit(owner_id=job.owner_id, type=catalog.JOB_ROUND_COMPLETED, data=data)


def job_progress(*, job_id: int, owner_id: int) -> None:
    """A unit of the job was decided: job.progress, at most once per IDLEGRID_WEBHOOKS_PROGRESS_SECONDS per
    job and only if more units are decided than the last one said. On the hot path of validation: the
    throttle is one cache operation, and only a call that passes it reads the database (one query when the
    owner has no endpoint listening)."""
    if not cache.add(f"webhooks:progress:{job_id}", 1, timeout=settings.IDLEGRID_WEBHOOKS_PROGRESS_SECONDS):
        return
    if not owners_listening(type=catalog.JOB_PROGRESS, among=[owner_id]):
        return
    last_key = f"webhooks:progress-done:{job_id}"
    data = job_data(Job.objects.get(pk=job_id))
    done = data["job"]["units_done"]
    if cache.get(last_key) == done:
        return
    if event_emit(owner_id=owner_id, type=catalog.JOB_PROGRESS, data=data) is not None:
        cache.set(last_key, done, timeout=86_400)
