"""Validation by redundant computation: a unit is done when `quorum` results from devices of different
owners agree; agreeing results are valid, the others invalid; disagreement issues another replica.
A unit whose first lease went to a trusted device has quorum 1 (accepted on its word) unless it was
chosen for an audit; a wrong audited or known-answer result, or a valid result later overturned, bans
the device (see marketplace/workers/trust.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from marketplace.artifacts.storage import get_storage
from marketplace.jobs.kinds import kind_module
from marketplace.ledger import hooks as ledger_hooks
from marketplace.workers.models import Device
from marketplace.workers.trust import audit_passed, device_ban, is_trusted, trust_credit, trust_reset, trusted_devices
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_issue, unit_error
from marketplace.workunits.reverify import job_reopen

log = logging.getLogger(__name__)
DISPUTE = "disputes_known_answer"  # marks a challenger's answer counted on the original unit


def _agree(spec: dict, kind: str, a: Result, b: Result) -> bool:
    if a.output_id == b.output_id:
        return True  # same bytes: exact agreement without reading anything
    storage = get_storage()
    same_class = a.hardware_class == b.hardware_class != ""  # inside one class: bitwise (class_exact)
    return kind_module(kind).outputs_agree(
        spec, storage.path(a.output_id), storage.path(b.output_id), same_class=same_class
    )


def _group(spec: dict, kind: str, results: Sequence[Result]) -> list[list[Result]]:
    groups: list[list[Result]] = []
    for result in results:
        for group in groups:
            if _agree(spec, kind, group[0], result):
                group.append(result)
                break
        else:
            groups.append([result])
    return groups


def _judge(results: Sequence[Result], state: str, *, accepted_alone: bool = False) -> None:
    if not results:
        return
    Result.objects.filter(pk__in=[r.pk for r in results], state=Result.State.REPORTED).update(
        state=state, accepted_alone=accepted_alone
    )
    counter = "valid_results" if state == Result.State.VALID else "invalid_results"
    if state == Result.State.VALID:
        ledger_hooks.results_valid([r.pk for r in results])  # after commit; idempotent per result
    for result in results:
        Device.objects.filter(pk=result.device_id).update(**{counter: F(counter) + 1})


def unit_validate(*, unit_id: int) -> str:
    """Judge a unit's reported results. Safe to run twice and concurrently (the unit row is locked)."""
    with transaction.atomic():
        unit = WorkUnit.objects.select_for_update().select_related("job").get(pk=unit_id)
        WorkUnit.objects.filter(pk=unit_id).update(need_validate=False)
        reported = list(unit.results.filter(state=Result.State.REPORTED).order_by("reported_at", "pk"))
        if unit.state == WorkUnit.State.DONE:
            _judge_late(unit, reported)
            return "done"
        if unit.state == WorkUnit.State.ERROR or not reported:
            return unit.state
        if unit.known_answer_of_id is not None:
            return _judge_known_answer(unit, reported)
        return _seek_quorum(unit, reported)


def _judge_late(unit: WorkUnit, reported: list[Result]) -> None:
    """A replica reported after the unit was decided is judged against the canonical result."""
    canonical = Result.objects.get(pk=unit.canonical_result_id)
    agreeing = [r for r in reported if _agree(unit.job.spec, unit.job.kind, canonical, r)]
    _judge(agreeing, Result.State.VALID)
    for result in agreeing:
        trust_credit(device_id=result.device_id, kind=unit.job.kind, hardware_class=result.hardware_class)
    wrong = [r for r in reported if r not in agreeing]
    _judge(wrong, Result.State.INVALID)
    for result in wrong:
        trust_reset(device_id=result.device_id, kind=unit.job.kind, reason="an invalid result")


def _judge_known_answer(unit: WorkUnit, reported: list[Result]) -> str:
    """A known-answer unit: the answer is the original unit's canonical result. Wrong is a failed audit."""
    original = WorkUnit.objects.select_related("job", "canonical_result").get(pk=unit.known_answer_of_id)
    kind = original.job.kind
    for result in reported:
        if original.canonical_result is not None and _agree(original.job.spec, kind, original.canonical_result, result):
            _judge([result], Result.State.VALID)
            trust_credit(device_id=result.device_id, kind=kind, hardware_class=result.hardware_class)
            audit_passed(device_id=result.device_id)
            WorkUnit.objects.filter(pk=unit.pk, state=WorkUnit.State.PENDING).update(
                state=WorkUnit.State.DONE, canonical_result=result, finished_at=timezone.now()
            )
        else:
            _dispute(unit, original, result)
            return "disputed"
    return "done"


def _dispute(copy: WorkUnit, original: WorkUnit, challenger: Result) -> None:
    """A known answer is only as good as the quorum that made it (colluders may have made it). A different
    answer reopens the original unit, counts the challenger's answer there, and requires one owner more
    than vouched for the old answer; whoever loses the re-decision is banned: the challenger, or the
    devices that vouched for a wrong answer (see _accept)."""
    vouching = original.results.filter(state=Result.State.VALID).values("owner_id").distinct().count()
    reopened = WorkUnit.objects.filter(pk=original.pk, state=WorkUnit.State.DONE).update(
        state=WorkUnit.State.PENDING, canonical_result=None, finished_at=None, quorum=vouching + 1,
        replication_decided=True, max_results=F("max_results") + vouching + 2,
    )
    Result.objects.create(
        unit=original, job_id=original.job_id, state=Result.State.REPORTED, device_id=challenger.device_id,
        owner_id=challenger.owner_id, hardware_class=challenger.hardware_class, leased_at=challenger.leased_at,
        lease_expires_at=challenger.lease_expires_at, reported_at=challenger.reported_at,
        output_id=challenger.output_id, signature=challenger.signature, metrics={DISPUTE: copy.pk},
    )
    if not reopened:  # already being re-decided: the challenger's answer simply joins that decision
        return
    job_reopen(original.job_id)
    for _ in range(vouching):
        replica_issue(unit_id=original.pk, reason="a known answer was disputed")


def _known_answer_resolve(copy_id: int, *, right: bool) -> None:
    """The dispute over a known answer is settled: judge the challenger's answer on the copy accordingly."""
    copy = WorkUnit.objects.get(pk=copy_id)
    answer = copy.results.filter(state=Result.State.REPORTED).first()
    if answer is None:
        return
    Result.objects.filter(pk=answer.pk).update(state=Result.State.VALID if right else Result.State.INVALID)
    if right:
        trust_credit(device_id=answer.device_id, kind=copy.job.kind, hardware_class=answer.hardware_class)
        audit_passed(device_id=answer.device_id)
    WorkUnit.objects.filter(pk=copy_id, state=WorkUnit.State.PENDING).update(
        state=WorkUnit.State.DONE if right else WorkUnit.State.ERROR, finished_at=timezone.now(),
        canonical_result=answer if right else None, error="" if right else "a wrong answer to a known-answer unit",
    )


def _seek_quorum(unit: WorkUnit, reported: list[Result]) -> str:
    kind = unit.job.kind
    if unit.quorum == 1 and not all(is_trusted(device_id=r.device_id, kind=kind) for r in reported):
        # Left to one trusted device's word, but that device lost its trust since: replicate after all.
        unit.quorum = max(2, unit.job.spec.get("quorum", 2))
        WorkUnit.objects.filter(pk=unit.pk).update(quorum=unit.quorum)
    vouched = list(unit.results.filter(state=Result.State.VALID).exclude(device__state=Device.State.BANNED))
    groups = _group(unit.job.spec, kind, vouched + reported)
    # Most owners wins; between as many, the answer a trusted device vouches for.
    best = max(groups, key=lambda g: (len({r.owner_id for r in g}), len(groups) > 1 and _confirmed(unit, g, kind)))
    owners = len({r.owner_id for r in best})
    outstanding = unit.results.filter(state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS)).count()
    if owners >= unit.quorum and not _confirmed(unit, best, kind):
        # Devices on probation (every new Sybil identity among them) may not decide a unit among
        # themselves once trusted devices exist: one more replica, up to the cap, for a trusted one to confirm.
        if outstanding or replica_issue(unit_id=unit.pk, reason="no trusted device confirms the answer"):
            return "pending"
    if owners >= unit.quorum:
        _accept(unit, best, [r for group in groups if group is not best for r in group])
        return "done"
    for _ in range(max(0, unit.quorum - owners - outstanding)):
        if not replica_issue(unit_id=unit.pk, reason="results disagree"):
            break
    if outstanding == 0 and unit.results.filter(state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS)).count() == 0:
        unit_error(unit_id=unit.pk, reason=f"no {unit.quorum} agreeing results from different owners")
        return "error"
    return "pending"


def _confirmed(unit: WorkUnit, agreeing: list[Result], kind: str) -> bool:
    """Whether a quorum of a replicated unit may decide it: it includes a device trusted for the kind, or
    too few devices are trusted yet for that to be asked (a cold start), or the rule is switched off."""
    if unit.quorum < 2 or not settings.IDLEGRID_TRUSTED_CONFIRMATION:
        return True
    if any(is_trusted(device_id=r.device_id, kind=kind) for r in agreeing):
        return True
    pool = settings.IDLEGRID_TRUSTED_POOL_MIN
    return trusted_devices(kind=kind, at_most=pool) < pool


def _colluders(losers: list[Result]) -> list[Result]:
    """Losing results whose exact bytes a device of another owner also sent. Honest devices agree with the
    winning answer (inside a class bitwise, across classes within the tolerance); two owners sending the same
    wrong bytes against an answer a trusted device vouched for is collusion, not float noise."""
    owners_by_output: dict[str, set[int]] = {}
    for result in losers:
        owners_by_output.setdefault(result.output_id, set()).add(result.owner_id)
    return [r for r in losers if len(owners_by_output[r.output_id]) >= 2]


def _accept(unit: WorkUnit, agreeing: list[Result], losers: list[Result]) -> None:
    from marketplace.jobs.services import job_merge_if_done

    kind, alone = unit.job.kind, unit.quorum == 1
    audited = unit.results.order_by("pk").values_list("pk", flat=True).first() if unit.audit else None
    # A ban needs the winning answer vouched for by a device already trusted: two colluders of different
    # owners outvote one honest device, and banning it on their word would also re-verify all its work.
    proven = bool(losers) and any(is_trusted(device_id=r.device_id, kind=kind) for r in agreeing)
    newly_valid = [r for r in agreeing if r.state == Result.State.REPORTED]
    _judge(newly_valid, Result.State.VALID, accepted_alone=alone)
    for result in newly_valid:
        if not alone:
            trust_credit(device_id=result.device_id, kind=kind, hardware_class=result.hardware_class)
        if result.pk == audited:
            audit_passed(device_id=result.device_id)
        if DISPUTE in result.metrics:
            _known_answer_resolve(result.metrics[DISPUTE], right=True)
    _judge([r for r in losers if r.state == Result.State.REPORTED], Result.State.INVALID)
    colluders = {r.pk for r in _colluders(losers)} if proven else set()
    for result in losers:
        trust_reset(device_id=result.device_id, kind=kind, reason="an invalid result")
        if result.pk == audited:
            if proven:
                device_ban(device_id=result.device_id, reason=f"failed the audit of unit {unit.pk}")
        elif DISPUTE in result.metrics:
            _known_answer_resolve(result.metrics[DISPUTE], right=False)
            if proven:
                device_ban(device_id=result.device_id, reason=f"wrong answer to known-answer unit {result.metrics[DISPUTE]}")
        elif result.state == Result.State.VALID:  # vouched for before, now shown wrong: it colluded
            Result.objects.filter(pk=result.pk, state=Result.State.VALID).update(state=Result.State.INVALID)
            if proven:
                device_ban(device_id=result.device_id, reason=f"its accepted result for unit {unit.pk} was overturned")
        elif result.pk in colluders:
            device_ban(device_id=result.device_id, reason=f"sent the same wrong answer as another owner for unit {unit.pk}")
    WorkUnit.objects.filter(pk=unit.pk, state=WorkUnit.State.PENDING).update(
        state=WorkUnit.State.DONE, canonical_result=min(agreeing, key=lambda r: r.pk), finished_at=timezone.now()
    )
    unit.results.filter(state=Result.State.UNSENT).update(state=Result.State.CANCELLED)
    job_merge_if_done(job_id=unit.job_id)
