"""Validation in batches: many units judged with a handful of set-based statements instead of ~40 per unit.

The rules are verification.py's, unchanged. Every unit of a batch is one of two kinds:

- **plain**: every answer it counts (reported, and vouched for before) agrees with the first one, the unit
  hides none of the submitter's known rows, is no known-answer copy, and no answer disputes one. Its
  verdict needs no ban and no re-check: it is accepted, or waits (for replicas out, or for the replicas
  it is given here: too few owners answered, or no trusted device confirms), or stays as it is. These
  are nearly all units of a running network, and they are judged here: their results read in one query,
  outputs compared by digest (tensors are read only where digests differ, as verification._agree does),
  and states, device counters, trust, new replicas and credits written in bulk.
- **involved**: everything else (a disagreement, a late replica, a known answer, hidden rows, a replica its
  cap or its job's state refuses, a quorum-1 unit whose device lost its trust). Each is validated by verification._validate itself,
  in a savepoint of the batch's transaction, before the plain units are looked at.

The batch equals the units validated one by one in this order: the involved ones (by id), then the plain
ones (by id). Involved units may ban devices or reset trust, so the plain units' results are read only
after them, and the trust that decides a plain unit (is its device trusted, has the trusted pool reached
IDLEGRID_TRUSTED_POOL_MIN) is kept in memory and moved on by each plain unit's credits, as the serial order
would see it.

Locks: the unit rows (by id, SKIP LOCKED for the units claimed from the flag, so that a unit a report is
moving right now is left for the next batch), then their reported and vouched results, the order
verification and bans take them in. Safe to run twice: a result moves from reported once, credits are
idempotent per result, and a unit with nothing reported is left as it is.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import OperationalError, transaction
from django.db.models import Case, Count, F, Min, Q, Value, When
from django.utils import timezone

from marketplace.jobs.events import job_progress
from marketplace.jobs.lifecycle import job_merge_if_done
from marketplace.jobs.models import Job
from marketplace.ledger import hooks as ledger_hooks
from marketplace.workers.models import Device, DeviceTrust
from marketplace.workunits import verification
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.notify import work_available
from marketplace.workunits.requirements import replica_needs

log = logging.getLogger(__name__)

OUTSTANDING = (Result.State.UNSENT, Result.State.IN_PROGRESS)
SKIPPED = "skipped"  # the unit's row was locked by a concurrent report or validation: it keeps its flag
FAILED = "failed"  # validating it raised: it keeps its flag, the others of the batch are kept


class _Involved(Exception):
    """A plain unit turned out to need verification._validate after all."""


@dataclass
class _Unit:
    unit: WorkUnit
    considered: list[Result] = field(default_factory=list)  # vouched (by id), then reported (by report time)
    outstanding: int = 0
    first_result: int | None = None  # the unit's first replica: the audited one when unit.audit

    @property
    def reported(self) -> list[Result]:
        return [r for r in self.considered if r.state == Result.State.REPORTED]


def units_validate(*, unit_ids: Sequence[int] = (), claim: int = 0, wait: bool = False) -> dict[int, str]:
    """Validate `unit_ids` and up to `claim` more units waiting with need_validate, in one transaction.
    Returns each unit's verdict (verification.unit_validate's words, SKIPPED or FAILED). With `wait`, the
    named units' locks are waited for (a caller that must have them judged now); else a unit locked by a
    concurrent report or validation is SKIPPED and keeps its flag, for its task's retry or the sweep."""
    verdicts: dict[int, str] = {}
    with transaction.atomic():
        units = _lock(unit_ids, claim=claim, wait=wait)
        verdicts.update({pk: SKIPPED for pk in unit_ids if pk not in units})
        if not units:
            return verdicts
        WorkUnit.objects.filter(pk__in=list(units)).update(need_validate=False)
        _judge_batch(units, verdicts)
        # What raced or failed is looked at again: by its task's retry, the next batch or the sweep.
        again = [pk for pk, verdict in verdicts.items() if verdict in ("retry", FAILED) and pk in units]
        if again:
            WorkUnit.objects.filter(pk__in=again, state=WorkUnit.State.PENDING).update(need_validate=True)
    return verdicts


def units_validate_waiting(*, limit: int) -> dict[int, str]:
    """Validate up to `limit` units waiting with need_validate, in batches of IDLEGRID_VALIDATE_BATCH."""
    verdicts: dict[int, str] = {}
    while len(verdicts) < limit:
        batch = units_validate(claim=min(settings.IDLEGRID_VALIDATE_BATCH, limit - len(verdicts)))
        if not batch:
            break
        verdicts.update(batch)
        if all(v in (FAILED, "retry") for v in batch.values()):
            break  # what is left keeps failing: the next sweep tries again
    return verdicts


def units_waiting(*, besides: Iterable[int] = ()) -> bool:
    """Whether any unit waits with need_validate, other than `besides`."""
    return WorkUnit.objects.filter(need_validate=True).exclude(pk__in=list(besides)).exists()


def _lock(unit_ids: Sequence[int], *, claim: int, wait: bool) -> dict[int, WorkUnit]:
    """The units to validate, row-locked in id order (the order bans lock them in). Only the unit rows:
    their jobs are read unlocked (a job's state moves by conditional UPDATEs)."""
    locked: dict[int, WorkUnit] = {}
    if unit_ids:
        named = WorkUnit.objects.select_for_update(skip_locked=not wait, of=("self",))
        locked.update((u.pk, u) for u in named.filter(pk__in=list(unit_ids)).order_by("pk"))
    if claim > 0:
        waiting = (WorkUnit.objects.select_for_update(skip_locked=True, of=("self",))
                   .filter(need_validate=True).exclude(pk__in=list(unit_ids)).order_by("pk")[:claim])
        locked.update((u.pk, u) for u in waiting)
    jobs = Job.objects.in_bulk({u.job_id for u in locked.values()})
    for unit in locked.values():
        unit.job = jobs[unit.job_id]
    return dict(sorted(locked.items()))


def _load(units: dict[int, WorkUnit]) -> dict[int, _Unit]:
    """Each unit's answers that count (reported and vouched for, devices not banned), row-locked, and its
    replicas still out: two queries for the whole batch."""
    loaded = {pk: _Unit(unit) for pk, unit in units.items()}
    counted = (
        Result.objects.select_for_update(of=("self",))
        .filter(unit_id__in=list(units), state__in=(Result.State.VALID, Result.State.REPORTED))
        .exclude(device__state=Device.State.BANNED)
        .order_by("unit_id", "reported_at", "pk")
    )
    vouched: dict[int, list[Result]] = defaultdict(list)
    for result in counted:
        if result.state == Result.State.VALID:
            vouched[result.unit_id].append(result)
        else:
            loaded[result.unit_id].considered.append(result)
    for pk, valid in vouched.items():
        loaded[pk].considered[:0] = sorted(valid, key=lambda r: r.pk)
    rows = (Result.objects.filter(unit_id__in=list(units)).values("unit_id")
            .annotate(first=Min("pk"), out=Count("pk", filter=Q(state__in=OUTSTANDING))))
    for row in rows:
        loaded[row["unit_id"]].first_result = row["first"]
        loaded[row["unit_id"]].outstanding = row["out"]
    return loaded


# --- the involved units: verification._validate, one savepoint each ---------------------------------

def _judge_batch(units: dict[int, WorkUnit], verdicts: dict[int, str]) -> None:
    """Validate the involved units one by one, then read the others again (an involved unit may have moved
    their results: a ban withdraws them) and judge them, until only plain units were left to judge."""
    remaining = dict(units)
    while remaining:
        loaded = _load(remaining)
        involved = _involved(loaded, verdicts)
        if not involved:
            trust, writes = _Trust(loaded.values()), _Writes()
            decided: dict[int, str] = {}
            for pk, item in loaded.items():
                try:
                    decided[pk] = _decide(item, trust, writes)
                except _Involved:
                    involved.append(pk)
            if not involved:
                _write_plain(loaded, decided, writes, trust, verdicts)
                return
        for pk in involved:
            remaining.pop(pk)
            if verdicts.get(pk) != FAILED:
                verdicts[pk] = _validate_one(pk)


def _involved(loaded: dict[int, _Unit], verdicts: dict[int, str]) -> list[int]:
    involved = []
    for pk, item in loaded.items():
        try:
            if not _plain(item):
                involved.append(pk)
        except Exception:  # an output that cannot be read: this unit only
            log.exception("unit %s: its outputs could not be compared; it will be validated again", pk)
            verdicts[pk] = FAILED
            involved.append(pk)  # out of the batch, and not run
    return involved


def _validate_one(unit_id: int) -> str:
    try:
        with transaction.atomic():
            return verification._validate(unit_id)
    except (verification._Raced, OperationalError) as exc:
        if isinstance(exc, OperationalError) and not verification._deadlock(exc):
            raise
        log.warning("unit %s: validation raced (%s); it will be validated again", unit_id, exc)
        return "retry"
    except Exception:
        log.exception("unit %s: validation failed; it will be validated again", unit_id)
        return FAILED


# --- the plain units ---------------------------------------------------------------------------------

def _plain(item: _Unit) -> bool:
    """Whether the unit's verdict may need nothing but this module (see the module's docstring); _decide
    may still find that it does (_Involved)."""
    unit = item.unit
    if unit.state != WorkUnit.State.PENDING or not item.reported:
        return not item.reported or unit.state == WorkUnit.State.ERROR  # nothing to judge, or a late replica
    if unit.known_answer_of_id is not None or unit.hidden_rows:
        return False
    if any(r.disputes_known_answer_id is not None for r in item.considered):
        return False
    first = item.considered[0]
    # verification._group ending with a single group: every answer agrees with the first (agreement within
    # a tolerance is not transitive, so each is compared with the first, as there). Equal digests agree
    # without reading anything.
    return all(verification._agree(unit.job.spec, unit.job.kind, first, r) for r in item.considered[1:])


class _Trust:
    """The trust that decides plain units, read once for the batch and moved on by its credits in order:
    (device, kind, hardware class) -> consecutive valid results and trusted or not; each device's state
    and current class; how many devices are trusted per kind, up to IDLEGRID_TRUSTED_POOL_MIN."""

    def __init__(self, items: Iterable[_Unit]) -> None:
        items = list(items)
        device_ids = {r.device_id for item in items for r in item.considered}
        kinds = {item.unit.job.kind for item in items}
        self.devices = {pk: (state, hw) for pk, state, hw in
                        Device.objects.filter(pk__in=device_ids).values_list("pk", "state", "hardware_class")}
        self.rows: dict[tuple[int, str, str], list[Any]] = {
            (d, k, hw): [pk, valid, since is not None] for pk, d, k, hw, valid, since in
            DeviceTrust.objects.filter(device_id__in=device_ids, kind__in=kinds).values_list(
                "pk", "device_id", "kind", "hardware_class", "consecutive_valid", "trusted_since")
        }
        self.pool_min = settings.IDLEGRID_TRUSTED_POOL_MIN
        self.pool = {kind: DeviceTrust.objects.filter(
            kind=kind, trusted_since__isnull=False, device__state=Device.State.ACTIVE,
            device__hardware_class=F("hardware_class"))[:self.pool_min].count() for kind in kinds}
        self.credits: Counter[tuple[int, str, str]] = Counter()

    def trusted(self, device_id: int, kind: str) -> bool:  # workers.trust.is_trusted
        state, hw = self.devices[device_id]
        row = self.rows.get((device_id, kind, hw))
        return state == Device.State.ACTIVE and row is not None and row[2]

    def credit(self, device_id: int, kind: str, hardware_class: str) -> None:  # workers.trust.trust_credit
        key = (device_id, kind, hardware_class)
        row = self.rows.setdefault(key, [None, 0, False])
        row[1] += 1
        self.credits[key] += 1
        if not row[2] and row[1] >= settings.IDLEGRID_TRUST_THRESHOLD:
            row[2] = True
            if self.trusted(device_id, kind):
                self.pool[kind] = min(self.pool_min, self.pool[kind] + 1)


@dataclass
class _Writes:
    """What the plain units of a batch change, written at the end in a few statements."""

    valid_alone: list[int] = field(default_factory=list)
    valid_replicated: list[int] = field(default_factory=list)
    valid_per_device: Counter[int] = field(default_factory=Counter)
    audits_per_device: Counter[int] = field(default_factory=Counter)
    canonical: dict[int, int] = field(default_factory=dict)  # unit -> its canonical result
    jobs: dict[int, int] = field(default_factory=dict)  # job -> owner, of the units decided
    replicas: dict[int, int] = field(default_factory=dict)  # unit -> replicas to issue


def _write_plain(loaded: dict[int, _Unit], decided: dict[int, str], writes: _Writes, trust: _Trust,
                 verdicts: dict[int, str]) -> None:
    """Write the plain units' verdicts in a savepoint; should that fail (a race the locks did not keep
    out), nothing of it is kept and each unit is validated on its own instead."""
    try:
        with transaction.atomic():
            _write(writes, trust, loaded)
        verdicts.update(decided)
    except (verification._Raced, OperationalError) as exc:
        if isinstance(exc, OperationalError) and not verification._deadlock(exc):
            raise
        log.warning("a batch of %s units raced (%s); they are validated one by one", len(loaded), exc)
        for pk in loaded:
            verdicts[pk] = _validate_one(pk)


def _decide(item: _Unit, trust: _Trust, writes: _Writes) -> str:
    """verification._seek_quorum for a unit whose answers all agree: accepted, or waiting for replicas
    already out or issued here. Anything else (a replica past the cap, a quorum to raise) is _Involved."""
    unit, kind = item.unit, item.unit.job.kind
    if unit.state != WorkUnit.State.PENDING or not item.reported:
        return str(unit.state)
    if unit.quorum == 1 and not all(trust.trusted(verification._device_of(r), kind) for r in item.reported):
        raise _Involved(f"unit {unit.pk}: accepted alone, but its device lost its trust")
    owners = verification._owners(item.considered)
    if owners < unit.quorum:
        short = unit.quorum - owners - item.outstanding
        if short > 0:
            _replicate(item, short, writes)
        return "pending"
    if not _confirmed(unit, item.considered, kind, trust):
        if not item.outstanding:
            _replicate(item, 1, writes)  # for a trusted device to confirm
        return "pending"
    _accept(item, trust, writes)
    return "done"


def _replicate(item: _Unit, count: int, writes: _Writes) -> None:
    """replicas.replica_issue, `count` times, for a unit whose job runs and whose cap leaves room for them;
    a unit at its cap (it may error, or wait for validation) is _Involved."""
    unit = item.unit
    if unit.job.state != Job.State.RUNNING or unit.results_created + count > unit.max_results:
        raise _Involved(f"unit {unit.pk}: needs {count} more replica(s) than its cap or its job allows")
    writes.replicas[unit.pk] = count


def _confirmed(unit: WorkUnit, agreeing: list[Result], kind: str, trust: _Trust) -> bool:  # verification._confirmed
    if unit.quorum < 2 or not settings.IDLEGRID_TRUSTED_CONFIRMATION:
        return True
    if any(trust.trusted(verification._device_of(r), kind) for r in agreeing):
        return True
    return trust.pool[kind] < trust.pool_min


def _accept(item: _Unit, trust: _Trust, writes: _Writes) -> None:
    """verification._accept and _winners_credit with no losers: the reports become valid, counted on their
    devices, trust credited (not for a unit accepted alone), a passed audit counted."""
    unit, kind = item.unit, item.unit.job.kind
    alone = unit.quorum == 1
    audited = item.first_result if unit.audit else None
    for result in item.reported:
        device_id = verification._device_of(result)
        (writes.valid_alone if alone else writes.valid_replicated).append(result.pk)
        writes.valid_per_device[device_id] += 1
        if not alone:
            trust.credit(device_id, kind, result.hardware_class)
        if result.pk == audited:
            writes.audits_per_device[device_id] += 1
    writes.canonical[unit.pk] = min(r.pk for r in item.considered)
    writes.jobs[unit.job_id] = unit.job.owner_id


def _write(writes: _Writes, trust: _Trust, loaded: dict[int, _Unit]) -> None:
    _write_replicas(writes.replicas, loaded)
    newly_valid = writes.valid_alone + writes.valid_replicated
    for ids, alone in ((writes.valid_alone, True), (writes.valid_replicated, False)):
        if ids and Result.objects.filter(pk__in=ids, state=Result.State.REPORTED).update(
                state=Result.State.VALID, accepted_alone=alone) != len(ids):
            raise verification._Raced(f"some of {len(ids)} results were moved while they were being judged")
    _add(Device, "valid_results", writes.valid_per_device)
    _add(Device, "audits_passed", writes.audits_per_device)
    _trust_write(trust)
    if writes.canonical:
        WorkUnit.objects.filter(pk__in=list(writes.canonical), state=WorkUnit.State.PENDING).update(
            state=WorkUnit.State.DONE, finished_at=timezone.now(),
            canonical_result_id=Case(*[When(pk=u, then=Value(r)) for u, r in writes.canonical.items()]),
        )
        Result.objects.filter(unit_id__in=list(writes.canonical), state=Result.State.UNSENT).update(
            state=Result.State.CANCELLED)
    ledger_hooks.results_valid(newly_valid)  # after commit, in one durable posting batch
    for job_id, owner_id in writes.jobs.items():
        job_merge_if_done(job_id=job_id)
        job_progress(job_id=job_id, owner_id=owner_id)


def _write_replicas(replicas: dict[int, int], loaded: dict[int, _Unit]) -> None:
    """The replicas _replicate chose, counted against each unit's cap under the same conditions as
    replica_issue's (a job cancelled meanwhile is a race: the batch is validated one by one instead)."""
    by_count: dict[int, list[int]] = defaultdict(list)
    for pk, count in replicas.items():
        by_count[count].append(pk)
    for count, pks in by_count.items():
        counted = WorkUnit.objects.filter(
            pk__in=pks, state=WorkUnit.State.PENDING, results_created__lte=F("max_results") - count,
            job__state=Job.State.RUNNING,
        ).update(results_created=F("results_created") + count)
        if counted != len(pks):
            raise verification._Raced(f"{len(pks) - counted} units or their jobs moved while they were being judged")
    if replicas:
        Result.objects.bulk_create([
            Result(unit_id=pk, job_id=loaded[pk].unit.job_id, **replica_needs(loaded[pk].unit))
            for pk, count in replicas.items() for _ in range(count)])
        work_available()


def _add(model: Any, counter: str, amounts: Counter[int]) -> None:
    """counter += n per row, one UPDATE per distinct n (nearly always one: every device +1)."""
    by_amount: dict[int, list[int]] = defaultdict(list)
    for pk, amount in amounts.items():
        by_amount[amount].append(pk)
    for amount, pks in by_amount.items():
        model.objects.filter(pk__in=pks).update(**{counter: F(counter) + amount})


def _trust_write(trust: _Trust) -> None:
    """workers.trust.trust_credit in bulk: the missing rows made, the runs moved on by what each earned,
    and trust given to the rows that reached the threshold."""
    if not trust.credits:
        return
    missing = [key for key in trust.credits if trust.rows[key][0] is None]
    if missing:
        DeviceTrust.objects.bulk_create(
            [DeviceTrust(device_id=d, kind=k, hardware_class=hw) for d, k, hw in missing], ignore_conflicts=True)
        for pk, d, k, hw in DeviceTrust.objects.filter(
                Q(*[Q(device_id=d, kind=k, hardware_class=hw) for d, k, hw in missing], _connector=Q.OR)
        ).values_list("pk", "device_id", "kind", "hardware_class"):
            trust.rows[(d, k, hw)][0] = pk
    _add(DeviceTrust, "consecutive_valid", Counter({trust.rows[key][0]: n for key, n in trust.credits.items()}))
    DeviceTrust.objects.filter(
        pk__in=[trust.rows[key][0] for key in trust.credits], trusted_since__isnull=True,
        consecutive_valid__gte=settings.IDLEGRID_TRUST_THRESHOLD,
    ).update(trusted_since=timezone.now())



def unit_validate_waiting(*, unit_id: int, claim: int) -> str:
    """What a unit's validation message does: validate the unit if it still waits (need_validate), and up
    to `claim` other waiting units with it. A unit no longer waiting was judged since it was flagged (every
    change that calls for a validation sets the flag first, and a validation clears it in the transaction
    that judges): the message returns the unit's state without judging it again. SKIPPED when the unit's
    row is locked by a concurrent report or validation."""
    waiting = WorkUnit.objects.filter(pk=unit_id).values_list("need_validate", "state").first()
    if waiting is None:
        return "missing"
    if not waiting[0]:
        return str(waiting[1])
    return units_validate(unit_ids=[unit_id], claim=claim).get(unit_id, SKIPPED)
