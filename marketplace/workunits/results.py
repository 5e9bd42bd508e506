"""Agents report results, give up on them, or hand them back unstarted: each a conditional state move on
one row. What an agent sends is data: the report's `metrics` are information only (bounded, reserved names
refused), the output must be one the device itself uploaded, and no field of it steers verification."""

from __future__ import annotations

import json
import math
import re
from datetime import timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from marketplace.artifacts.models import Artifact
from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import (
    AlreadyReported,
    Forbidden,
    LeaseCancelled,
    LeaseExpired,
    NotFound,
    ValidationFailed,
)
from marketplace.core.tasks import enqueue_on_commit
from marketplace.core.tensors import TensorFileError
from marketplace.jobs.kinds import kind_module
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


def _leased_result(*, device: Device, result_id: int) -> Result:
    result = Result.objects.select_related("unit", "job").filter(pk=result_id).first()
    if result is None:
        raise NotFound(f"no result {result_id}")
    if result.device_id != device.pk:
        raise Forbidden(f"result {result_id} is not leased to this device")
    if result.state in (Result.State.REPORTED, Result.State.VALID, Result.State.INVALID):
        raise AlreadyReported(f"result {result_id} was already reported")
    if result.state == Result.State.CANCELLED:  # its job was cancelled (workunits/cancel.py): never paid
        raise LeaseCancelled(f"result {result_id} was cancelled with its job; drop the unit, nothing is paid for it")
    # A lease sets lease_expires_at with the state: in progress without one cannot be, and would read as expired.
    if (result.state != Result.State.IN_PROGRESS or result.lease_expires_at is None
            or result.lease_expires_at < timezone.now()):
        raise LeaseExpired(f"the lease on result {result_id} expired; the unit was given to another device")
    return result


def _check_signature(device: Device, result: Result, output_sha256: str, signature_b64: Any) -> bytes:
    message = result_message(
        result_id=result.pk, unit_id=result.unit_id, device_id=device.pk, output_sha256=output_sha256
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


def _check_output(device: Device, result: Result, output_sha256: Any) -> None:
    if not is_sha256_hex(output_sha256):
        raise ValidationFailed("output_sha256 must be 64 lowercase hex digits", fields={"output_sha256": "invalid"})
    # Possession, not knowledge of a hash: naming bytes another device uploaded would be a free ride.
    if not Artifact.devices.through.objects.filter(artifact_id=output_sha256, device_id=device.pk).exists():
        raise ValidationFailed("upload the output artifact from this device before reporting it",
                               fields={"output_sha256": "not uploaded by this device"})
    allow_nonfinite = bool(result.job.spec.get("allow_nonfinite", False))
    try:
        with get_storage().local_path(output_sha256) as path:
            kind_module(result.unit.payload["kind"]).check_output(
                result.unit.payload, path, allow_nonfinite=allow_nonfinite
            )
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


def _check_extras(elapsed_seconds: Any, metrics: Any) -> dict[str, Any]:
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

    result = _leased_result(device=device, result_id=result_id)
    metrics = _check_extras(elapsed_seconds, {} if metrics is None else metrics)
    _check_output(device, result, output_sha256)
    signature = _check_signature(device, result, output_sha256, signature_b64)
    now = timezone.now()
    with transaction.atomic():
        # The unit row is locked first: a concurrent report of another replica waits here, and then its
        # count below sees this one reported (otherwise both could skip validation and nobody would run it).
        unit = WorkUnit.objects.select_for_update().only("state", "quorum", "known_answer_of_id").get(pk=result.unit_id)
        moved = Result.objects.filter(
            pk=result.pk, device=device, state=Result.State.IN_PROGRESS, lease_expires_at__gte=now
        ).update(
            state=Result.State.REPORTED,
            output_id=output_sha256,
            signature=signature,
            reported_at=now,
            elapsed_seconds=elapsed_seconds,
            metrics=metrics,
        )
        if moved != 1:
            raise LeaseExpired(f"the lease on result {result_id} expired before the report arrived")
        if _validation_due(unit):
            WorkUnit.objects.filter(pk=result.unit_id).update(need_validate=True)
            enqueue_on_commit("workunits.validate", result.unit_id)
    result.state = Result.State.REPORTED
    return result


def _validation_due(unit: WorkUnit) -> bool:
    """Whether validating now could decide or move the unit. A replicated unit with fewer answers than its
    quorum and enough replicas still out only waits: validating it would find nothing to do (about half of
    all validations). Whatever later stops a replica from answering (expiry, giving up, a ban) issues a
    replacement or queues the unit for validation itself (replicas.replica_issue)."""
    if unit.state != WorkUnit.State.PENDING or unit.known_answer_of_id is not None or unit.quorum < 2:
        return True
    counts = unit.results.aggregate(
        answered=Count("pk", filter=Q(state__in=(Result.State.REPORTED, Result.State.VALID))),
        out=Count("pk", filter=Q(state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS))),
    )
    answered: int = counts["answered"]
    out: int = counts["out"]
    missing = unit.quorum - answered
    return missing <= 0 or out < missing


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
