"""Agents report results, give up on them, or hand them back unstarted: each a conditional state move on
one row. What an agent sends is data: the report's `metrics` are information only (bounded, reserved names
refused), the output must be one the device itself uploaded, and no field of it steers verification.

A report is three statements besides authentication (docs/protocol.md, "Reports"): one loads the lease with
its unit and job, whether the device holds the output and the output's tensor summary, and locks the unit;
one moves the result (conditional: exactly once, on a live lease of this device); one marks the unit for
validation when validating now could decide it. The output file is not read: its header, finiteness and
sample count were summarized when the bytes arrived (artifacts.TensorHeader). Many reports in one request
share these statements (workunits/report_batch.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from marketplace.artifacts.models import Artifact, TensorHeader
from marketplace.artifacts.services import tensor_summary_of
from marketplace.core.exceptions import (
    AlreadyReported,
    ApplicationError,
    Forbidden,
    LeaseCancelled,
    LeaseExpired,
    NotFound,
    ValidationFailed,
)
from marketplace.core.tasks import enqueue_coalesced_on_commit
from marketplace.core.tensors import TensorFileError, TensorSummary
from marketplace.jobs.kinds import kind_module
from marketplace.jobs.models import Job
from marketplace.workers.models import Device
from marketplace.workers.trust import trust_reset
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_replace
from worker_agent.protocol import b64decode, is_sha256_hex, result_message

MAX_METRICS_KEYS = 32
MAX_METRICS_BYTES = 4096  # canonical JSON: what is stored per report, whatever the agent sent
MAX_METRIC_TEXT = 256
METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
# Names the marketplace used, or may use, for its own markers: an agent may not send them.
RESERVED_METRICS = frozenset({"disputes_known_answer", "known_answer", "audit", "canonical", "valid", "trusted"})
@dataclass(frozen=True)
class LeaseRow:
    """A result as a report judges it: read by leases_for_report, in one statement."""

    result_id: int
    unit_id: int
    job_id: int
    state: str
    device_id: int | None
    live: bool  # in progress with a lease that has not run out at the report's `now`
    payload: dict[str, Any]  # the unit's
    spec: dict[str, Any]  # the job's
    possessed: bool = False  # the device holds the output named (only when one was named)
    summary: dict[str, Any] | None = None  # that output's tensor summary, when one was kept


def _tables() -> dict[str, str]:
    quote = connection.ops.quote_name
    job = Job
    return {"result": quote(Result._meta.db_table), "unit": quote(WorkUnit._meta.db_table),
            "job": quote(job._meta.db_table), "held": quote(Artifact.devices.through._meta.db_table),
            "header": quote(TensorHeader._meta.db_table)}


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def leases_for_report(*, device: Device, result_ids: list[int], now: datetime, output_sha256: str | None = None,
                      lock: bool = False) -> dict[int, LeaseRow]:
    """The results with what a report checks, by id. With `output_sha256`, each row also says whether this
    device holds those bytes and carries their tensor summary. With `lock` (inside a transaction), the units'
    rows are locked, in id order (PostgreSQL: FOR UPDATE OF the unit; SQLite serializes writers anyway).

    Raw SQL on purpose: this is the hot path's one read, and the ORM spent 3 ms of CPU building and compiling
    it (the Exists and Subquery annotations) for 0.2 ms of database time (bench/report_cost.py)."""
    # An id no bigint can hold names no row (the URL's <int:> takes any digits): asked, the database would
    # refuse the parameter with an error, not answer "none".
    result_ids = [pk for pk in result_ids if 0 < pk < 2**63]
    if not result_ids:
        return {}
    t = _tables()
    output = (f"EXISTS (SELECT 1 FROM {t['held']} d WHERE d.artifact_id = %s AND d.device_id = %s), "
              f"(SELECT h.summary FROM {t['header']} h WHERE h.artifact_id = %s)") if output_sha256 else "NULL, NULL"
    sql = (f"SELECT r.id, r.unit_id, r.job_id, r.state, r.device_id, "
           f"(r.state = %s AND r.lease_expires_at IS NOT NULL AND r.lease_expires_at >= %s), u.payload, j.spec, {output} "
           f"FROM {t['result']} r JOIN {t['unit']} u ON u.id = r.unit_id JOIN {t['job']} j ON j.id = r.job_id "
           f"WHERE r.id IN ({', '.join(['%s'] * len(result_ids))})")
    params: list[Any] = [Result.State.IN_PROGRESS, connection.ops.adapt_datetimefield_value(now)]
    if output_sha256:
        params += [output_sha256, device.pk, output_sha256]
    params += result_ids
    if lock and connection.features.has_select_for_update_of:
        sql += " ORDER BY r.unit_id FOR UPDATE OF u"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return {row[0]: LeaseRow(result_id=row[0], unit_id=row[1], job_id=row[2], state=row[3], device_id=row[4],
                             live=bool(row[5]), payload=_json(row[6]), spec=_json(row[7]), possessed=bool(row[8]),
                             summary=_json(row[9]) if row[9] is not None else None) for row in rows}


def lease_problem(row: LeaseRow | None, *, device: Device, result_id: int) -> ApplicationError | None:
    """Why this device may not report (or give up, or hand back) this result now, or None."""
    if row is None:
        return NotFound(f"no result {result_id}")
    if row.device_id != device.pk:
        return Forbidden(f"result {result_id} is not leased to this device")
    if row.state in (Result.State.REPORTED, Result.State.VALID, Result.State.INVALID):
        return AlreadyReported(f"result {result_id} was already reported")
    if row.state == Result.State.CANCELLED:  # its job was cancelled (workunits/cancel.py): never paid
        return LeaseCancelled(f"result {result_id} was cancelled with its job; drop the unit, nothing is paid for it")
    # A lease sets lease_expires_at with the state: in progress without one cannot be, and would read as expired.
    if not row.live:
        return LeaseExpired(f"the lease on result {result_id} expired; the unit was given to another device")
    return None


def _leased_result(*, device: Device, result_id: int) -> Result:
    result = Result.objects.select_related("unit", "job").filter(pk=result_id).first()
    now = timezone.now()
    row = None if result is None else LeaseRow(
        result_id=result.pk, unit_id=result.unit_id, job_id=result.job_id, state=result.state, device_id=result.device_id,
        live=(result.state == Result.State.IN_PROGRESS and result.lease_expires_at is not None
              and result.lease_expires_at >= now),
        payload=result.unit.payload, spec=result.job.spec)
    if problem := lease_problem(row, device=device, result_id=result_id):
        raise problem
    assert result is not None
    return result


def check_signature(device: Device, row: LeaseRow, output_sha256: str, signature_b64: Any) -> bytes:
    message = result_message(
        result_id=row.result_id, unit_id=row.unit_id, device_id=device.pk, output_sha256=output_sha256
    )
    try:
        signature = b64decode(signature_b64)
        Ed25519PublicKey.from_public_bytes(bytes(device.public_key)).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError, AttributeError):
        raise ValidationFailed(
            "the signature does not verify with this device's key over this lease, unit and output",
            fields={"signature": "invalid"},
        ) from None
    return signature


def check_output_sha256(output_sha256: Any) -> str:
    if not is_sha256_hex(output_sha256):
        raise ValidationFailed("output_sha256 must be 64 lowercase hex digits", fields={"output_sha256": "invalid"})
    return str(output_sha256)


def not_possessed() -> ValidationFailed:
    # Possession, not knowledge of a hash: naming bytes another device uploaded would be a free ride.
    return ValidationFailed("upload the output artifact from this device before reporting it",
                            fields={"output_sha256": "not uploaded by this device"})


def check_output_summary(row: LeaseRow, summary: TensorSummary) -> None:
    """The unit's kind judges the output by its summary (shape, dtype, finiteness, sample count)."""
    allow_nonfinite = bool(row.spec.get("allow_nonfinite", False))
    try:
        kind_module(row.payload["kind"]).check_summary(row.payload, summary, allow_nonfinite=allow_nonfinite)
    except TensorFileError as exc:
        raise ValidationFailed(f"the output is refused: {exc}", fields={"output_sha256": str(exc)}) from None


def _metric_value_ok(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) < 2**63
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_METRIC_TEXT


def check_extras(elapsed_seconds: Any, metrics: Any) -> dict[str, Any]:
    """The report's information-only fields, checked and bounded; returns the metrics to store."""
    if elapsed_seconds is not None and (
        isinstance(elapsed_seconds, bool) or not isinstance(elapsed_seconds, int | float)
        or not math.isfinite(elapsed_seconds) or elapsed_seconds < 0
    ):
        raise ValidationFailed("elapsed_seconds must be a non-negative number", fields={"elapsed_seconds": "invalid"})
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS_KEYS:
        raise ValidationFailed(f"metrics must be an object of at most {MAX_METRICS_KEYS} keys", fields={"metrics": "invalid"})
    problems = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not METRIC_NAME.match(name):
            problems[f"metrics.{str(name)[:64]}"] = "a name of 1-64 letters, digits, '_', '.', '-', starting with a letter"
        elif name.lower() in RESERVED_METRICS:
            problems[f"metrics.{name}"] = "is reserved for the marketplace"
        elif not _metric_value_ok(value):
            problems[f"metrics.{name}"] = f"must be a finite number, true/false, null or a text of at most {MAX_METRIC_TEXT}"
    if problems:
        raise ValidationFailed("metrics are information only: plain names and scalar values", fields=problems)
    if len(json.dumps(metrics, separators=(",", ":"))) > MAX_METRICS_BYTES:
        raise ValidationFailed(f"metrics must be at most {MAX_METRICS_BYTES} bytes of JSON", fields={"metrics": "too large"})
    return metrics


def result_report(
    *,
    device: Device,
    result_id: int,
    output_sha256: Any,
    signature_b64: Any,
    elapsed_seconds: Any = None,
    metrics: Any = None,
) -> Result:
    """Accept a signed output for a live lease and queue the unit for validation."""
    now = timezone.now()
    with transaction.atomic():
        # The unit row is locked with the load: a concurrent report of another replica waits here, and then
        # its count (units_mark_due) sees this one reported; otherwise both could skip validation and nobody
        # would run it. Nothing slow runs under the lock: the output file is not read.
        row = leases_for_report(device=device, result_ids=[result_id], now=now, lock=True,
                                output_sha256=output_sha256 if is_sha256_hex(output_sha256) else None).get(result_id)
        if problem := lease_problem(row, device=device, result_id=result_id):
            raise problem
        assert row is not None
        metrics = check_extras(elapsed_seconds, {} if metrics is None else metrics)
        check_output_sha256(output_sha256)
        if not row.possessed:
            raise not_possessed()
        check_output_summary(row, TensorSummary.from_json(row.summary) if row.summary else tensor_summary_of(output_sha256))
        signature = check_signature(device, row, output_sha256, signature_b64)
        moved = results_move_reported(device=device, now=now, reports=[
            ReportedOutput(result_id=result_id, output_sha256=output_sha256, signature=signature,
                           elapsed_seconds=elapsed_seconds, metrics=metrics)])
        if not moved:
            raise LeaseExpired(f"the lease on result {result_id} expired before the report arrived")
        units_mark_due([row.unit_id])
    return Result(pk=result_id, unit_id=row.unit_id, job_id=row.job_id, device=device, state=Result.State.REPORTED, output_id=output_sha256,
                  signature=signature, reported_at=now, elapsed_seconds=elapsed_seconds, metrics=metrics)


@dataclass(frozen=True)
class ReportedOutput:
    """What a report writes on its result, once every check passed."""

    result_id: int
    output_sha256: str
    signature: bytes
    elapsed_seconds: float | None
    metrics: dict[str, Any]


# PostgreSQL infers a VALUES list's column types from its first row: these say them (SQLite needs none).
_VALUE_TYPES = ("bigint", "varchar(64)", "bytea", "double precision", "jsonb")


def results_move_reported(*, device: Device, now: datetime, reports: list[ReportedOutput]) -> set[int]:
    """Move the results to reported in one conditional UPDATE, each with its own output, signature, time and
    metrics; returns the ids moved. Only a result still in progress on a live lease of this device moves, so
    a report moves a result exactly once, and one whose lease ran out (or was swept) since it was checked
    stays as it is. One statement for a batch of any size: `UPDATE ... FROM (VALUES ...)` (PostgreSQL, and
    SQLite since 3.33), where Django's bulk_update built a CASE per field and row and spent 100 ms of CPU
    compiling it for 50 rows (bench/report_cost.py)."""
    if not reports:
        return set()
    t = _tables()
    typed = connection.vendor == "postgresql"
    first = "(" + ", ".join(f"CAST(%s AS {kind})" if typed else "%s" for kind in _VALUE_TYPES) + ")"
    rows = ", ".join([first] + ["(%s, %s, %s, %s, %s)"] * (len(reports) - 1))
    sql = (f"WITH v (id, output_id, signature, elapsed_seconds, metrics) AS (VALUES {rows}) "
           f"UPDATE {t['result']} SET state = %s, reported_at = %s, output_id = v.output_id, signature = v.signature, "
           f"elapsed_seconds = v.elapsed_seconds, metrics = v.metrics FROM v "
           f"WHERE {t['result']}.id = v.id AND {t['result']}.device_id = %s AND {t['result']}.state = %s "
           f"AND {t['result']}.lease_expires_at >= %s RETURNING {t['result']}.id")
    stamp = connection.ops.adapt_datetimefield_value(now)
    params: list[Any] = []
    for report in reports:
        params += [report.result_id, report.output_sha256, report.signature, report.elapsed_seconds,
                   json.dumps(report.metrics)]
    params += [Result.State.REPORTED, stamp, device.pk, Result.State.IN_PROGRESS, stamp]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0] for row in cursor.fetchall()}


def units_mark_due(unit_ids: list[int]) -> list[int]:
    """Mark the units whose validation is due and queue each once, after commit; returns them. One statement.

    Due: validating now could decide or move the unit. A replicated unit with fewer answers than its quorum and
    enough replicas still out only waits: validating it would find nothing to do (about half of all
    validations). Whatever later stops a replica from answering (expiry, giving up, a ban) issues a
    replacement or queues the unit for validation itself (replicas.replica_issue).

    Runs inside the transaction that moved the results, after it locked their units: the counts are read by a
    statement that starts after the lock was taken, so they see every other report committed before, and a
    report after this one waits for the lock and then counts this one. Raw SQL for the reason
    leases_for_report gives (the ORM's correlated subqueries cost 4.7 ms of CPU to build)."""
    if not unit_ids:
        return []
    t = _tables()

    def count(states: int) -> str:
        marks = ", ".join(["%s"] * states)
        return f"(SELECT COUNT(*) FROM {t['result']} c WHERE c.unit_id = {t['unit']}.id AND c.state IN ({marks}))"

    answered, out = count(len(ANSWERED)), count(len(OUT))
    sql = (f"UPDATE {t['unit']} SET need_validate = %s WHERE id IN ({', '.join(['%s'] * len(unit_ids))}) "
           f"AND (state <> %s OR known_answer_of_id IS NOT NULL OR quorum < 2 OR {answered} >= quorum "
           f"OR {out} < quorum - {answered}) RETURNING id")
    params: list[Any] = [True, *unit_ids, WorkUnit.State.PENDING, *ANSWERED, *OUT, *ANSWERED]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        due = sorted(row[0] for row in cursor.fetchall())
    if due:
        enqueue_coalesced_on_commit("workunits.validate_waiting")  # one message per burst of reports
    return due


ANSWERED = (Result.State.REPORTED, Result.State.VALID)
OUT = (Result.State.UNSENT, Result.State.IN_PROGRESS)


def result_fail(*, device: Device, result_id: int, error: Any) -> Result:
    """The agent could not compute the unit: free the lease now so another device gets a replica. Giving up
    costs the device: a cool-down before it leases again, its trust run for the kind starts over, and the
    give-up is counted (visible in the API and the admin). Its owner never gets this unit again, and a unit
    fails its job only once devices of several owners gave up on it (replicas.replica_replace)."""
    if not isinstance(error, str) or len(error) > 4000:
        raise ValidationFailed("error must be a text of at most 4000 characters", fields={"error": "invalid"})
    result = _leased_result(device=device, result_id=result_id)
    now = timezone.now()
    with transaction.atomic():
        moved = Result.objects.filter(pk=result.pk, device=device, state=Result.State.IN_PROGRESS).update(
            state=Result.State.CLIENT_ERROR, error=error, reported_at=now
        )
        if moved != 1:
            raise LeaseExpired(f"the lease on result {result_id} is no longer held")
        Device.objects.filter(pk=device.pk).update(
            gave_up=F("gave_up") + 1, cooldown_until=now + timedelta(seconds=settings.IDLEGRID_GIVE_UP_COOLDOWN_SECONDS)
        )
        trust_reset(device_id=device.pk, kind=result.job.kind, reason="it gave up on a unit")
        replica_replace(unit_id=result.unit_id, reason=f"a device gave up: {error[:200]}", gave_up_owner=device.owner_id)
    result.state = Result.State.CLIENT_ERROR
    return result


def result_release(*, device: Device, result_id: int) -> Result:
    """The agent hands back a lease it never started (it is shutting down): a replacement replica is issued
    at once. Free of the give-up's costs (an honest agent that stops every evening keeps its trust), and
    harmless: the owner is kept off the unit from now on, and a release counts towards nothing that fails
    a job. Counted on the device."""
    result = _leased_result(device=device, result_id=result_id)
    with transaction.atomic():
        moved = Result.objects.filter(pk=result.pk, device=device, state=Result.State.IN_PROGRESS).update(
            state=Result.State.RELEASED, reported_at=timezone.now()
        )
        if moved != 1:
            raise LeaseExpired(f"the lease on result {result_id} is no longer held")
        Device.objects.filter(pk=device.pk).update(released=F("released") + 1)
        replica_replace(unit_id=result.unit_id, reason="a device handed it back")
    result.state = Result.State.RELEASED
    return result
