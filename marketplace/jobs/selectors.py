from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Q

from marketplace.core.exceptions import NotFound
from marketplace.jobs.models import Job
from marketplace.workunits.models import Result, WorkUnit


def job_get_for_owner(*, job_id: int, owner: AbstractBaseUser) -> Job:
    job = Job.objects.filter(pk=job_id, owner=owner).first()
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def job_progress(*, job: Job) -> dict:
    units = WorkUnit.objects.filter(job=job, known_answer_of__isnull=True).aggregate(
        done=Count("pk", filter=Q(state=WorkUnit.State.DONE)), error=Count("pk", filter=Q(state=WorkUnit.State.ERROR))
    )
    results = Result.objects.filter(job=job, unit__known_answer_of__isnull=True).aggregate(
        valid=Count("pk", filter=Q(state=Result.State.VALID)),
        invalid=Count("pk", filter=Q(state=Result.State.INVALID)),
        computed=Count("pk", filter=Q(state__in=(Result.State.VALID, Result.State.INVALID, Result.State.REPORTED))),
    )
    decided = units["done"]
    return {
        "units_total": job.units_total,
        "units_done": decided,
        "units_error": units["error"],
        "results_valid": results["valid"],
        "results_invalid": results["invalid"],
        # verification cost: results computed per decided unit
        "results_per_unit": round(results["computed"] / decided, 4) if decided else None,
    }
