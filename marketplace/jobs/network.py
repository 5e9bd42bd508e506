"""The network's figures as the landing page shows them to anyone: devices online, units validated today,
jobs running and completed, results per unit (what verification costs), tokens paid to contributors.

Anonymous callers read them, so they are counted once per FIGURES_TTL in the shared cache, never per
request: a caller hammering the landing page costs one cache read a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TypedDict

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, Q
from django.utils import timezone as dj_timezone

from marketplace.jobs.models import Job
from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Earning
from marketplace.workers.models import Device
from marketplace.workunits.models import Result, WorkUnit

FIGURES_TTL = 5  # seconds
FIGURES_KEY = "portal:network-figures:v1"
RESULTS_WINDOW = timedelta(days=1)
COMPUTED = (Result.State.VALID, Result.State.INVALID, Result.State.REPORTED)


class NetworkFigures(TypedDict):
    devices_online: int
    owners_online: int
    units_validated_today: int
    jobs_running: int
    jobs_completed: int
    results_per_unit: float | None  # results computed per unit decided over the last day
    tokens_paid: int  # base units credited to contributors for valid results, held or settled
    at: str


def network_figures(*, now: datetime | None = None) -> NetworkFigures:
    if now is None and (cached := cache.get(FIGURES_KEY)) is not None:
        return cached
    figures = _count(now or dj_timezone.now())
    if now is None:
        cache.set(FIGURES_KEY, figures, FIGURES_TTL)
    return figures


def _count(now: datetime) -> NetworkFigures:
    online = Device.objects.filter(state=Device.State.ACTIVE,
                                   last_seen_at__gte=now - timedelta(seconds=settings.IDLEGRID_DEVICE_ONLINE_SECONDS))
    day_start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    real_units = WorkUnit.objects.filter(known_answer_of__isnull=True, state=WorkUnit.State.DONE)
    decided = real_units.filter(finished_at__gte=now - RESULTS_WINDOW).count()
    computed = Result.objects.filter(unit__known_answer_of__isnull=True, state__in=COMPUTED,
                                     unit__state=WorkUnit.State.DONE,
                                     unit__finished_at__gte=now - RESULTS_WINDOW).count()
    jobs = Job.objects.aggregate(
        running=Count("pk", filter=Q(state__in=(Job.State.PENDING, Job.State.RUNNING, Job.State.MERGING))),
        completed=Count("pk", filter=Q(state=Job.State.COMPLETED)),
    )
    paid = Earning.objects.filter(state__in=(Earning.State.HELD, Earning.State.SETTLED)).aggregate(total=AmountSum("net"))
    return {
        "devices_online": online.count(),
        "owners_online": online.values("owner").distinct().count(),
        "units_validated_today": real_units.filter(finished_at__gte=day_start).count(),
        "jobs_running": jobs["running"],
        "jobs_completed": jobs["completed"],
        "results_per_unit": round(computed / decided, 2) if decided else None,
        "tokens_paid": int(paid["total"] or 0),
        "at": now.isoformat(),
    }
