from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Exists, FloatField, Max, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from marketplace.artifacts.models import Artifact
from marketplace.core.exceptions import NotFound
from marketplace.jobs.models import FedRound, Job
from marketplace.jobs.rounds import round_current
from marketplace.workers.models import Device
from marketplace.workunits.models import Result, ResultArchive, WorkUnit
from marketplace.workunits.requirements import Requirements, devices_able, not_runnable_sentence

COMPUTED = (Result.State.VALID, Result.State.INVALID, Result.State.REPORTED)


def job_get_for_owner(*, job_id: int, owner: AbstractBaseUser) -> Job:
    job = Job.objects.filter(pk=job_id, owner=owner).first()
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def job_progress(*, job: Job) -> dict:
    units = WorkUnit.objects.filter(job=job, known_answer_of__isnull=True).aggregate(
        done=Count("pk", filter=Q(state=WorkUnit.State.DONE)), error=Count("pk", filter=Q(state=WorkUnit.State.ERROR))
    )
    results = Job.objects.filter(pk=job.pk).annotate(**_result_counts(job.pk)).values(*RESULT_COUNTS).get()
    decided = units["done"]
    return {
        "units_total": job.units_total,
        "units_done": decided,
        "units_in_progress": units_in_progress(job=job),
        "units_error": units["error"],
        "results_valid": results["results_valid"],
        "results_invalid": results["results_invalid"],
        # verification cost: results computed per decided unit
        "results_per_unit": round(results["results_computed"] / decided, 4) if decided else None,
    }


def job_runnable(*, job: Job) -> dict:
    """Whether any online device can run what this running job has waiting: `runnable_devices`, the devices
    online now whose last reported capabilities fit its largest unsent replica (None when nothing waits),
    and the reason when none can. Two aggregate queries: the job's unsent replicas (index job, state) and
    the online devices."""
    waiting = Result.objects.filter(job=job, state=Result.State.UNSENT).aggregate(
        memory=Max("need_memory_mb"), gpu=Max("need_gpu_mb"), kind=Max("kind"))
    if job.state != Job.State.RUNNING or waiting["memory"] is None:
        return {"runnable_devices": None, "not_runnable_reason": None}
    gpu = waiting["gpu"] or 0
    needs = Requirements(memory_mb=waiting["memory"], device="cuda" if gpu else "cpu", gpu_memory_mb=gpu,
                         kind=waiting["kind"] or job.kind)
    online = timezone.now() - timedelta(seconds=settings.IDLEGRID_DEVICE_ONLINE_SECONDS)
    able = Device.objects.filter(devices_able(needs), state=Device.State.ACTIVE, last_seen_at__gte=online).count()
    return {"runnable_devices": able, "not_runnable_reason": None if able else not_runnable_sentence(needs)}


def units_in_progress(*, job: Job) -> float:
    """How much of the job's undecided units is computed, in units: for each, the fraction done of its
    furthest replica now computing, as its device last said in a heartbeat (Result.progress), summed.
    A device's word, so it moves a progress bar and an ETA, never money or verification. One query."""
    total = _furthest_replicas(job.pk).aggregate(total=Sum("progress"))["total"]
    return round(float(total or 0.0), 4)


def _furthest_replicas(job: int | OuterRef) -> QuerySet:
    """The job's replicas being computed that have said how far they are, the furthest one per undecided
    unit (ties to the oldest row): written without a nested aggregate so that a list can annotate it."""
    computing = Result.objects.filter(
        state=Result.State.IN_PROGRESS, progress__isnull=False, unit__known_answer_of__isnull=True
    ).exclude(unit__state__in=(WorkUnit.State.DONE, WorkUnit.State.ERROR))
    further = computing.filter(unit=OuterRef("unit")).filter(
        Q(progress__gt=OuterRef("progress")) | Q(progress=OuterRef("progress"), pk__lt=OuterRef("pk"))
    )
    return computing.filter(job=job).filter(~Exists(further))


def job_rounds(*, job: Job) -> dict:
    """A federated job's aggregated rounds, oldest first, and where the round in training stands."""
    rounds = [
        {"round": r.index, "weights_in_sha256": r.weights_in_id, "weights_sha256": r.weights_out_id,
         "updates": len(r.updates), "result_ids": r.updates, "samples": r.samples, "train_loss": r.train_loss,
         "eval_loss": r.eval_loss, "eval_accuracy": r.eval_accuracy, "aggregated_at": r.created_at}
        for r in FedRound.objects.filter(job=job).order_by("index")
    ]
    training = None
    if job.state in (Job.State.RUNNING, Job.State.MERGING) and job.units_total:
        index, shards = round_current(job=job), job.spec["shards"]
        if not rounds or rounds[-1]["round"] < index:
            done = WorkUnit.objects.filter(
                job=job, known_answer_of__isnull=True, index__gte=index * shards, index__lt=(index + 1) * shards,
                state=WorkUnit.State.DONE,
            ).count()
            training = {"round": index, "units_done": done, "units_total": shards}
    return {"rounds_planned": job.spec["rounds"], "rounds": rounds, "training": training,
            "privacy": job.spec.get("dp"), "target": job.spec.get("target")}


def artifact_get_for_user(*, sha256: str, user: AbstractBaseUser) -> Artifact:
    """An artifact the user uploaded or that is the output of one of their jobs."""
    artifact = Artifact.objects.filter(sha256=sha256).first()
    if artifact is None:
        raise NotFound(f"no artifact {sha256}")
    if artifact.owners.filter(pk=user.pk).exists() or Job.objects.filter(owner=user, output=artifact).exists():
        return artifact
    raise NotFound(f"no artifact {sha256}")  # do not reveal that someone else's artifact exists


def jobs_for_owner(*, owner: AbstractBaseUser) -> QuerySet[Job]:
    """The person's jobs with what job_progress counts, annotated: a page of them costs one query."""
    units = WorkUnit.objects.filter(job=OuterRef("pk"), known_answer_of__isnull=True)
    return Job.objects.filter(owner=owner).annotate(
        units_done=_count(units.filter(state=WorkUnit.State.DONE)),
        units_error=_count(units.filter(state=WorkUnit.State.ERROR)),
        **_result_counts(OuterRef("pk")),
        units_in_progress=Coalesce(
            Subquery(_furthest_replicas(OuterRef("pk")).order_by().values("job").annotate(s=Sum("progress"))
                     .values("s")[:1]),
            Value(0.0), output_field=FloatField(),
        ),
    )


def job_progress_annotated(*, job: Job) -> dict:
    """job_progress's figures, read from a row of jobs_for_owner."""
    done = job.units_done
    return {"units_total": job.units_total, "units_done": done,
            "units_in_progress": round(float(job.units_in_progress), 4), "units_error": job.units_error,
            "results_valid": job.results_valid, "results_invalid": job.results_invalid,
            "results_per_unit": round(job.results_computed / done, 4) if done else None}


def _count(rows: QuerySet) -> Subquery:
    return Coalesce(Subquery(rows.order_by().values("job").annotate(n=Count("pk")).values("n")[:1]), 0)


RESULT_COUNTS = ("results_valid", "results_invalid", "results_computed")


def _result_counts(job: int | OuterRef) -> dict[str, Any]:
    """The job's valid, invalid and computed results (known-answer copies left out) as annotations of a Job
    row: each a count in the hot table plus one in the archive, where a finished job's results move
    (workunits/archive.py), in the one statement, so a batch moving between the two is never counted
    twice or missed."""
    conditions = {"results_valid": Q(state=Result.State.VALID), "results_invalid": Q(state=Result.State.INVALID),
                  "results_computed": Q(state__in=COMPUTED)}
    hot = Result.objects.filter(job=job, unit__known_answer_of__isnull=True)
    archived = ResultArchive.objects.filter(job=job, unit__known_answer_of__isnull=True)
    return {name: _count(hot.filter(condition)) + _count(archived.filter(condition))
            for name, condition in conditions.items()}


def artifacts_for_owner(*, owner: AbstractBaseUser) -> QuerySet:
    """The person's holdings: rows of Artifact.owners' through table (with the artifact), so that a list
    pages by the row's id, in the order the person came to hold them, newest first."""
    return Artifact.owners.through.objects.filter(user=owner).select_related("artifact")
