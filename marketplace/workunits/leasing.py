"""The hot path: lease a batch of replicas in one SQL statement, renew leases, expire the dead ones."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from marketplace.workers.models import Device
from marketplace.workers.trust import lease_limit, trust_reset
from marketplace.workunits.known_answers import known_answer_mix_in
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_issue, replication_decide
from worker_agent.protocol import b64encode

# One statement claims the batch. Candidates are locked with SKIP LOCKED so concurrent leases never
# wait on each other; GROUP BY keeps two replicas of one unit out of one batch, and NOT EXISTS keeps
# a replica away from an owner who already holds one of that unit (a quorum needs distinct owners).
_LEASE_SQL = """
WITH candidates AS (
    SELECT r.id, r.unit_id FROM workunits_result r
    WHERE r.state = 'unsent'
      AND NOT EXISTS (
          SELECT 1 FROM workunits_result o
          WHERE o.unit_id = r.unit_id AND o.owner_id = %(owner)s
            AND o.state IN ('in_progress', 'reported', 'valid', 'invalid'))
    ORDER BY r.id
    LIMIT %(candidates)s
    {lock}
), picked AS (
    SELECT MIN(id) AS id FROM candidates GROUP BY unit_id ORDER BY MIN(id) LIMIT %(limit)s
)
UPDATE workunits_result
SET state = 'in_progress', device_id = %(device)s, owner_id = %(owner)s, hardware_class = %(hardware_class)s,
    leased_at = %(now)s, lease_expires_at = %(expires)s
WHERE id IN (SELECT id FROM picked) AND state = 'unsent'
RETURNING id, unit_id, job_id
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


def _lease_sql() -> str:
    lock = "FOR UPDATE SKIP LOCKED" if connection.vendor == "postgresql" else ""
    return _LEASE_SQL.format(lock=lock)


def workunit_lease(*, device: Device, max_units: int) -> list[Lease]:
    """Lease up to max_units replicas of distinct units to a device, oldest first."""
    now = timezone.now()
    expires = now + timedelta(seconds=settings.IDLEGRID_LEASE_SECONDS)
    params = {
        "owner": device.owner_id,
        "device": device.pk,
        "hardware_class": device.hardware_class,
        "now": now,
        "expires": expires,
        "limit": lease_limit(device=device, asked=max_units),
    }
    params["candidates"] = params["limit"] * 4
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_lease_sql(), params)
        rows = cursor.fetchall()
        if rows:
            replication_decide(device=device, unit_ids=[unit_id for _, unit_id, _ in rows])
            rows += known_answer_mix_in(device=device, leased=len(rows), now=now, expires=expires)
    if not rows:
        return []
    units = {
        pk: (payload, b64encode(bytes(signature)) if signature is not None else None, key_id)
        for pk, payload, signature, key_id in WorkUnit.objects.filter(
            pk__in=[unit_id for _, unit_id, _ in rows]
        ).values_list("id", "payload", "signature", "signing_key_id")
    }
    rows.sort()
    return [Lease(result_id, unit_id, job_id, expires, *units[unit_id]) for result_id, unit_id, job_id in rows]


def lease_renew(*, device: Device, result_ids: list[int]) -> tuple[list[int], datetime]:
    """Extend the device's live leases; returns the ids renewed (the others were lost) and the new deadline."""
    now = timezone.now()
    expires = now + timedelta(seconds=settings.IDLEGRID_LEASE_SECONDS)
    live = Result.objects.filter(
        pk__in=result_ids, device=device, state=Result.State.IN_PROGRESS, lease_expires_at__gte=now
    )
    live.update(lease_expires_at=expires)
    renewed = list(
        Result.objects.filter(pk__in=result_ids, device=device, state=Result.State.IN_PROGRESS, lease_expires_at=expires)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    Device.objects.filter(pk=device.pk).update(last_seen_at=now)
    return renewed, expires


def leases_expire(*, batch: int = 1000) -> int:
    """Expire leases past their deadline and issue a replacement replica for each. Safe to run twice."""
    now = timezone.now()
    expired = 0
    while True:
        with transaction.atomic():
            rows = list(
                Result.objects.select_for_update(skip_locked=True)
                .filter(state=Result.State.IN_PROGRESS, lease_expires_at__lt=now)
                .values_list("pk", "unit_id", "device_id", "job__kind")[:batch]
            )
            if not rows:
                return expired
            for pk, unit_id, device_id, kind in rows:
                # Conditional: a report racing this sweep wins or loses as a whole.
                if Result.objects.filter(pk=pk, state=Result.State.IN_PROGRESS).update(state=Result.State.EXPIRED):
                    expired += 1
                    trust_reset(device_id=device_id, kind=kind, reason="a lease expired")
                    replica_issue(unit_id=unit_id, reason="a lease expired")
