"""Known-answer units: copies of units already decided by a replicated quorum, mixed into the leases of
devices on probation. On the wire they are ordinary units (same payload, a unit id like any other), so
a device cannot tell them apart; a wrong answer to one is a failed audit."""

from __future__ import annotations

import random
from datetime import datetime

from django.conf import settings
from django.db.models import Max, Min

from marketplace.core.signing import unit_sign
from marketplace.workers.models import Device, DeviceTrust
from marketplace.workunits.models import Result, WorkUnit

_random = random.SystemRandom()


def known_answer_mix_in(*, device: Device, leased: int, now: datetime, expires: datetime) -> list[tuple[int, int, int]]:
    """With probability IDLEGRID_KNOWN_ANSWER_RATE per unit leased by a device on probation, add one
    known-answer unit to the lease. Returns (result_id, unit_id, job_id) rows like the lease query."""
    rate = settings.IDLEGRID_KNOWN_ANSWER_RATE
    if rate <= 0 or not any(_random.random() < rate for _ in range(leased)):
        return []
    if DeviceTrust.objects.filter(device=device, trusted_since__isnull=False).exists():
        return []
    source = _pick_source(device)
    if source is None:
        return []
    copy = WorkUnit.objects.create(
        job_id=source.job_id, index=source.index, payload=source.payload, known_answer_of=source,
        quorum=1, max_results=1, results_created=1, replication_decided=True,
    )
    copy.inputs.set(source.inputs.all())
    unit_sign(copy)  # signed like any unit, so nothing on the wire sets it apart
    result = Result.objects.create(
        unit=copy, job_id=source.job_id, state=Result.State.IN_PROGRESS, device=device, owner_id=device.owner_id,
        hardware_class=device.hardware_class, leased_at=now, lease_expires_at=expires,
    )
    return [(result.pk, copy.pk, source.job_id)]


def _pick_source(device: Device) -> WorkUnit | None:
    """A random unit decided by a replicated quorum (never one accepted on one device's word), of a job
    still running or completed, that no device of this owner computed."""
    candidates = WorkUnit.objects.filter(
        state=WorkUnit.State.DONE, known_answer_of__isnull=True, canonical_result__accepted_alone=False,
    ).exclude(results__owner_id=device.owner_id)
    bounds = candidates.aggregate(low=Min("pk"), high=Max("pk"))
    if bounds["low"] is None:
        return None
    start = _random.randint(bounds["low"], bounds["high"])
    return candidates.filter(pk__gte=start).order_by("pk").first() or candidates.order_by("pk").first()

