from __future__ import annotations

import hashlib
import json
import logging
import secrets
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from marketplace.accounts.models import EnrollmentToken
from marketplace.core.exceptions import Conflict, Forbidden, RateLimited, ValidationFailed
from marketplace.core.numbers import decimal_parse
from marketplace.core.sql import fetch_prepared
from marketplace.workers.models import Device, HardwareChange
from worker_agent.protocol import b64decode, enroll_message
from worker_agent.wire import Capabilities

# The facts that decide a device's floating-point results; devices equal on all of them form one
# hardware class, inside which results are compared bitwise (docs/protocol.md, "Hardware facts").
# From the agent: os, machine (CPU architecture), cpu_vendor, cpu_model, cpu_flags (vector
# extensions), libc (scalar math functions); from its compute child, which imports torch:
# torch_version (the build), cpu_capability (the kernels ATen dispatches to), device_type, dtype,
# deterministic and num_threads (the determinism switches), matmul_precision, math_env (environment
# variables that steer ATen, oneDNN and MKL), numerics_revision (bumped when the agent's computation
# changes). A fact the agent did not send counts as null. Finer is safe (results of two classes are
# compared by the job's tolerance, still cheap); coarser is not (honest results would disagree).
HARDWARE_CLASS_FACTS = (
    "os", "machine", "cpu_vendor", "cpu_model", "cpu_flags", "libc",
    "torch_version", "cpu_capability", "device_type", "dtype", "deterministic", "num_threads",
    "matmul_precision", "math_env", "numerics_revision",
)
# On a CUDA device (device_type "cuda") the card decides too: "gpu" (name, memory_mb, capability, the
# CUDA version torch was built with) and "cuda_numerics" (cuDNN's version and the determinism switches:
# cudnn deterministic/benchmark, TF32 for matmul and cuDNN, the cuBLAS workspace). They count only when
# sent, so the class of every CPU device stays what it was before GPUs (worker_agent/kinds/_device.py).
GPU_CLASS_FACTS = ("gpu", "cuda_numerics")
# The facts of the machine itself: they do not change under one device key, so a lease request whose
# facts differ on them is refused (the device enrols again as a new device, on probation). Without this a
# device could claim a new class at will and pick, lease by lease, whether its results are compared
# bitwise (inside a class) or within the tolerance (across classes). The software facts (torch, the
# environment) may change, a limited number of times a day, each new class starting on probation.
HARDWARE_PINNED_FACTS = ("os", "machine", "cpu_vendor", "cpu_model", "cpu_flags")
MAX_HARDWARE_JSON = 8192


class HardwareChanged(Conflict):
    code = "hardware_changed"


def pinned_facts(hardware: dict[str, Any]) -> dict[str, Any]:
    facts = {key: hardware.get(key) for key in HARDWARE_PINNED_FACTS}
    if isinstance(facts["cpu_flags"], list) and all(isinstance(flag, str) for flag in facts["cpu_flags"]):
        facts["cpu_flags"] = sorted(set(facts["cpu_flags"]))
    return facts

log = logging.getLogger(__name__)


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def enrollment_token_create(*, owner: AbstractBaseUser) -> tuple[str, EnrollmentToken]:
    """A one-time enrolment token; the plain text is returned once and never stored.

    Rate-limited per account: new devices start on probation, but a flood of fresh identities is how
    a cheater would try to outrun bans (Sybil), so each account gets a few per hour."""
    hour_ago = timezone.now() - timedelta(hours=1)
    recent = EnrollmentToken.objects.filter(owner=owner, created_at__gte=hour_ago)
    if recent.count() >= settings.IDLEGRID_ENROLLMENTS_PER_HOUR:
        oldest = recent.order_by("created_at").values_list("created_at", flat=True).first()
        raise RateLimited(
            f"at most {settings.IDLEGRID_ENROLLMENTS_PER_HOUR} enrolment tokens per hour per account; try again later",
            retry_after=((oldest - hour_ago).total_seconds() if oldest else 3600),
        )
    token = "enr_" + secrets.token_urlsafe(24)
    row = EnrollmentToken.objects.create(
        owner=owner,
        token_hash=_hash_secret(token),
        expires_at=timezone.now() + timedelta(seconds=settings.IDLEGRID_ENROLLMENT_TOKEN_SECONDS),
    )
    return token, row


def hardware_class_of(hardware: dict[str, Any]) -> str:
    """sha256 of exactly the class facts (and the GPU's, when sent), as canonical JSON (sorted keys;
    flag lists sorted)."""
    facts = {key: hardware.get(key) for key in HARDWARE_CLASS_FACTS}
    facts.update({key: hardware[key] for key in GPU_CLASS_FACTS if hardware.get(key) is not None})
    if isinstance(facts["cpu_flags"], list) and all(isinstance(flag, str) for flag in facts["cpu_flags"]):
        facts["cpu_flags"] = sorted(set(facts["cpu_flags"]))
    canonical = json.dumps(facts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _hardware_problem(hardware: Any) -> str | None:
    if not isinstance(hardware, dict) or len(json.dumps(hardware)) > MAX_HARDWARE_JSON:
        return f"an object of at most {MAX_HARDWARE_JSON} bytes of JSON is required"
    return None


def device_hardware_update(*, device: Device, hardware: Any) -> bool:
    """The agent's current facts, sent with a lease request when they changed since it last sent them
    (a new torch, another environment). Stores them and the class they make, before anything is
    leased under the old class. Refused when the machine's own facts differ from those it enrolled with
    (409 hardware_changed), or when its class changed IDLEGRID_HARDWARE_CHANGES_PER_DAY times in the
    last day (429). A new class starts on probation (trust is kept per class). Returns whether anything
    changed; `device` is updated in place."""
    problem = _hardware_problem(hardware)
    if problem:
        raise ValidationFailed("the hardware facts are invalid", fields={"hardware": problem})
    hardware_class = hardware_class_of(hardware)
    if hardware == device.hardware and hardware_class == device.hardware_class:
        return False
    enrolled = Device.objects.values_list("hardware_enrolled", flat=True).get(pk=device.pk)
    changed = sorted(k for k, v in pinned_facts(hardware).items() if enrolled and enrolled.get(k) != v)
    if changed:
        raise HardwareChanged(
            f"this device's {', '.join(changed)} differ from what it enrolled with; enrol the machine again "
            "as a new device", fields={"hardware": f"changed: {', '.join(changed)}"})
    if hardware_class != device.hardware_class:
        day = timezone.now() - timedelta(days=1)
        changes = HardwareChange.objects.filter(device=device, changed_at__gte=day)
        if changes.count() >= settings.IDLEGRID_HARDWARE_CHANGES_PER_DAY:
            oldest = changes.order_by("changed_at").values_list("changed_at", flat=True).first()
            raise RateLimited(f"this device's hardware class changed {settings.IDLEGRID_HARDWARE_CHANGES_PER_DAY} "
                              "times in the last day; keep its software and environment steady",
                              retry_after=((oldest - day).total_seconds() if oldest else 86400))
        HardwareChange.objects.create(device=device, old_class=device.hardware_class, new_class=hardware_class)
        log.info("device %s changed hardware class %s -> %s", device.pk, device.hardware_class[:12], hardware_class[:12])
    Device.objects.filter(pk=device.pk).update(hardware=hardware, hardware_class=hardware_class)
    device.hardware, device.hardware_class = hardware, hardware_class
    return True


def _check_enrollment(*, name: Any, public_key_b64: Any, hardware: Any, proof_b64: Any, token: str) -> bytes:
    fields: dict[str, str] = {}
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 100:
        fields["name"] = "a device name of 1 to 100 characters is required"
    if problem := _hardware_problem(hardware):
        fields["hardware"] = problem
    try:
        public_key = b64decode(public_key_b64)
        if len(public_key) != 32:
            raise ValueError
        key = Ed25519PublicKey.from_public_bytes(public_key)
    except (ValueError, TypeError, AttributeError):
        fields["public_key"] = "must be a raw 32-byte Ed25519 public key, base64"
        key = None
    if key is not None:
        try:
            key.verify(b64decode(proof_b64), enroll_message(token=token, public_key_b64=public_key_b64))
        except (InvalidSignature, ValueError, TypeError, AttributeError):
            fields["proof"] = "is not a signature of the enrolment message by that key"
    if fields:
        raise ValidationFailed("the enrolment request is invalid", fields=fields)
    return public_key


def device_enroll(
    *, token: Any, name: Any, public_key_b64: Any, hardware: Any, proof_b64: Any
) -> tuple[Device, str]:
    """Register a device under the token's owner; the token is spent. Returns (device, device_secret)."""
    if not isinstance(token, str) or not token:
        raise ValidationFailed("an enrolment token is required", fields={"token": "required"})
    public_key = _check_enrollment(
        name=name, public_key_b64=public_key_b64, hardware=hardware, proof_b64=proof_b64, token=token
    )
    secret = secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        row = EnrollmentToken.objects.select_related("owner").filter(token_hash=_hash_secret(token)).first()
        if row is None or row.expires_at < now:
            raise Forbidden("the enrolment token is unknown or expired")
        device = Device.objects.create(
            owner=row.owner,
            name=name.strip(),
            public_key=public_key,
            secret_hash=_hash_secret(secret),
            hardware=hardware,
            hardware_class=hardware_class_of(hardware),
            hardware_enrolled=pinned_facts(hardware),
            last_seen_at=now,
        )
        # Spend the token by conditional UPDATE: of two concurrent enrolments only one wins.
        spent = EnrollmentToken.objects.filter(pk=row.pk, used_at__isnull=True).update(used_at=now, device=device)
        if spent != 1:
            raise Forbidden("the enrolment token was already used")
    return device, secret


# The columns authentication and the agent's hot path read of a device (and of its owner, whether the
# account is active); every agent request fetches them, so it is one prepared statement on PostgreSQL.
_AUTH_FIELDS = ("id", "owner_id", "secret_hash", "state", "public_key", "hardware", "hardware_class",
                "cooldown_until", "last_seen_at", "cap_memory_mb", "cap_gpu_mb", "cap_kinds")
_AUTH_SQL = (f"SELECT {', '.join('d.' + name for name in _AUTH_FIELDS)}, u.is_active FROM workers_device d "
             "JOIN auth_user u ON u.id = d.owner_id WHERE d.id = %(pk)s")


def device_authenticate(*, device_id: str, secret: str) -> Device | None:
    pk = decimal_parse(device_id)  # None for "²" and for 5,000 digits, which int() refuses with a ValueError
    if pk is None or not 0 < pk < 2**63:
        return None
    device = _device_for_auth(pk)
    if device is None or not secrets.compare_digest(device.secret_hash, _hash_secret(secret)):
        return None
    return device


def _device_for_auth(pk: int) -> Device | None:
    """The device with only _AUTH_FIELDS loaded (others load on access, as with .only()) and its owner with
    only id and is_active. On SQLite through the ORM; on PostgreSQL one prepared statement, its values
    converted as the ORM would (jsonb arrives as text, bytea as bytes)."""
    if connection.vendor != "postgresql":
        fields = ("owner__id", "owner__is_active", *_AUTH_FIELDS[2:])
        return Device.objects.select_related("owner").only(*fields).filter(pk=pk).first()
    rows = fetch_prepared(_AUTH_SQL, {"pk": pk})
    if not rows:
        return None
    *values, is_active = rows[0]
    row = dict(zip(_AUTH_FIELDS, values, strict=True))
    if isinstance(row["hardware"], str):
        row["hardware"] = json.loads(row["hardware"])
    row["public_key"] = bytes(row["public_key"])
    # from_db takes the loaded values in the model's field order (the others deferred).
    names = [f.attname for f in Device._meta.concrete_fields if f.attname in row]
    device = Device.from_db(connection.alias, names, [row[name] for name in names])
    user_model = Device._meta.get_field("owner").related_model
    owner_names = [f.attname for f in user_model._meta.concrete_fields if f.attname in ("id", "is_active")]
    owner = {"id": row["owner_id"], "is_active": bool(is_active)}
    device.owner = user_model.from_db(connection.alias, owner_names, [owner[name] for name in owner_names])
    return device


# A device's last request is recorded to this resolution: a lease poll writes at most once per this long.
SEEN_RESOLUTION = timedelta(seconds=30)


def device_seen(*, device: Device, now: datetime | None = None, capabilities: Capabilities | None = None) -> None:
    """Record the device's request now, at most once per SEEN_RESOLUTION: an idle agent polls for work every
    few seconds, and counts as online (landing page, devices page) only if its polls are seen, not only its
    heartbeats. The device row was read to authenticate the request: within SEEN_RESOLUTION of the time it
    holds no statement is sent at all (the lease is the hot path); past it, a conditional UPDATE, so that
    concurrent requests write once. The capabilities a lease request reported are recorded with it (its
    free memory may be up to SEEN_RESOLUTION old; that is only for reports), and at once when the GPU or
    the kinds change (rare: another child, another agent)."""
    now = now or timezone.now()
    caps = _capability_columns(capabilities) if capabilities is not None else {}
    changed = bool(caps) and (caps["cap_gpu_mb"], caps["cap_kinds"]) != (device.cap_gpu_mb, device.cap_kinds)
    if device.last_seen_at is not None and device.last_seen_at >= now - SEEN_RESOLUTION:
        if changed:
            Device.objects.filter(pk=device.pk).update(**caps)
            _set(device, caps)
        return
    device.last_seen_at = now
    written = Device.objects.filter(pk=device.pk).filter(
        Q(last_seen_at__isnull=True) | Q(last_seen_at__lt=now - SEEN_RESOLUTION)).update(last_seen_at=now, **caps)
    if written or changed:
        if not written:
            Device.objects.filter(pk=device.pk).update(**caps)
        _set(device, caps)


def _capability_columns(capabilities: Capabilities) -> dict[str, Any]:
    return {"cap_memory_mb": capabilities.memory_mb, "cap_gpu_mb": capabilities.gpu_memory_mb,
            "cap_kinds": "," + "".join(f"{kind}," for kind in sorted(capabilities.kinds))}


def _set(device: Device, columns: dict[str, Any]) -> None:
    for name, value in columns.items():
        setattr(device, name, value)
