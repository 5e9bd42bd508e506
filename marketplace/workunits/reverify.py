"""Bans and re-verification: a device caught cheating is banned for good (`device_ban`), and whatever it
vouched for is checked again by others; the jobs whose outputs it touched are reopened and merged anew.
Also the re-decisions of units a submitter's known rows put in doubt (`unit_recheck`)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import F, Subquery
from django.db.models.functions import Greatest
from django.utils import timezone

from marketplace.core.tasks import enqueue_on_commit
from marketplace.jobs.lifecycle import job_reopen
from marketplace.ledger import hooks as ledger_hooks
from marketplace.webhooks import catalog
from marketplace.webhooks.services import event_emit
from marketplace.workers.models import Device, DeviceTrust
from marketplace.workers.trust import is_trusted
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_issue, replica_replace

log = logging.getLogger(__name__)


# An owner's answers checked again after one of them failed a submitter's known rows: at most this many
# of its most recent decided units, each re-decided with one owner more than vouched for it.
RECHECK_MAX_UNITS = 200


def device_ban(*, device_id: int, reason: str) -> bool:
    """Ban for good, hold earnings, free its leases, re-verify its recent valid results. Runs once.

    Locks first what a validation of the device's pending units locks, in the order validation takes
    them (the unit rows, then their results), and only then the device's own rows: a validation that
    read one of these reports finishes first, and the ban then withdraws what it decided (on PostgreSQL,
    the other order deadlocked the two: tests/marketplace/test_races.py)."""
    pending = Result.objects.filter(device_id=device_id, state__in=(Result.State.IN_PROGRESS, Result.State.REPORTED))
    list(WorkUnit.objects.select_for_update().filter(pk__in=Subquery(pending.values("unit_id"))).order_by("pk")
         .values_list("pk", flat=True))
    list(pending.select_for_update().order_by("pk").values_list("pk", flat=True))

    banned = Device.objects.filter(pk=device_id).exclude(state=Device.State.BANNED).update(
        state=Device.State.BANNED, banned_at=timezone.now(), ban_reason=reason[:2000], earnings_held=True,
        audits_failed=F("audits_failed") + 1,
    )
    if not banned:
        return False
    log.warning("device %s banned: %s", device_id, reason)
    DeviceTrust.objects.filter(device_id=device_id).update(consecutive_valid=0, trusted_since=None)
    since = timezone.now() - timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS)
    device_results_reverify(device_id=device_id, since=since)
    ledger_hooks.device_banned(device_id)  # after the withdrawals above: the rest of its held earnings is forfeit
    _ban_tell(device_id)
    return True


def _ban_tell(device_id: int) -> None:
    """device.banned to the device's owner (their webhook endpoints), in the ban's transaction."""
    device = Device.objects.get(pk=device_id)
    event_emit(owner_id=device.owner_id, type=catalog.DEVICE_BANNED, data=lambda: {"device": {
        "id": device.pk, "name": device.name, "state": device.state, "banned_at": device.banned_at,
        "reason": device.ban_reason, "earnings_held": device.earnings_held}})


def device_results_reverify(*, device_id: int, since: datetime) -> int:
    """Free the banned device's leases, refuse its pending reports, and reopen every decided unit that
    counted one of its valid results since `since`. Returns the number of units reopened."""
    for pk, unit_id in Result.objects.filter(device_id=device_id, state=Result.State.IN_PROGRESS).values_list("pk", "unit_id"):
        if Result.objects.filter(pk=pk, state=Result.State.IN_PROGRESS).update(state=Result.State.EXPIRED):
            replica_replace(unit_id=unit_id, reason="the device holding the lease was banned")
    pending = list(Result.objects.filter(device_id=device_id, state=Result.State.REPORTED).values_list("unit_id", flat=True))
    Result.objects.filter(device_id=device_id, state=Result.State.REPORTED).update(state=Result.State.INVALID)
    for unit_id in pending:
        if WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.PENDING).update(need_validate=True):
            enqueue_on_commit("workunits.validate", unit_id)
    vouched = list(
        Result.objects.filter(device_id=device_id, state=Result.State.VALID, reported_at__gte=since)
        .values_list("pk", "unit_id", "disputes_known_answer_id")
    )
    Result.objects.filter(pk__in=[pk for pk, _, _ in vouched]).update(state=Result.State.INVALID)
    ledger_hooks.results_withdrawn([pk for pk, _, _ in vouched])  # their held earnings are taken back
    # A disputed known answer's row on the original unit was never counted (verification._judge): only the
    # device's own computations move between the counters. Floored all the same: going below zero fails
    # the counter's CHECK and with it the whole validation that banned the device.
    counted = sum(1 for _, _, mirror in vouched if mirror is None)
    Device.objects.filter(pk=device_id).update(
        valid_results=Greatest(F("valid_results") - counted, 0), invalid_results=F("invalid_results") + counted
    )
    reopened = sum(_unit_reverify(unit_id=unit_id) for _, unit_id, _ in vouched)
    log.warning("device %s: %s valid results withdrawn, %s units reopened", device_id, len(vouched), reopened)
    return reopened


def _unit_reverify(*, unit_id: int) -> bool:
    """Reopen a decided unit whose remaining valid results (from unbanned devices) no longer make a quorum."""
    unit = WorkUnit.objects.select_related("job").get(pk=unit_id)
    if unit.known_answer_of_id is not None or unit.state != WorkUnit.State.DONE:
        return False
    remaining = Result.objects.filter(unit=unit, state=Result.State.VALID).exclude(device__state=Device.State.BANNED)
    owners = remaining.values("owner_id").distinct().count()
    quorum = max(unit.quorum, unit.job.spec.get("quorum", 2))
    canonical = unit.canonical_result_id  # a done unit has one (and pk=None matches no row)
    if owners >= unit.quorum and canonical is not None and remaining.filter(pk=canonical).exists():
        return False
    vouched = list(remaining.values_list("device_id", flat=True))
    # A trusted device's word decides a unit alone when it is not audited: it still stands for this one.
    if owners >= unit.quorum or any(is_trusted(device_id=d, kind=unit.job.kind) for d in vouched):
        if canonical is not None and remaining.filter(pk=canonical).exists():
            return False
        # still decided, but the canonical result was the banned device's: merge the job again
        WorkUnit.objects.filter(pk=unit.pk).update(canonical_result=remaining.order_by("pk").first())
        job_reopen(job_id=unit.job_id)
        return True
    WorkUnit.objects.filter(pk=unit.pk, state=WorkUnit.State.DONE).update(
        state=WorkUnit.State.PENDING, canonical_result=None, finished_at=None, quorum=quorum,
        replication_decided=True, max_results=F("max_results") + quorum,
    )
    job_reopen(job_id=unit.job_id)
    for _ in range(quorum - owners):
        replica_issue(unit_id=unit.pk, reason="re-verification after a ban")
    return True


def unit_recheck(*, unit_id: int, reason: str) -> bool:
    """Decide a done unit again, asking one owner more than vouched for its answer: as many replicas as
    there were vouching owners are issued. An honest answer is confirmed by them and stands; a wrong one
    (colluders who decided it together) loses to the new owners, and the results that vouched for it are
    overturned (verification._accept). The job reopens meanwhile. False when the unit is not done (already
    being re-decided, say). Runs inside the caller's transaction."""
    unit = WorkUnit.objects.only("state", "known_answer_of_id", "job_id").get(pk=unit_id)
    if unit.known_answer_of_id is not None or unit.state != WorkUnit.State.DONE:
        return False
    vouching = Result.objects.filter(unit_id=unit_id, state=Result.State.VALID).values("owner_id").distinct().count()
    reopened = WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.DONE).update(
        state=WorkUnit.State.PENDING, canonical_result=None, finished_at=None, quorum=vouching + 1,
        replication_decided=True, max_results=F("max_results") + vouching + 2,
    )
    if not reopened:
        return False
    log.info("unit %s re-decided: %s", unit_id, reason)
    job_reopen(job_id=unit.job_id)
    for _ in range(vouching):
        replica_issue(unit_id=unit_id, reason=reason)
    return True


def owner_answers_recheck(*, owner_id: int, reason: str) -> int:
    """Check again the owner's recent answers (its devices' valid results of the audit window, the most
    recent RECHECK_MAX_UNITS units), each unit re-decided with one owner more than vouched for it. Nothing
    is taken from the owner unless the re-decision overturns its answer. Returns the units reopened."""
    since = timezone.now() - timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS)
    units = list(
        Result.objects.filter(owner_id=owner_id, state=Result.State.VALID, reported_at__gte=since,
                              unit__state=WorkUnit.State.DONE, unit__known_answer_of__isnull=True)
        .order_by("-reported_at").values_list("unit_id", flat=True).distinct()[:RECHECK_MAX_UNITS]
    )
    reopened = sum(unit_recheck(unit_id=unit_id, reason=reason) for unit_id in units)
    if reopened:
        log.warning("owner %s: %s of its answers are checked again (%s)", owner_id, reopened, reason)
    return reopened
