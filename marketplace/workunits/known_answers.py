"""Known-answer units: copies of units already decided by a replicated quorum, given to devices on
probation in place of ordinary units. On the wire they are ordinary units (same payload, a unit id like
any other, a place inside the device's quota at a random position of its batch), so a device cannot tell
them apart; a wrong answer to one is a failed audit.

The platform orders this work, so the platform pays for it: at IDLEGRID_VERIFICATION_PRICE out of its
verification budget (marketplace/ledger), never at the copied job's price, and a copy is made only while
the budget can pay for it and for every copy still out. A unit is copied at most
IDLEGRID_KNOWN_ANSWER_MAX_COPIES times.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import F, Max, Min, Q
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.ledger.selectors import verification_budget_available
from marketplace.workers.models import Device, DeviceTrust
from marketplace.workunits.creation import units_sign
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.requirements import Capacity, replica_needs

_random = random.SystemRandom()


def known_answer_draw(*, device: Device, slots: int, trusted: bool | None = None) -> int:
    """How many of a lease's `slots` go to known answers: each with probability IDLEGRID_KNOWN_ANSWER_RATE,
    for a device trusted for nothing (on probation). `trusted`: whether it is trusted anywhere, when the
    caller already knows (leasing.device_standing); else asked here."""
    rate = settings.IDLEGRID_KNOWN_ANSWER_RATE
    if rate <= 0:
        return 0
    drawn = sum(_random.random() < rate for _ in range(slots))
    if drawn == 0:
        return 0
    if trusted is None:
        trusted = DeviceTrust.objects.filter(device=device, trusted_since__isnull=False).exists()
    if trusted:
        return 0
    return drawn


def copies_affordable(*, wanted: int) -> int:
    """How many more copies the verification budget can pay for, with every copy still out counted as
    spent: a copy's answer is paid when it is validated, so the budget must already hold its price."""
    price = settings.IDLEGRID_VERIFICATION_PRICE
    if price == 0:
        return wanted
    out = WorkUnit.objects.filter(known_answer_of__isnull=False, state=WorkUnit.State.PENDING).count()
    return max(0, min(wanted, verification_budget_available() // price - out))


def known_answers_lease(*, device: Device, count: int, now: datetime, expires: datetime,
                        capacity: Capacity) -> list[tuple[int, int, int]]:
    """Make up to `count` known-answer copies leased to the device, of units it can run (`capacity`, as
    the lease statement matches it). Returns (result_id, unit_id, job_id) rows like the lease query."""
    rows = []
    for _ in range(copies_affordable(wanted=count)):
        source = _pick_source(device, capacity)
        if source is None:
            break
        copy = WorkUnit.objects.create(
            job_id=source.job_id, index=source.index, payload=source.payload, known_answer_of=source,
            quorum=1, max_results=1, results_created=1, replication_decided=True, **replica_needs(source),
        )
        copy.inputs.set(source.inputs.all())
        units_sign([copy])  # signed like any unit, so nothing on the wire sets it apart
        result = Result.objects.create(
            unit=copy, job_id=source.job_id, state=Result.State.IN_PROGRESS, device=device, owner_id=device.owner_id,
            hardware_class=device.hardware_class, leased_at=now, lease_expires_at=expires, **replica_needs(source),
        )
        rows.append((result.pk, copy.pk, source.job_id))
    return rows


def _pick_source(device: Device, capacity: Capacity) -> WorkUnit | None:
    """A random unit decided by a replicated quorum (never one accepted on one device's word), copied fewer
    than IDLEGRID_KNOWN_ANSWER_MAX_COPIES times, of a job running or recently ended, that no device of this
    owner computed and that this device can run (its requirements within `capacity`, as the lease statement
    matches them). Claimed by a conditional UPDATE of its copy count, so two concurrent leases cannot both
    make the last copy."""
    limit = settings.IDLEGRID_KNOWN_ANSWER_MAX_COPIES
    candidates = WorkUnit.objects.filter(
        state=WorkUnit.State.DONE, known_answer_of__isnull=True, canonical_result__accepted_alone=False,
        known_answer_copies__lt=limit, need_memory_mb__lte=capacity.memory_mb, need_gpu_mb__lte=capacity.gpu_mb,
        kind__in=capacity.kinds,
    ).exclude(results__owner_id=device.owner_id).exclude(job__state__in=(Job.State.CANCELLING, Job.State.CANCELLED))
    # Never a unit whose results may be moving to the archive (workunits/archive.py): the copy is judged
    # against the unit's canonical result in the hot table. Half the archive delay leaves the other half
    # between the last lease that could pick such a unit and the first move of its job's results.
    recent = timezone.now() - timedelta(seconds=settings.IDLEGRID_ARCHIVE_AFTER_SECONDS / 2)
    candidates = candidates.filter(Q(job__finished_at__isnull=True) | Q(job__finished_at__gte=recent))
    for _ in range(3):  # a lost race for the last copy of one unit tries another
        bounds = candidates.aggregate(low=Min("pk"), high=Max("pk"))
        if bounds["low"] is None:
            return None
        start = _random.randint(bounds["low"], bounds["high"])
        source = candidates.filter(pk__gte=start).order_by("pk").first() or candidates.order_by("pk").first()
        if source is not None and WorkUnit.objects.filter(pk=source.pk, known_answer_copies__lt=limit).update(
            known_answer_copies=F("known_answer_copies") + 1
        ):
            return source
    return None
