"""Design experiments for the sabotage bench: candidate changes to the verification services, patched into
the bench's own process only (the product is untouched), to measure whether a change would close a gap
before anyone builds it. Every figure of a run with --experiment is labelled with it.

- `trusted-quorum`: a replicated unit is decided only when its agreeing group includes a result of a
  device trusted for the kind (while any device is trusted at all: a cold start has none), so devices on
  probation (Sybil colluders among them) can no longer decide units among themselves; another replica is
  issued instead, up to the unit's cap, past which the old rule applies. After a ban, a unit whose
  remaining valid results include a trusted device's keeps its decision (nothing to re-verify there).
- `probation-quota`: a device on probation leases at most one unit per request (BOINC's daily quota for
  new hosts, in the bench's turn-based time), so untrusted devices, whose every unit costs a replica,
  compute a smaller share of the work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PROBATION_QUOTA = 1


def _trusted_in(results: list[Any], kind: str) -> bool:
    from marketplace.workers.trust import is_trusted

    return any(is_trusted(device_id=r.device_id, kind=kind) for r in results)


def _anyone_trusted(kind: str) -> bool:
    from marketplace.workers.models import Device, DeviceTrust

    return DeviceTrust.objects.filter(kind=kind, trusted_since__isnull=False, device__state=Device.State.ACTIVE).exists()


def trusted_quorum() -> None:
    from marketplace.workers.models import Device
    from marketplace.workunits import reverify, verification
    from marketplace.workunits.models import Result

    decide = verification._seek_quorum
    recheck = reverify._unit_recheck

    def seek_quorum(unit: Any, reported: list[Any]) -> str:
        kind = unit.job.kind
        if unit.quorum >= 2 and unit.results_created < unit.max_results and _anyone_trusted(kind):
            vouched = list(unit.results.filter(state=Result.State.VALID).exclude(device__state=Device.State.BANNED))
            groups = verification._group(unit.job.spec, kind, vouched + reported)
            best = max(groups, key=lambda g: len({r.owner_id for r in g}))
            if len({r.owner_id for r in best}) >= unit.quorum and not _trusted_in(best, kind):
                in_flight = unit.results.filter(state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS)).exists()
                if not in_flight:
                    verification.replica_issue(unit_id=unit.pk, reason="no trusted device confirms the quorum")
                return "pending"
        return decide(unit, reported)

    def unit_recheck(*, unit_id: int) -> bool:
        from marketplace.workunits.models import WorkUnit

        unit = WorkUnit.objects.select_related("job").get(pk=unit_id)
        remaining = list(Result.objects.filter(unit=unit, state=Result.State.VALID).exclude(device__state=Device.State.BANNED))
        if unit.state == WorkUnit.State.DONE and unit.known_answer_of_id is None and _trusted_in(remaining, unit.job.kind):
            if not any(r.pk == unit.canonical_result_id for r in remaining):
                WorkUnit.objects.filter(pk=unit.pk).update(canonical_result=min(remaining, key=lambda r: r.pk))
                reverify.job_reopen(unit.job_id)
                return True
            return False
        return recheck(unit_id=unit_id)

    verification._seek_quorum = seek_quorum
    reverify._unit_recheck = unit_recheck


def probation_quota() -> None:
    from marketplace.workers.models import DeviceTrust
    from marketplace.workunits import leasing

    lease = leasing.workunit_lease

    def workunit_lease(*, device: Any, max_units: int) -> list[Any]:
        trusted = DeviceTrust.objects.filter(
            device=device, hardware_class=device.hardware_class, trusted_since__isnull=False
        ).exists()
        return lease(device=device, max_units=max_units if trusted else min(max_units, PROBATION_QUOTA))

    leasing.workunit_lease = workunit_lease


EXPERIMENTS: dict[str, Callable[[], None]] = {"trusted-quorum": trusted_quorum, "probation-quota": probation_quota}


def apply(names: list[str]) -> None:
    for name in names:
        EXPERIMENTS[name]()
