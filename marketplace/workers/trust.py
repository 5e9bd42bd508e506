"""Earned trust, audits and bans (adaptive replication).

A device starts on probation for each task kind and hardware class: every unit it computes is
replicated. After IDLEGRID_TRUST_THRESHOLD consecutive valid replicated results it is trusted: its
units may be accepted on its word alone, except a random IDLEGRID_AUDIT_RATE of them, which are
replicated all the same (audits) without the device being able to tell. An invalid result or an
expired lease sends it back to probation. A failed audit (a trusted device's audited result found
wrong, a wrong known-answer unit, or a valid result later overturned) bans the device for good,
holds its earnings, and re-verifies its recent valid results.
"""

from __future__ import annotations

import logging
import random
from datetime import timedelta

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from marketplace.ledger import hooks as ledger_hooks
from marketplace.workers.models import Device, DeviceTrust

log = logging.getLogger(__name__)
_random = random.SystemRandom()


def trust_get(*, device: Device, kind: str) -> DeviceTrust:
    """The device's trust record for a kind on its current hardware class (a new class starts on probation)."""
    trust, _ = DeviceTrust.objects.get_or_create(device=device, kind=kind, hardware_class=device.hardware_class)
    return trust


def replication_choose(*, device: Device, kind: str) -> tuple[bool, bool]:
    """At a unit's first lease: (replicate, audit). Trusted devices are replicated only as audits."""
    trust = trust_get(device=device, kind=kind)
    if not trust.trusted:
        return True, False
    audit = _random.random() < settings.IDLEGRID_AUDIT_RATE
    return audit, audit


def is_trusted(*, device_id: int, kind: str) -> bool:
    return DeviceTrust.objects.filter(
        device_id=device_id, device__state=Device.State.ACTIVE, kind=kind,
        device__hardware_class=F("hardware_class"), trusted_since__isnull=False,
    ).exists()


def trusted_devices(*, kind: str, at_most: int) -> int:
    """Active devices trusted for a kind (on their current hardware class), counted up to at_most: the
    question asked on every replicated decision is only whether the pool has reached a size."""
    return DeviceTrust.objects.filter(
        kind=kind, trusted_since__isnull=False, device__state=Device.State.ACTIVE,
        device__hardware_class=F("hardware_class"),
    )[:at_most].count()


def lease_cap(*, device: Device) -> int:
    """How many leases a device may hold at once: a device trusted for nothing on its hardware class (a new
    device, a new Sybil identity) holds at most IDLEGRID_PROBATION_LEASES, BOINC's quota for new hosts:
    every unit it takes costs a replica, so the less of the work it holds, the cheaper verification is,
    and the fewer units a hoarder can sit on."""
    trusted = DeviceTrust.objects.filter(
        device=device, hardware_class=device.hardware_class, trusted_since__isnull=False
    ).exists()
    return settings.IDLEGRID_MAX_LEASES if trusted else settings.IDLEGRID_PROBATION_LEASES


def trust_credit(*, device_id: int, kind: str, hardware_class: str) -> None:
    """A valid replicated (or known-answer) result: one more in the run; trust at the threshold."""
    trust, _ = DeviceTrust.objects.get_or_create(device_id=device_id, kind=kind, hardware_class=hardware_class)
    DeviceTrust.objects.filter(pk=trust.pk).update(consecutive_valid=F("consecutive_valid") + 1)
    DeviceTrust.objects.filter(
        pk=trust.pk, trusted_since__isnull=True, consecutive_valid__gte=settings.IDLEGRID_TRUST_THRESHOLD
    ).update(trusted_since=timezone.now())


def trust_reset(*, device_id: int, kind: str, reason: str) -> None:
    reset = DeviceTrust.objects.filter(device_id=device_id, kind=kind).update(consecutive_valid=0, trusted_since=None)
    if reset:
        log.info("device %s back on probation for %s: %s", device_id, kind, reason)


def audit_passed(*, device_id: int) -> None:
    Device.objects.filter(pk=device_id).update(audits_passed=F("audits_passed") + 1)


def device_ban(*, device_id: int, reason: str) -> bool:
    """Ban for good, hold earnings, free its leases, re-verify its recent valid results. Runs once.

    Locks first what a validation of the device's pending units locks, in the order validation takes
    them (the unit rows, then their results), and only then the device's own rows: a validation that
    read one of these reports finishes first, and the ban then withdraws what it decided (on PostgreSQL,
    the other order deadlocked the two: tests/marketplace/test_races.py)."""
    from django.db.models import Subquery

    from marketplace.workunits.models import Result, WorkUnit
    from marketplace.workunits.reverify import device_results_reverify

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
    return True
