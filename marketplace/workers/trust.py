"""Earned trust, audits and bans (adaptive replication).

A device starts on probation for each task kind and hardware class: every unit it computes is
replicated. After IDLEGRID_TRUST_THRESHOLD consecutive valid replicated results it is trusted: its
units may be accepted on its word alone, except a random IDLEGRID_AUDIT_RATE of them, which are
replicated all the same (audits) without the device being able to tell. An invalid result or an
expired lease sends it back to probation. A failed audit (a trusted device's audited result found
wrong, a wrong known-answer unit, or a valid result later overturned) bans the device for good
(marketplace/workunits/bans.py): this module keeps the trust rows, the ban is a use case above it.
"""

from __future__ import annotations

import logging
import random

from django.conf import settings
from django.db.models import F
from django.utils import timezone

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
