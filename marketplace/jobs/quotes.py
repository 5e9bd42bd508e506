"""A quote: what a job would cost, how long it would take and whether the network can run it now,
from the same body as a submission, without creating or escrowing anything.

- Cost: the escrow (price x units x max_results_per_unit) is the worst case; the expected cost uses
  the results per decided unit this kind needed over the last QUOTE_WINDOW (replicas, disagreements,
  audits; the quorum when there is no history), never more than the worst case.
- Time: from the throughput devices showed for this kind over the window and the devices active in the
  last ACTIVE_WINDOW: results needed / devices, rounded up, times the per-result time (its p50 and p90).
  A result's time is what it took the device in wall time: the gap since the same device's previous
  report when that gap is short enough to mean it was busy (BUSY_GAP: the lease, the downloads, the
  upload and the report all count), and never less than the compute time it reported. Compute time
  alone was 20x short on small units, whose cost is mostly the round trips. No history, or no device:
  no ETA, and the reason.
- Feasibility: a unit is decided by results from devices of `quorum` different owners, so the pool
  must hold active devices of at least that many owners, among the devices that can run the job's
  units at all (`runnable_devices`: their last reported capabilities fit the largest unit's memory,
  device type, GPU memory and kind, workunits/requirements.py). None: the reason says what the units need.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Q
from django.utils import timezone

from marketplace.jobs.kinds import kind_module
from marketplace.ledger.escrow import escrow_amount, job_price_take
from marketplace.ledger.selectors import balances_for
from marketplace.workers.models import Device
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.requirements import Requirements, devices_able, job_requirements, not_runnable_sentence

QUOTE_WINDOW = timedelta(days=1)
ACTIVE_WINDOW = timedelta(hours=1)
MIN_HISTORY = 5  # fewer timed results than this say nothing about a kind's speed
BUSY_GAP = timedelta(minutes=2)  # a device that reports again within this was working between the two


@dataclass(frozen=True)
class Quote:
    kind: str
    units: int
    quorum: int
    price_per_result: str
    results_per_unit_expected: float
    results_per_unit_source: str
    cost_expected: str
    cost_worst_case: str  # the escrow that a submission would take
    balance_available: str
    affordable: bool
    devices_active: int
    owners_active: int
    runnable_devices: int  # active devices whose capabilities fit the job's largest unit
    runnable: bool
    not_runnable_reason: str | None
    eta_seconds_p50: int | None
    eta_seconds_p90: int | None
    eta_reason: str | None
    spec: dict[str, Any]  # the spec as a submission would store it, defaults filled in

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_quote(*, owner: AbstractBaseUser, kind: Any, spec: Any) -> Quote:
    """Validate the job exactly as job_submit does (the same errors), then price and time it."""
    spec, price = job_price_take(spec)
    module = kind_module(kind)
    normal = {**module.validate_spec(spec, owner=owner), "price_per_result": price}
    units, quorum, cap = module.units_expected(normal), normal["quorum"], normal["max_results_per_unit"]
    per_unit, source = _results_per_unit(kind, quorum=quorum, cap=cap)
    worst = escrow_amount(kind_module=module, spec=normal)
    expected = min(worst, math.ceil(int(price) * units * per_unit))
    available = int(balances_for(user=owner)["available"])
    devices, owners = _pool()
    needs = job_requirements(kind=kind, spec=normal)
    able, able_owners = _pool(needs)
    reason = None if able_owners >= quorum else (
        not_runnable_sentence(needs) if able == 0 < devices else  # devices there are, none can run it
        f"units need results from devices of {quorum} different owners; {able_owners} owner(s) have a device "
        f"active in the last {int(ACTIVE_WINDOW.total_seconds() // 60)} minutes that can run them")
    p50, p90, eta_reason = _eta(kind, results=math.ceil(units * per_unit), devices=able)
    return Quote(
        kind=kind, units=units, quorum=quorum, price_per_result=price, results_per_unit_expected=round(per_unit, 4),
        results_per_unit_source=source, cost_expected=str(expected), cost_worst_case=str(worst),
        balance_available=str(available), affordable=available >= worst, devices_active=devices,
        owners_active=owners, runnable_devices=able, runnable=reason is None, not_runnable_reason=reason,
        eta_seconds_p50=p50 if reason is None else None, eta_seconds_p90=p90 if reason is None else None,
        eta_reason=reason or eta_reason, spec=normal,
    )


def _results_per_unit(kind: str, *, quorum: int, cap: int) -> tuple[float, str]:
    since = timezone.now() - QUOTE_WINDOW
    done = WorkUnit.objects.filter(job__kind=kind, state=WorkUnit.State.DONE, finished_at__gte=since,
                                   known_answer_of__isnull=True)
    figures = done.aggregate(units=Count("pk", distinct=True), results=Count(
        "results", filter=Q(results__state__in=(Result.State.VALID, Result.State.INVALID)), distinct=True))
    if not figures["units"]:
        return float(quorum), "the quorum (no unit of this kind was decided recently)"
    per_unit = figures["results"] / figures["units"]
    return min(float(cap), max(1.0, per_unit)), f"{figures['units']} units of this kind decided in the last day"


def _pool(needs: Requirements | None = None) -> tuple[int, int]:
    """Devices active in the last ACTIVE_WINDOW and their distinct owners; with `needs`, only those able
    to run such units."""
    active = Device.objects.filter(state=Device.State.ACTIVE, last_seen_at__gte=timezone.now() - ACTIVE_WINDOW)
    if needs is not None:
        active = active.filter(devices_able(needs))
    return active.count(), active.values("owner_id").distinct().count()


def _eta(kind: str, *, results: int, devices: int) -> tuple[int | None, int | None, str | None]:
    if devices == 0:
        return None, None, "no device is active"
    times = sorted(_result_times(kind))
    if len(times) < MIN_HISTORY:
        return None, None, f"fewer than {MIN_HISTORY} results of this kind were timed in the last day"
    rounds = math.ceil(results / devices)  # one unit at a time per device (the agent's loop)
    return (math.ceil(rounds * _percentile(times, 0.5)), math.ceil(rounds * _percentile(times, 0.9)), None)


def _result_times(kind: str) -> list[float]:
    """Wall seconds per result of the latest reports of this kind (module docstring: Time)."""
    since = timezone.now() - QUOTE_WINDOW
    rows = (Result.objects.filter(job__kind=kind, reported_at__gte=since, elapsed_seconds__isnull=False)
            .order_by("-reported_at").values_list("device_id", "reported_at", "elapsed_seconds")[:1000])
    by_device: dict[int, list[tuple[Any, float]]] = defaultdict(list)
    for device_id, reported_at, elapsed in rows:
        by_device[device_id].append((reported_at, max(0.0, elapsed)))
    times = []
    for reports in by_device.values():
        reports.sort()
        times.append(reports[0][1])
        for (before, _), (at, elapsed) in zip(reports, reports[1:]):
            gap = (at - before).total_seconds()
            times.append(max(elapsed, gap) if gap <= BUSY_GAP.total_seconds() else elapsed)
    return times


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
