"""Re-verification after a ban: whatever a banned device vouched for is checked again by others, and
the jobs whose outputs it touched are reopened and merged anew."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.ledger import hooks as ledger_hooks
from marketplace.workers.models import Device
from marketplace.workers.trust import is_trusted
from marketplace.workunits.models import Result, WorkUnit

log = logging.getLogger(__name__)


def device_results_reverify(*, device_id: int, since: datetime) -> int:
    """Free the banned device's leases, refuse its pending reports, and reopen every decided unit that
    counted one of its valid results since `since`. Returns the number of units reopened."""
    from marketplace.workunits.replicas import replica_issue
    from marketplace.workunits.tasks import validate_unit

    for pk, unit_id in Result.objects.filter(device_id=device_id, state=Result.State.IN_PROGRESS).values_list("pk", "unit_id"):
        if Result.objects.filter(pk=pk, state=Result.State.IN_PROGRESS).update(state=Result.State.EXPIRED):
            replica_issue(unit_id=unit_id, reason="the device holding the lease was banned")
    pending = list(Result.objects.filter(device_id=device_id, state=Result.State.REPORTED).values_list("unit_id", flat=True))
    Result.objects.filter(device_id=device_id, state=Result.State.REPORTED).update(state=Result.State.INVALID)
    for unit_id in pending:
        if WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.PENDING).update(need_validate=True):
            validate_unit.delay_on_commit(unit_id)
    vouched = list(
        Result.objects.filter(device_id=device_id, state=Result.State.VALID, reported_at__gte=since)
        .values_list("pk", "unit_id")
    )
    Result.objects.filter(pk__in=[pk for pk, _ in vouched]).update(state=Result.State.INVALID)
    ledger_hooks.results_withdrawn([pk for pk, _ in vouched])  # their held earnings are taken back
    # Floored: a disputed known answer is one computation in two valid rows (the copy's, settled by
    # verification._known_answer_resolve, and the one counted on the original), but one count; going
    # below zero fails the counter's CHECK and with it the whole validation that banned the device.
    Device.objects.filter(pk=device_id).update(
        valid_results=Greatest(F("valid_results") - len(vouched), 0), invalid_results=F("invalid_results") + len(vouched)
    )
    reopened = sum(_unit_recheck(unit_id=unit_id) for _, unit_id in vouched)
    log.warning("device %s: %s valid results withdrawn, %s units reopened", device_id, len(vouched), reopened)
    return reopened


def _unit_recheck(*, unit_id: int) -> bool:
    """Reopen a decided unit whose remaining valid results (from unbanned devices) no longer make a quorum."""
    from marketplace.workunits.replicas import replica_issue

    unit = WorkUnit.objects.select_related("job").get(pk=unit_id)
    if unit.known_answer_of_id is not None or unit.state != WorkUnit.State.DONE:
        return False
    remaining = Result.objects.filter(unit=unit, state=Result.State.VALID).exclude(device__state=Device.State.BANNED)
    owners = remaining.values("owner_id").distinct().count()
    quorum = max(unit.quorum, unit.job.spec.get("quorum", 2))
    if owners >= unit.quorum and remaining.filter(pk=unit.canonical_result_id).exists():
        return False
    vouched = list(remaining.values_list("device_id", flat=True))
    # A trusted device's word decides a unit alone when it is not audited: it still stands for this one.
    if owners >= unit.quorum or any(is_trusted(device_id=d, kind=unit.job.kind) for d in vouched):
        if remaining.filter(pk=unit.canonical_result_id).exists():
            return False
        # still decided, but the canonical result was the banned device's: merge the job again
        WorkUnit.objects.filter(pk=unit.pk).update(canonical_result=remaining.order_by("pk").first())
        job_reopen(unit.job_id)
        return True
    WorkUnit.objects.filter(pk=unit.pk, state=WorkUnit.State.DONE).update(
        state=WorkUnit.State.PENDING, canonical_result=None, finished_at=None, quorum=quorum,
        replication_decided=True, max_results=F("max_results") + quorum,
    )
    job_reopen(unit.job_id)
    for _ in range(quorum - owners):
        replica_issue(unit_id=unit.pk, reason="re-verification after a ban")
    return True


def job_reopen(job_id: int) -> None:
    """A job whose output is being re-verified runs again until its units are re-decided, then is merged anew."""
    from marketplace.jobs.services import job_merge_if_done

    reopened = Job.objects.filter(pk=job_id, state__in=(Job.State.COMPLETED, Job.State.MERGING)).update(
        state=Job.State.RUNNING, finished_at=None, corrections=F("corrections") + 1, reopened_at=timezone.now()
    )
    if reopened:
        log.warning("job %s reopened: a device it relied on was banned", job_id)
    job_merge_if_done(job_id=job_id)
