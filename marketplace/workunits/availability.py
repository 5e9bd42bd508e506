"""Why a device gets no work, the part that depends on the units waiting: the same conditions the lease
statement enforces (marketplace/workunits/leasing.py): the device's quota of leases held at once, and the
rule that an owner never gets a second replica of a unit any of its devices touched (so a quorum is made of
different owners). The lease takes any unit of any kind and hardware class: a device is never refused one
for its class (results of two classes are compared within the job's tolerance).

The device-only reasons (banned, disabled, owner inactive, cool-down, offline) are
marketplace/workers/availability.py; `device_outlook` gives both, in the order the marketplace checks them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from marketplace.workers.availability import Reason, device_online, device_refusals, offline_reason
from marketplace.workers.models import Device
from marketplace.workers.trust import lease_cap
from marketplace.workunits.models import Result
from marketplace.workunits.requirements import Capacity, capacity_of


@dataclass(frozen=True)
class Outlook:
    held: int  # leases it holds now
    cap: int  # how many it may hold at once
    online: bool
    reasons: list[Reason]  # empty: it gets work when it asks

    @property
    def gets_work(self) -> bool:
        return not self.reasons



def work_waiting_for(*, owner_id: int) -> tuple[bool, bool]:
    """(any replica waits to be leased at all, one waits that this owner may take): two EXISTS queries."""
    unsent = Result.objects.filter(state=Result.State.UNSENT)
    if not unsent.exists():
        return False, False
    touched = Result.objects.filter(unit_id=OuterRef("unit_id"), owner_id=owner_id)
    return True, unsent.filter(~Exists(touched)).exists()


def device_outlook(*, device: Device, now: datetime | None = None,
                   waiting: tuple[bool, bool] | None = None) -> Outlook:
    """`waiting`: work_waiting_for(owner_id=device.owner_id) when the caller has it (a page of one owner's
    devices asks once)."""
    now = now or timezone.now()
    held = Result.objects.filter(device=device, state=Result.State.IN_PROGRESS).count()
    cap = lease_cap(device=device)
    online = device_online(device=device, now=now)
    reasons = device_refusals(device=device, now=now)
    if not reasons:
        reasons = _work_reasons(device=device, held=held, cap=cap, waiting=waiting)
    if not online and device.state == Device.State.ACTIVE:
        reasons.append(offline_reason(device=device))
    return Outlook(held=held, cap=cap, online=online, reasons=reasons)


def _work_reasons(*, device: Device, held: int, cap: int, waiting: tuple[bool, bool] | None) -> list[Reason]:
    if held >= cap:
        probation = " (a device on probation holds one at a time until it is trusted)" if cap == 1 else ""
        return [Reason("quota", f"Throttled: it holds {held} lease{'s' if held != 1 else ''}, its quota{probation}; "
                                "it gets more as it reports them.")]
    any_waiting, for_this_owner = waiting if waiting is not None else work_waiting_for(owner_id=device.owner_id)
    if not any_waiting:
        return [Reason("no_work", "No jobs it can run: no work unit is waiting in the queue right now.")]
    if not for_this_owner:
        return [Reason("other_owners", "No jobs it can run: every unit waiting was already computed by one of your "
                                       "devices, and each unit needs results from different owners. It waits for new "
                                       "work or for other owners' devices.")]
    if not _fits_some(device=device):
        return [Reason("too_small", "No jobs it can run: the units waiting need more than it reported it has "
                                    f"({_capacity_words(device)}). It gets them once it reports enough.")]
    return []


def _fits_some(*, device: Device) -> bool:
    """Whether a replica this owner may take waits that the device's last reported capabilities fit, as the
    lease matches them (requirements.capacity_of: a device that never reported is matched as an old agent)."""
    if device.cap_memory_mb is None:
        capacity = capacity_of(None)
    else:
        capacity = Capacity(device.cap_memory_mb, device.cap_gpu_mb, tuple(k for k in device.cap_kinds.split(",") if k))
    touched = Result.objects.filter(unit_id=OuterRef("unit_id"), owner_id=device.owner_id)
    gpu = Q(need_gpu_mb=0) if capacity.gpu_mb == 0 else Q(need_gpu_mb__lte=capacity.gpu_mb)
    return Result.objects.filter(
        gpu, state=Result.State.UNSENT, need_memory_mb__lte=capacity.memory_mb, kind__in=capacity.kinds
    ).filter(~Exists(touched)).exists()


def _capacity_words(device: Device) -> str:
    if device.cap_memory_mb is None:
        return "nothing: an agent older than capability reports"
    gpu = f", a GPU with {device.cap_gpu_mb} MB" if device.cap_gpu_mb else ", no GPU"
    kinds = ", ".join(k for k in device.cap_kinds.split(",") if k) or "no kind"
    return f"{device.cap_memory_mb} MB free{gpu}, runs {kinds}"
