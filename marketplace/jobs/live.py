"""What a job's page shows, read from the database each time it is polled: progress, speed and ETA, the
progress-over-time series, a federated job's rounds, its cost against its escrow, corrections, and the
verification panel (who computed it, where replicas disagreed, how many replicas were issued).

Every read is bounded by the job's own rows: one aggregate per figure, and the progress series is at most
SERIES_POINTS points however many units the job has (sampled from the finish times of its decided units).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any, TypedDict

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Exists, F, OuterRef, Q, Sum, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from marketplace.artifacts.models import Artifact
from marketplace.core.exceptions import Conflict
from marketplace.jobs.models import Job
from marketplace.jobs.selectors import COMPUTED, job_get_for_owner, job_progress, job_rounds
from marketplace.ledger.statements import job_costs
from marketplace.workunits.models import Result, ResultArchive, WorkUnit

FINAL = (Job.State.COMPLETED, Job.State.FAILED, Job.State.CANCELLED)
SERIES_POINTS = 200
SPEED_WINDOW = timedelta(minutes=5)  # throughput: units decided over the last few minutes of work
ISSUED = (Result.State.IN_PROGRESS, *COMPUTED, Result.State.EXPIRED, Result.State.CLIENT_ERROR,
          Result.State.RELEASED)  # replicas that went to a device (unsent and cancelled ones never did)


class Verification(TypedDict):
    devices: int
    owners: int
    replicas_issued: int
    replicas_extra: int  # issued beyond units x quorum: disagreements, expired leases, audits
    units_disputed: int  # units where at least one result disagreed with the decision
    results_invalid: int
    audits: int
    accepted_alone: int  # accepted on a trusted device's word (audited at random)


def job_live(*, job: Job, now: datetime | None = None) -> dict[str, Any]:
    """Everything the job page's live fragment shows."""
    now = now or timezone.now()
    progress = job_progress(job=job)
    total, done = progress["units_total"], progress["units_done"]
    speed = _units_per_minute(job, now)
    remaining = max(0, total - done - progress["units_error"])
    final = job.state in FINAL
    # Units being computed count for the fraction their devices reported (never past the undecided ones).
    partial = 0.0 if final else min(progress["units_in_progress"], remaining)
    eta = None if final or not remaining or not speed else math.ceil(60 * (remaining - partial) / speed)
    live = {
        "job": job,
        "progress": progress,
        "fraction": min(1.0, (done + partial) / total) if total else (1.0 if job.state == Job.State.COMPLETED else 0.0),
        "final": final,
        "units_per_minute": speed,
        "eta_seconds": eta,
        "eta_reason": _eta_reason(job, final=final, remaining=remaining, speed=speed),
        "series": progress_series(job=job),
        "costs": job_costs(job_id=job.pk),
        "verification": job_verification(job=job),
        "has_output": job.output_id is not None and job.state in (Job.State.COMPLETED, Job.State.CANCELLED),
        "rounds": None,
    }
    if job.kind == Job.Kind.FEDAVG and "rounds" in job.spec:
        rounds = job_rounds(job=job)
        live["rounds"] = {**rounds, "series": _round_series(rounds["rounds"])}
    return live


def _units_per_minute(job: Job, now: datetime) -> float | None:
    """Units decided per minute over the job's latest SPEED_WINDOW of work (since it started, if later)."""
    if job.started_at is None:
        return None
    end = job.finished_at or now
    since = max(job.started_at, end - SPEED_WINDOW)
    decided = WorkUnit.objects.filter(job=job, known_answer_of__isnull=True, state=WorkUnit.State.DONE,
                                      finished_at__gt=since, finished_at__lte=end).count()
    minutes = (end - since).total_seconds() / 60
    return round(decided / minutes, 2) if decided and minutes > 0 else None


def _eta_reason(job: Job, *, final: bool, remaining: int, speed: float | None) -> str | None:
    if final:
        return f"the job is {job.state}"
    if job.state == Job.State.PENDING:
        return "the job is being split into units"
    if job.state == Job.State.CANCELLING:
        return "the job is being cancelled"
    if not remaining:
        return "every unit is decided; the output is being merged"
    if not speed:
        return "no unit has been decided yet"
    return None


def progress_series(*, job: Job) -> dict[str, Any]:
    """Units decided over time, for a chart: x in unix seconds, at most SERIES_POINTS points. The database
    samples every step-th finish time (a window function): a poll of a 100,000-unit job reads SERIES_POINTS
    rows, not 100,000."""
    decided = WorkUnit.objects.filter(job=job, known_answer_of__isnull=True, state=WorkUnit.State.DONE,
                                      finished_at__isnull=False)
    total = decided.count()
    x: list[int] = []
    values: list[int] = []
    if job.started_at is not None and total:  # a lone start point draws axes around nothing
        x.append(int(job.started_at.timestamp()))
        values.append(0)
    step = max(1, math.ceil(total / SERIES_POINTS))
    sampled = (decided.annotate(count=Window(RowNumber(), order_by=[F("finished_at").asc(), F("pk").asc()]))
               .annotate(offset=F("count") % step).filter(Q(offset=0) | Q(count=total))
               .order_by("finished_at", "pk").values_list("count", "finished_at"))
    for count, moment in sampled:
        second = int(moment.timestamp())
        if x and x[-1] >= second:  # one point per second: the chart's x must strictly increase
            values[-1] = count
        else:
            x.append(second)
            values.append(count)
    return {"x": x, "x_time": True, "y": "units decided", "series": [{"label": "units decided", "values": values}]}


def _round_series(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "x": [r["round"] for r in rounds], "x_time": False, "x_label": "round", "y": "accuracy", "y2": "loss",
        "series": [
            {"label": "eval accuracy", "values": [r["eval_accuracy"] for r in rounds]},
            {"label": "eval loss", "values": [r["eval_loss"] for r in rounds], "scale": "y2"},
            {"label": "train loss", "values": [r["train_loss"] for r in rounds], "scale": "y2"},
        ],
    }


def job_verification(*, job: Job) -> Verification:
    """Who computed the job and what checking it cost: distinct devices and owners of its computed results,
    disagreements, replicas issued beyond the quorum, audits, results accepted alone."""
    # A finished job's results may have moved to the archive (workunits/archive.py), some or all of them:
    # every figure reads both tables, each in one statement.
    tables = [model.objects.filter(job=job, unit__known_answer_of__isnull=True) for model in (Result, ResultArchive)]
    hot, archived = tables
    figures = {"issued": 0, "invalid": 0, "alone": 0}
    for table in tables:
        for name, count in table.aggregate(
            issued=Count("pk", filter=Q(state__in=ISSUED)),
            invalid=Count("pk", filter=Q(state=Result.State.INVALID)),
            alone=Count("pk", filter=Q(accepted_alone=True, state=Result.State.VALID)),
        ).items():
            figures[name] += count
    units = WorkUnit.objects.filter(job=job, known_answer_of__isnull=True)
    disputed = units.filter(Exists(hot.filter(unit=OuterRef("pk"), state=Result.State.INVALID))
                            | Exists(archived.filter(unit=OuterRef("pk"), state=Result.State.INVALID))).count()
    # a unit decided by replicas needed its quorum of them; one accepted on a trusted device's word, one
    alone = [table.filter(pk=OuterRef("canonical_result_id"), accepted_alone=True) for table in tables]
    by_quorum = units.filter(state=WorkUnit.State.DONE).exclude(Exists(alone[0])).exclude(Exists(alone[1]))
    expected = int(by_quorum.aggregate(n=Sum(F("quorum")))["n"] or 0) + figures["alone"]
    computed = [table.filter(state__in=COMPUTED) for table in tables]
    return {
        "devices": computed[0].values("device_id").union(computed[1].values("device_id")).count(),
        "owners": computed[0].values("owner_id").union(computed[1].values("owner_id")).count(),
        "replicas_issued": figures["issued"],
        "replicas_extra": max(0, figures["issued"] - expected),
        "units_disputed": disputed,
        "results_invalid": figures["invalid"],
        "audits": units.filter(audit=True).count(),
        "accepted_alone": figures["alone"],
    }


def job_output_for_owner(*, job_id: int, owner: AbstractBaseUser) -> tuple[Job, Artifact]:
    """The owner's job and its output (merged, or a cancelled job's partial one), as the API gives it:
    404 for someone else's job, 409 while there is none."""
    job = job_get_for_owner(job_id=job_id, owner=owner)
    if job.state == Job.State.CANCELLED and job.output is None:
        raise Conflict(f"job {job.pk} was cancelled before anything was decided; it has no output")
    if job.state not in (Job.State.COMPLETED, Job.State.CANCELLED) or job.output is None:
        raise Conflict(f"job {job.pk} is {job.state}; its output exists once it is completed (or cancelled)")
    return job, job.output
