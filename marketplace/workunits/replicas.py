"""Issuing replicas of a unit, and what happens when no more can be had.

Two ways a unit gets another replica, counted differently:

- `replica_issue`: the unit needs one more *answer* (results disagree, a trusted device must confirm, a
  ban or a dispute re-decides it). It counts against the unit's cap of results (`max_results`): past
  the cap the unit errors, since that many answers came and no quorum formed.
- `replica_replace`: a replica ended *without an answer* (given up, expired, handed back, freed by a
  ban). The replacement does not count against the cap, so no device can use up a unit's cap by
  leasing and dropping it; owners who gave up or let a lease expire are counted instead, and the unit
  errors (failing its job) only once devices of IDLEGRID_GIVE_UP_OWNERS distinct owners with validated
  work elsewhere did (or three times as many owners of any kind). The lease query keeps every owner off
  a unit it touched, so each owner counts at most once.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from marketplace.core.tasks import enqueue_on_commit
from marketplace.jobs.lifecycle import job_fail
from marketplace.jobs.models import Job
from marketplace.workers.models import Device
from marketplace.workers.trust import replication_choose
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.notify import work_available
from marketplace.workunits.requirements import NEEDS, replica_needs

IN_FLIGHT = (Result.State.UNSENT, Result.State.IN_PROGRESS, Result.State.REPORTED)
GAVE_UP = (Result.State.CLIENT_ERROR, Result.State.EXPIRED)


def _validate_later(unit_id: int) -> None:
    if WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.PENDING).update(need_validate=True):
        enqueue_on_commit("workunits.validate", unit_id)


def replica_issue(*, unit_id: int, reason: str) -> bool:
    """Create one more unsent replica if the unit is pending, its job running and the unit under its cap; else
    error the unit when nothing is left in flight, or queue it for validation when only reported results are.
    Runs inside the caller's transaction. Returns whether a replica was made."""
    # A failed job computes nothing more: its unsent replicas were cancelled, so issue none.
    counted = WorkUnit.objects.filter(
        pk=unit_id, state=WorkUnit.State.PENDING, results_created__lt=F("max_results"), job__state=Job.State.RUNNING
    ).update(results_created=F("results_created") + 1)
    if counted:
        unit = WorkUnit.objects.values("job_id", *NEEDS).get(pk=unit_id)
        Result.objects.create(unit_id=unit_id, job_id=unit["job_id"], **replica_needs(unit))
        work_available()
        return True
    _nothing_more(unit_id, f"{reason}, and the unit reached its cap of results without a quorum")
    return False


def replica_replace(*, unit_id: int, reason: str, gave_up_owner: int | None = None) -> bool:
    """A replica ended without an answer: replace it (uncounted) so the unit is not left short. When the
    owner gave up or let the lease expire (`gave_up_owner`), the unit errors instead once devices of
    IDLEGRID_GIVE_UP_OWNERS distinct owners have. A known-answer copy is never replaced: it was made for
    one device. Runs inside the caller's transaction. Returns whether a replica was made."""
    unit = WorkUnit.objects.only("state", "known_answer_of_id", "job_id", *NEEDS).get(pk=unit_id)
    if unit.state != WorkUnit.State.PENDING:
        return False
    if unit.known_answer_of_id is not None:
        unit_error(unit_id=unit_id, reason=f"{reason} (a known-answer copy: nothing to replace)")
        return False
    if gave_up_owner is not None and _given_up_for_good(unit_id):
        return False
    if not Job.objects.filter(pk=unit.job_id, state=Job.State.RUNNING).exists():
        return False
    Result.objects.create(unit_id=unit_id, job_id=unit.job_id, **replica_needs(unit))
    work_available()  # long-polling agents hear of it at commit (workunits/notify.py)
    return True


def _given_up_for_good(unit_id: int) -> bool:
    """Error the unit if enough owners gave up on it (or let it expire): IDLEGRID_GIVE_UP_OWNERS owners whose
    devices have validated work to show (a give-up from an account that never computed anything right
    costs nothing, so Sybil accounts must not count), or three times as many owners of any kind (so a
    unit that no device can compute still ends, on a network of newcomers too). Returns whether it did."""
    gave_up = Result.objects.filter(unit_id=unit_id, state__in=GAVE_UP).exclude(owner_id=None)
    owners = set(gave_up.values_list("owner_id", flat=True))
    need = settings.IDLEGRID_GIVE_UP_OWNERS
    credible = Device.objects.filter(owner_id__in=owners, valid_results__gt=0).values("owner_id").distinct().count()
    if credible < need and len(owners) < 3 * need:
        return False
    errors = sorted({e[:120] or "lease expired" for e in gave_up.values_list("error", flat=True)})[:5]
    unit_error(unit_id=unit_id, reason=(
        f"devices of {len(owners)} different owners gave up on it or let its lease expire, {credible} of them "
        f"with validated work elsewhere ({'; '.join(errors)})"))
    return True


def _nothing_more(unit_id: int, reason: str) -> None:
    in_flight = Result.objects.filter(unit_id=unit_id, state__in=IN_FLIGHT)
    if not in_flight.exists():
        unit_error(unit_id=unit_id, reason=reason)
    elif not in_flight.exclude(state=Result.State.REPORTED).exists():
        # Only reported results are left and none can be added: validation must decide (quorum or error),
        # or nothing would ever look at this unit again.
        _validate_later(unit_id)


def replication_decide(*, device: Device, unit_ids: list[int]) -> None:
    """At a unit's first lease, choose its replication from the leasing device's trust: a trusted device's
    unit is accepted on its word (quorum 1) unless audited; anyone else's is replicated to the quorum.
    Runs in the lease transaction; the conditional UPDATE makes the choice once per unit."""
    undecided = WorkUnit.objects.filter(pk__in=unit_ids, replication_decided=False).values(
        "pk", "job_id", "quorum", "payload__kind", *NEEDS
    )
    extra: list[Result] = []
    for unit in undecided:
        unit_id, job_id, quorum, kind = unit["pk"], unit["job_id"], unit["quorum"], unit["payload__kind"]
        replicate, audit = replication_choose(device=device, kind=kind)
        more = quorum - 1 if replicate else 0
        decided = WorkUnit.objects.filter(pk=unit_id, replication_decided=False).update(
            replication_decided=True, quorum=quorum if replicate else 1, audit=audit,
            results_created=F("results_created") + more,
        )
        if decided:
            extra += [Result(unit_id=unit_id, job_id=job_id, **replica_needs(unit)) for _ in range(more)]
    if extra:
        Result.objects.bulk_create(extra)
        work_available()  # the unit's other replicas: for other owners' agents, who may be waiting


def unit_error(*, unit_id: int, reason: str) -> None:
    errored = WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.PENDING).update(
        state=WorkUnit.State.ERROR, error=reason, finished_at=timezone.now(), need_validate=False
    )
    if errored:
        Result.objects.filter(unit_id=unit_id, state=Result.State.UNSENT).update(state=Result.State.CANCELLED)
        unit = WorkUnit.objects.only("job_id", "index", "known_answer_of_id").get(pk=unit_id)
        if unit.known_answer_of_id is not None:
            return  # a known-answer copy that came to nothing costs its job nothing
        job_fail(job_id=unit.job_id, reason=f"unit #{unit.index} failed: {reason}")
