"""The hot path: lease a batch of replicas in one SQL statement, renew leases, expire the dead ones.

The lease policy (docs/design.md, "Lease policy") is what keeps one device from stalling other people's
jobs: a device holds at most its quota of leases at once (IDLEGRID_PROBATION_LEASES on probation,
IDLEGRID_MAX_LEASES once trusted), whatever it asks per request; a lease lives at most the unit's time
limit plus IDLEGRID_LEASE_GRACE_SECONDS however often it is renewed; an owner never gets a second
replica of a unit any of its devices touched (answered, gave up, let expire or handed back); a device
that gave up waits out a cool-down. Known-answer copies take places inside the quota, at a random
position, so the wire does not tell them apart.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, F, FloatField, Value, When
from django.db.models.functions import Coalesce, Least
from django.utils import timezone

from marketplace.core.sql import fetch_prepared
from marketplace.workers.models import Device
from marketplace.workers.services import device_seen
from marketplace.workers.trust import lease_cap, trust_reset
from marketplace.workunits.known_answers import known_answer_draw, known_answers_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_replace, replication_decide
from marketplace.workunits.requirements import capacity_of
from worker_agent.protocol import b64encode
from worker_agent.wire import Capabilities

log = logging.getLogger(__name__)
_random = random.SystemRandom()

# One statement claims the batch. Candidates are the oldest unsent replicas this owner may take (NOT
# EXISTS: an owner never gets a replica of a unit any of its devices already had, in whatever state it
# ended, so a quorum needs distinct owners and a give-up or an expiry cannot be retried by the same
# owner); they are locked with SKIP LOCKED so concurrent leases never wait on each other. GROUP BY keeps
# one replica per unit, and the batch is drawn at random from that window of old work: two devices that
# lease back to back (two colluders, say) do not receive replicas of the same units, and none can steer
# which units it shares with whom. The window is bounded, so the oldest work still goes first.
#
# Capability matching rides on the same scan: each replica row carries its unit's requirements
# (workunits/requirements.py, denormalised so no join is made per candidate), and a row is a candidate
# only if the device has the memory, the GPU memory (0 for a cpu unit, at least 1 for a cuda one, so a
# CPU device, reporting 0, never gets a cuda unit) and ships the kind. The partial index result_unsent
# still drives the scan in id order; rows the device cannot run are skipped like rows of its own units.
# For a CPU device the GPU condition is the literal `need_gpu_mb = 0`, which the partial index
# result_unsent_cpu matches. Measured (EXPLAIN ANALYZE, best of 5, 20,000 unsent and 20,000 finished
# replicas, PostgreSQL 15): 0.18-0.21 ms before matching, 0.20 ms after; with 10,000 cuda replicas at
# the head of the queue, a CPU device's lease scanned past all of them on result_unsent (1.3 ms) and
# reads none of them on result_unsent_cpu (0.21 ms). Rows needing more memory than a device has are still
# skipped one by one (no index can order by id and bound memory at once); they cost a small device a
# scan past them, never a wrong lease.
_LEASE_CANDIDATES = """
WITH candidates AS (
    SELECT r.id, r.unit_id FROM workunits_result r
    WHERE r.state = 'unsent'
      AND r.need_memory_mb <= %(memory_mb)s AND {gpu} AND r.kind IN ({kinds})
      AND NOT EXISTS (
          SELECT 1 FROM workunits_result o WHERE o.unit_id = r.unit_id AND o.owner_id = %(owner)s)
    ORDER BY r.id
    LIMIT %(candidates)s
    {lock}
), picked AS (
    SELECT MIN(id) AS id FROM candidates GROUP BY unit_id ORDER BY {order} LIMIT %(limit)s
)
"""
_LEASE_UPDATE = """
UPDATE workunits_result
SET state = 'in_progress', device_id = %(device)s, owner_id = %(owner)s, hardware_class = %(hardware_class)s,
    leased_at = %(now)s, lease_expires_at = %(expires)s
WHERE id IN (SELECT id FROM picked) AND state = 'unsent'
RETURNING id, unit_id, job_id
"""
# On PostgreSQL the same statement also hands back what the answer needs of each unit (payload, signature,
# key) and records each lease's hard deadline from its unit's time limit (`limits.seconds` of the payload
# the marketplace made and signed; 300 s where that is not a positive number, as _time_limit reads it).
# A lease is then one statement where it was four: the lease, the payloads, one UPDATE per time limit, and
# the replication check, now made only for units the statement reports undecided. The nested CASE keeps
# the cast off anything but a JSON number; LEAST bounds it to a year. SQLite cannot name a joined table in
# RETURNING: it keeps _LEASE_UPDATE and the follow-up statements (_units_of, _deadlines_set).
_DEADLINE_SQL = """(%(now)s + make_interval(secs => %(grace)s + COALESCE(
        CASE WHEN jsonb_typeof(u.payload -> 'limits' -> 'seconds') = 'number' THEN
            CASE WHEN (u.payload -> 'limits' ->> 'seconds')::numeric > 0
                 THEN LEAST((u.payload -> 'limits' ->> 'seconds')::numeric, 31536000)::float8 END END,
        300.0)))"""
_LEASE_UPDATE_PG = f"""
UPDATE workunits_result r
SET state = 'in_progress', device_id = %(device)s, owner_id = %(owner)s, hardware_class = %(hardware_class)s,
    leased_at = %(now)s, lease_deadline = {_DEADLINE_SQL},
    lease_expires_at = LEAST(%(expires)s, {_DEADLINE_SQL})
FROM picked p, workunits_workunit u
WHERE r.id = p.id AND u.id = r.unit_id AND r.state = 'unsent'
RETURNING r.id, r.unit_id, r.job_id, u.payload, u.signature, u.signing_key_id, u.replication_decided,
          r.lease_expires_at
"""


@dataclass(frozen=True)
class Lease:
    result_id: int
    unit_id: int
    job_id: int  # for the marketplace only: never on the wire, where audits must look like any unit
    expires_at: datetime
    payload: dict[str, Any]
    signature: str | None  # base64 Ed25519 signature of protocol.unit_message by the marketplace key key_id
    key_id: str


# What a lease sends of its unit: payload, base64 signature (None when unsigned), signing key id.
_UnitWire = tuple[dict[str, Any], str | None, str]


def _lease_sql(*, draw: bool, kinds: int, gpu: bool = False, joined: bool = False, locked: bool | None = None) -> str:
    """The lease statement: `joined` (PostgreSQL) also returns the units' payloads and sets the deadlines;
    `locked` (default: on PostgreSQL) takes the candidates with FOR UPDATE SKIP LOCKED."""
    locked = connection.vendor == "postgresql" if locked is None else locked
    lock = "FOR UPDATE SKIP LOCKED" if locked else ""
    placeholders = ", ".join(f"%(kind_{index})s" for index in range(kinds))
    candidates = _LEASE_CANDIDATES.format(lock=lock, order="random()" if draw else "MIN(id)", kinds=placeholders,
                                          gpu="r.need_gpu_mb <= %(gpu_mb)s" if gpu else "r.need_gpu_mb = 0")
    return candidates + (_LEASE_UPDATE_PG if joined else _LEASE_UPDATE)


# What the lease policy needs to know of a device beyond its row, in one round trip: the leases it holds,
# whether it is trusted on its hardware class (its quota) and anywhere (known answers go to devices trusted
# for nothing). Three indexed lookups: result_device_state-style (device, state) and the trust unique key.
_STANDING_SQL = """
SELECT (SELECT COUNT(*) FROM workunits_result WHERE device_id = %(device)s AND state = 'in_progress'),
       EXISTS (SELECT 1 FROM workers_devicetrust WHERE device_id = %(device)s AND hardware_class = %(hardware_class)s
               AND trusted_since IS NOT NULL),
       EXISTS (SELECT 1 FROM workers_devicetrust WHERE device_id = %(device)s AND trusted_since IS NOT NULL)
"""


@dataclass(frozen=True)
class Standing:
    held: int
    trusted_here: bool  # on its current hardware class: the full quota (workers/trust.lease_cap)
    trusted_anywhere: bool  # on any class and kind: no known answers (known_answers.known_answer_draw)


def device_standing(*, device: Device) -> Standing:
    rows = fetch_prepared(_STANDING_SQL, {"device": device.pk, "hardware_class": device.hardware_class})
    held, here, anywhere = rows[0]
    return Standing(int(held), bool(here), bool(anywhere))



def lease_room(*, device: Device, asked: int, now: datetime | None = None, standing: Standing | None = None) -> int:
    """How many more leases the device may take now: none during a cool-down, else its quota minus what
    it already holds (the quota counts per device, never per request)."""
    now = now or timezone.now()
    if device.cooldown_until is not None and device.cooldown_until > now:
        return 0
    if standing is None:
        held = Result.objects.filter(device=device, state=Result.State.IN_PROGRESS).count()
        return max(0, min(asked, lease_cap(device=device) - held))
    cap = settings.IDLEGRID_MAX_LEASES if standing.trusted_here else settings.IDLEGRID_PROBATION_LEASES
    return max(0, min(asked, cap - standing.held))


def cooldown_remaining(*, device: Device, now: datetime | None = None) -> float:
    """Seconds left of the device's cool-down after a give-up (0 when none)."""
    now = now or timezone.now()
    if device.cooldown_until is None or device.cooldown_until <= now:
        return 0.0
    return (device.cooldown_until - now).total_seconds()


def workunit_lease(*, device: Device, max_units: int, capabilities: Capabilities | None = None) -> list[Lease]:
    """Lease up to max_units replicas of distinct units to a device, within its quota, from the oldest work
    it can run (`capabilities`, as reported with this request; None: an old agent, see capacity_of).

    On PostgreSQL with no known answer drawn: the device's standing (one SELECT), then BEGIN, the lease
    statement (which also returns the payloads and records the deadlines), COMMIT; the device row came with
    authentication and is written at most once per SEEN_RESOLUTION."""
    now = timezone.now()
    device_seen(device=device, now=now, capabilities=capabilities)  # at most one write in SEEN_RESOLUTION
    capacity = capacity_of(capabilities)
    if not capacity.kinds or (device.cooldown_until is not None and device.cooldown_until > now):
        return []
    standing = device_standing(device=device)
    room = lease_room(device=device, asked=max_units, now=now, standing=standing)
    if room == 0:
        return []
    expires = now + timedelta(seconds=settings.IDLEGRID_LEASE_SECONDS)
    drawn = known_answer_draw(device=device, slots=room, trusted=standing.trusted_anywhere)
    joined = connection.vendor == "postgresql"
    leases: list[Lease] = []
    with transaction.atomic():
        # Known answers first, so that a place drawn for one that cannot be made (no budget, no source)
        # goes to ordinary work.
        rows = known_answers_lease(device=device, count=drawn, now=now, expires=expires,
                                   capacity=capacity) if drawn else []
        if room > len(rows):
            window = settings.IDLEGRID_LEASE_DRAW_WINDOW
            params: dict[str, int | float | str | datetime] = {
                "owner": device.owner_id, "device": device.pk, "hardware_class": device.hardware_class,
                "now": now, "expires": expires, "limit": room - len(rows),
                "candidates": max(window, 4 * (room - len(rows))),
                "memory_mb": capacity.memory_mb, "gpu_mb": capacity.gpu_mb,
                "grace": float(settings.IDLEGRID_LEASE_GRACE_SECONDS),
                **{f"kind_{index}": kind for index, kind in enumerate(capacity.kinds)},
            }
            sql = _lease_sql(draw=window > 1, kinds=len(capacity.kinds), gpu=capacity.gpu_mb > 0, joined=joined)
            leased = fetch_prepared(sql, params)
            if joined:
                undecided = [row[1] for row in leased if not row[6]]
                leases = [Lease(result_id, unit_id, job_id, lease_expires_at, _json(payload), _b64(signature), key_id)
                          for result_id, unit_id, job_id, payload, signature, key_id, _, lease_expires_at in leased]
            else:
                undecided = [unit_id for _, unit_id, _ in leased]
                rows += leased
            if undecided:
                replication_decide(device=device, unit_ids=undecided)
        if rows:  # known-answer copies, and every lease on SQLite: their units and deadlines separately
            units = _units_of([unit_id for _, unit_id, _ in rows])
            deadlines = _deadlines_set(rows, units, now=now, expires=expires)
            leases += [Lease(result_id, unit_id, job_id, min(expires, deadlines[result_id]), *units[unit_id])
                       for result_id, unit_id, job_id in rows]
    if settings.IDLEGRID_LEASE_DRAW_WINDOW > 1:
        _random.shuffle(leases)  # the position in a batch says nothing either (copies are made first)
    else:
        leases.sort(key=lambda lease: lease.unit_id)  # strictly oldest first, as configured
    return leases


def _json(value: Any) -> dict[str, Any]:
    # Django loads jsonb as text on psycopg 3 (JSONField decodes it); a raw cursor sees the text.
    decoded: dict[str, Any] = json.loads(value) if isinstance(value, str | bytes) else value
    return decoded


def _b64(signature: Any) -> str | None:
    return b64encode(bytes(signature)) if signature is not None else None


def _units_of(unit_ids: list[int]) -> dict[int, _UnitWire]:
    return {
        pk: (payload, _b64(signature), key_id)
        for pk, payload, signature, key_id in WorkUnit.objects.filter(pk__in=unit_ids).values_list(
            "id", "payload", "signature", "signing_key_id")
    }


def _time_limit(payload: dict[str, Any]) -> float:
    limits = payload.get("limits") if isinstance(payload, dict) else None
    seconds = limits.get("seconds") if isinstance(limits, dict) else None
    return float(seconds) if isinstance(seconds, int | float) and seconds > 0 else 300.0


def _deadlines_set(rows: list[tuple[int, int, int]], units: dict[int, _UnitWire], *, now: datetime,
                   expires: datetime) -> dict[int, datetime]:
    """Record each new lease's hard deadline (leased now + the unit's time limit + the grace): one UPDATE
    per distinct time limit, which is one for a batch of one job's units."""
    grace = settings.IDLEGRID_LEASE_GRACE_SECONDS
    by_deadline: dict[datetime, list[int]] = defaultdict(list)
    deadlines = {}
    for result_id, unit_id, _ in rows:
        deadline = now + timedelta(seconds=_time_limit(units[unit_id][0]) + grace)
        by_deadline[deadline].append(result_id)
        deadlines[result_id] = deadline
    for deadline, result_ids in by_deadline.items():
        Result.objects.filter(pk__in=result_ids).update(lease_deadline=deadline, lease_expires_at=min(expires, deadline))
    return deadlines


# The heartbeat on PostgreSQL: one prepared statement renews the live leases among the ids, stores the
# fractions reported for them, and returns their new expiry (where it was an UPDATE and a SELECT): a lease
# its deadline stopped short of now is lost, as the SELECT found it.
_RENEW_SQL = """
UPDATE workunits_result r
SET lease_expires_at = LEAST(%(expires)s, COALESCE(r.lease_deadline, %(expires)s)),
    progress = COALESCE((SELECT p.fraction FROM unnest(%(progress_ids)s::bigint[], %(fractions)s::float8[])
                         AS p(id, fraction) WHERE p.id = r.id), r.progress)
WHERE r.id = ANY(%(ids)s::bigint[]) AND r.device_id = %(device)s AND r.state = 'in_progress'
  AND r.lease_expires_at >= %(now)s
RETURNING r.id, r.lease_expires_at
"""


def lease_renew(
    *, device: Device, result_ids: list[int], progress: dict[int, float] | None = None
) -> tuple[list[int], datetime]:
    """Extend the device's live leases, never past each one's deadline, and store the fractions done it
    reported (`progress`, for ids among result_ids), in the same statement; returns the ids still held (the
    others were lost) and the new expiry of a lease not yet at its deadline. The device counts as seen (at
    most one write per SEEN_RESOLUTION, as a lease)."""
    now = timezone.now()
    expires = now + timedelta(seconds=settings.IDLEGRID_LEASE_SECONDS)
    asked = set(result_ids)
    fractions = {pk: float(fraction) for pk, fraction in (progress or {}).items() if pk in asked}
    if connection.vendor == "postgresql":
        rows = fetch_prepared(_RENEW_SQL, {
            "expires": expires, "now": now, "device": device.pk, "ids": sorted(asked),
            "progress_ids": list(fractions), "fractions": list(fractions.values())})
        renewed = sorted(pk for pk, expiry in rows if expiry >= now)
    else:
        live = Result.objects.filter(
            pk__in=result_ids, device=device, state=Result.State.IN_PROGRESS, lease_expires_at__gte=now
        )
        changes: dict[str, Any] = {"lease_expires_at": Least(Value(expires), Coalesce(F("lease_deadline"), Value(expires)))}
        if fractions:
            changes["progress"] = Case(*(When(pk=pk, then=Value(f)) for pk, f in sorted(fractions.items())),
                                       default=F("progress"), output_field=FloatField())
        live.update(**changes)
        renewed = sorted(Result.objects.filter(
            pk__in=result_ids, device=device, state=Result.State.IN_PROGRESS, lease_expires_at__gte=now
        ).values_list("pk", flat=True))
    device_seen(device=device, now=now)
    return renewed, expires


def leases_expire(*, batch: int = 1000) -> int:
    """Expire leases past their expiry and issue a replacement replica for each. Safe to run twice. One
    lease that cannot be expired (a broken row) is logged and skipped; the others still expire."""
    now = timezone.now()
    expired = 0
    failed: set[int] = set()
    while True:
        rows = list(
            Result.objects.filter(state=Result.State.IN_PROGRESS, lease_expires_at__lt=now)
            .exclude(pk__in=failed).order_by("lease_expires_at")
            .values_list("pk", "unit_id", "device_id", "owner_id", "job__kind")[:batch]
        )
        if not rows:
            return expired
        for row in rows:
            try:
                expired += _lease_expire(*row)
            except Exception:  # isolated: one bad row must not stop every other lease from expiring
                log.exception("lease of result %s could not be expired; skipped this sweep", row[0])
                failed.add(row[0])


def _lease_expire(pk: int, unit_id: int, device_id: int, owner_id: int, kind: str) -> int:
    with transaction.atomic():
        # Conditional: a report racing this sweep wins or loses as a whole.
        if not Result.objects.filter(pk=pk, state=Result.State.IN_PROGRESS).update(state=Result.State.EXPIRED):
            return 0
        Device.objects.filter(pk=device_id).update(expired=F("expired") + 1)
        trust_reset(device_id=device_id, kind=kind, reason="a lease expired")
        replica_replace(unit_id=unit_id, reason="a lease expired", gave_up_owner=owner_id)
    return 1
