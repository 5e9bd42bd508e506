"""Artifacts as the jobs that use them see them: what a person's live jobs use, deleting one, and
collecting what nothing references any more.

An artifact is referenced (and kept) while any of these holds:
- a person holds it (Artifact.owners): what they uploaded, their jobs' outputs and federated rounds;
- a row names it: Job.output, FedRound.weights_in / weights_out, Result.output, ResultArchive.output
  (PROTECTed foreign keys) or WorkUnit.inputs. Units and results are never deleted (a finished job's
  results move to the archive table with their output: workunits/archive.py), so their inputs and
  outputs are kept for good: a ban can reopen a decided unit and re-merge the job (workunits/reverify.py), a known-answer
  copy can be made of any decided unit (workunits/known_answers.py), and the outputs that lost a
  quorum are the evidence a dispute or a later re-verification reads. Collecting them would need
  a rule for when no audit can reach them any more; none is written down yet, so they stay;
- a job's spec names it (model weights, datasets, known answers, an eval dataset) and the job has not
  ended or ended less than IDLEGRID_AUDIT_WINDOW_SECONDS ago (a ban within the window reopens it, and a
  federated job's re-aggregation reads its eval dataset again);
- it was stored less than IDLEGRID_ARTIFACT_GC_GRACE_SECONDS ago (a device's output waiting for its
  report, bytes uploaded for a job about to be submitted).
What is left is collected: outputs a device uploaded and never reported (a killed agent, a refused
report), and bytes every holder deleted once no job needs them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection, Iterator
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Exists, Model, OuterRef, Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from marketplace.artifacts.models import Artifact
from marketplace.artifacts.services import artifact_disown, artifact_remove
from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import Conflict, NotFound
from marketplace.jobs.models import FedRound, Job
from marketplace.workunits.models import Result, ResultArchive, WorkUnit
from worker_agent.protocol import is_sha256_hex

log = logging.getLogger(__name__)

LIVE = (Job.State.PENDING, Job.State.RUNNING, Job.State.MERGING)
COLLECT_BATCH = 1000  # per run: the next run (hourly) goes on where this one stopped
TEMP_FILE_MAX_AGE = 3600  # seconds without a write: the upload (or local copy) staging it is dead
MAX_SPEC_DEPTH = 32


class ArtifactInUse(Conflict):
    code = "artifact_in_use"


def spec_artifacts(spec: Any, depth: int = 0) -> Iterator[str]:
    """Every sha256 a spec names, wherever the kind puts it (specs are small and validated at submission)."""
    if depth > MAX_SPEC_DEPTH:
        return
    if isinstance(spec, str):
        if is_sha256_hex(spec):
            yield spec
    elif isinstance(spec, dict):
        for value in spec.values():
            yield from spec_artifacts(value, depth + 1)
    elif isinstance(spec, list):
        for value in spec:
            yield from spec_artifacts(value, depth + 1)


def artifacts_in_use(*, owner: AbstractBaseUser, shas: Collection[str]) -> dict[str, list[int]]:
    """sha256 -> ids of the person's live jobs that use it: named in the spec, or an input of a unit."""
    wanted, uses = set(shas), defaultdict(set)
    for job_id, spec in Job.objects.filter(owner=owner, state__in=LIVE).values_list("pk", "spec"):
        for sha in wanted.intersection(spec_artifacts(spec)):
            uses[sha].add(job_id)
    inputs = WorkUnit.inputs.through.objects.filter(
        artifact_id__in=wanted, workunit__job__owner=owner, workunit__job__state__in=LIVE
    ).values_list("artifact_id", "workunit__job_id").distinct()
    for sha, job_id in inputs:
        uses[sha].add(job_id)
    return {sha: sorted(ids) for sha, ids in uses.items()}


def artifact_delete(*, owner: AbstractBaseUser, sha256: str) -> bool:
    """The person stops holding the artifact (their list, their quota). Refused while one of their live
    jobs uses it. The bytes go at once when no one else holds them and nothing references them (True),
    else they stay for the others, or for the collection once nothing does."""
    artifact = Artifact.objects.filter(pk=sha256, owners=owner).first() if is_sha256_hex(sha256) else None
    if artifact is None:
        raise NotFound(f"you hold no artifact {sha256[:64]!r}")
    jobs = artifacts_in_use(owner=owner, shas=[sha256]).get(sha256)
    if jobs:
        raise ArtifactInUse(f"jobs {', '.join(map(str, jobs))} use this artifact and have not ended: delete it "
                            "once they have", fields={"jobs": jobs})
    artifact_disown(artifact=artifact, owner=owner)
    removed = artifact_remove(sha256=sha256, needed=_needed_after_delete)
    log.info("artifact %s deleted by %s (%s)", sha256, owner, "removed" if removed else "kept for others")
    return removed


def artifacts_collect(*, now: datetime | None = None) -> dict[str, int]:
    """Remove artifacts nothing references (module docstring), at most COLLECT_BATCH a run, and the
    staging files of dead uploads. Safe to run twice, and beside uploads (artifact_remove locks)."""
    now = now or timezone.now()
    young = now - timedelta(seconds=settings.IDLEGRID_ARTIFACT_GC_GRACE_SECONDS)
    named = _named_by_jobs(since=now - timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS))
    # Spec names are skipped here, not in SQL: a month of jobs can name more artifacts than SQLite takes
    # query parameters. Oldest first, so what the specs still name never hides the rest for long.
    oldest = _unreferenced().filter(stored_at__lt=young).order_by("stored_at", "pk").values_list("pk", flat=True)
    candidates = [sha for sha in oldest[:COLLECT_BATCH * 4] if sha not in named][:COLLECT_BATCH]
    removed = sum(
        artifact_remove(sha256=sha, needed=lambda a: a.stored_at >= young or _referenced(a.pk, named))
        for sha in candidates
    )
    temp_files = get_storage().temp_files_purge(older_than=TEMP_FILE_MAX_AGE)
    if removed or temp_files:
        log.info("collected %s artifacts and %s staging files of dead uploads", removed, temp_files)
    return {"removed": removed, "temp_files": temp_files}


def _needed_after_delete(artifact: Artifact) -> bool:
    """Whether a deleted artifact must stay for now: a row or a recent job's spec names it, or a device
    holds the same bytes (it may be about to report them: the collection decides, after the grace)."""
    if artifact.devices.exists() or _referenced(artifact.pk, set()):
        return True
    since = timezone.now() - timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS)
    # One artifact: the database looks for its name in the specs' text, rather than Python in every spec.
    specs = _recent_jobs(since=since).annotate(text=Cast("spec", TextField()))
    return specs.filter(text__contains=artifact.pk).exists()


def _recent_jobs(*, since: datetime) -> QuerySet[Job]:
    """Jobs that have not ended, or ended (or were reopened) since `since`: their specs may be read again."""
    return Job.objects.filter(Q(state__in=LIVE) | Q(finished_at__gte=since) | Q(reopened_at__gte=since))


def _named_by_jobs(*, since: datetime) -> set[str]:
    """What the specs of _recent_jobs name (one pass over them per collection run)."""
    specs = _recent_jobs(since=since).values_list("spec", flat=True).iterator()
    return {sha for spec in specs for sha in spec_artifacts(spec)}


# Every row that names an artifact by a foreign key or a many-to-many, as (model, field): tests/marketplace/
# artifacts/test_manage.py checks it against the model's relations, so a new one cannot be forgotten.
# (Artifact.devices is no reference: a device's upload waits for its report only for the grace period.)
ROW_REFERENCES: tuple[tuple[type[Model], str], ...] = (
    (Artifact.owners.through, "artifact"),
    (Job, "output"),
    (FedRound, "weights_in"),
    (FedRound, "weights_out"),
    (Result, "output"),
    (ResultArchive, "output"),
    (WorkUnit.inputs.through, "artifact"),
)


def _unreferenced() -> QuerySet[Artifact]:
    queryset = Artifact.objects.all()
    for model, field in ROW_REFERENCES:
        queryset = queryset.filter(~Exists(model.objects.filter(**{field: OuterRef("pk")})))
    return queryset


def _referenced(sha256: str, named: set[str]) -> bool:
    return sha256 in named or not _unreferenced().filter(pk=sha256).exists()
