"""Why a device gets no work, as far as the device itself decides it: the conditions the agent API's
authentication and the lease policy check before any unit is looked at (marketplace/api/authentication.py
DeviceAuthentication, marketplace/workunits/leasing.py lease_room). What depends on the units waiting (none
it may take, its lease quota full) is marketplace/workunits/availability.py, a layer above this one.

Read-only, for the owner's devices page: a reason is a code, words that say what to do, and a time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from marketplace.workers.models import Device


@dataclass(frozen=True)
class Reason:
    code: str  # banned, disabled, owner_inactive, cooldown, offline, quota, no_work, other_owners
    text: str
    until: datetime | None = None  # when it ends by itself (a cool-down), if it does


def device_refusals(*, device: Device, now: datetime | None = None) -> list[Reason]:
    """What keeps the device from leasing at all, in the order the marketplace checks it."""
    now = now or timezone.now()
    reasons = []
    if device.state == Device.State.BANNED:
        reasons.append(Reason("banned", f"Banned for good: {device.ban_reason or 'it failed an audit'}. "
                                        "Its held earnings were forfeited; enrol an honest device again."))
    elif device.state == Device.State.DISABLED:
        reasons.append(Reason("disabled", "Disabled: the marketplace refuses its requests."))
    if not device.owner.is_active:
        reasons.append(Reason("owner_inactive", "The account that owns it is deactivated: its devices are refused."))
    if device.cooldown_until is not None and device.cooldown_until > now:
        reasons.append(Reason("cooldown", "On cool-down after it gave a unit up: it leases nothing until then.",
                              until=device.cooldown_until))
    return reasons


def device_online(*, device: Device, now: datetime | None = None) -> bool:
    """Seen within IDLEGRID_DEVICE_ONLINE_SECONDS (a lease request or a heartbeat)."""
    now = now or timezone.now()
    window = timedelta(seconds=settings.IDLEGRID_DEVICE_ONLINE_SECONDS)
    return device.last_seen_at is not None and device.last_seen_at >= now - window


def offline_reason(*, device: Device) -> Reason:
    return Reason("offline", "Offline: its agent has not asked for work lately. Start it with `idlegrid-agent run`.")
