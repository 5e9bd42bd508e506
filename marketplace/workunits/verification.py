"""Validation by redundant computation: a unit is done when `quorum` results from devices of different
owners agree; agreeing results are valid, the others invalid; disagreement issues another replica.
A unit whose first lease went to a trusted device has quorum 1 (accepted on its word) unless it was
chosen for an audit; a wrong audited or known-answer result, or a valid result later overturned, bans
the device (see marketplace/workers/trust.py).

A unit may hide some of the submitter's own known answers among its rows (`WorkUnit.hidden_rows`): an
answer that disagrees with them can never decide the unit, and once an answer that agrees with them
decides it, every device that disagreed loses and its owner's other answers are checked again.

Every marker this module keeps is a column the marketplace writes; nothing an agent sends (its report's
`metrics` above all) is read here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.db import OperationalError, transaction
from django.db.models import F
from django.utils import timezone

from marketplace.artifacts.storage import get_storage
from marketplace.jobs.events import job_progress
from marketplace.jobs.kinds import kind_module
from marketplace.jobs.lifecycle import job_merge_if_done
from marketplace.ledger import hooks as ledger_hooks
from marketplace.workers.models import Device
from marketplace.workers.trust import audit_passed, is_trusted, trust_credit, trust_reset, trusted_devices
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_issue, unit_error
from marketplace.workunits.requirements import replica_needs
from marketplace.workunits.reverify import device_ban, owner_answers_recheck, unit_recheck

log = logging.getLogger(__name__)


class _Raced(Exception):
    """A result this validation counted was moved by someone else meanwhile: nothing of it is kept."""


# A lease sets a result's device and owner together and a report its output: every result judged here has
# them, though the columns are nullable (an unsent replica has none).
def _device_of(result: Result) -> int:
    assert result.device_id is not None, f"result {result.pk} was judged without a device"
    return result.device_id


def _owner_of(result: Result) -> int:
    assert result.owner_id is not None, f"result {result.pk} was judged without an owner"
    return result.owner_id


def _output_of(result: Result) -> str:
    assert result.output_id is not None, f"result {result.pk} was judged without an output"
    return result.output_id


def _agree(spec: dict[str, Any], kind: str, a: Result, b: Result) -> bool:
    if a.output_id == b.output_id:
        return True  # same bytes: exact agreement without reading anything
    storage = get_storage()
    same_class = a.hardware_class == b.hardware_class != ""  # inside one class: bitwise (class_exact)
    with storage.local_path(_output_of(a)) as path_a, storage.local_path(_output_of(b)) as path_b:
        agree: bool = kind_module(kind).outputs_agree(spec, path_a, path_b, same_class=same_class)
    return agree


def _known_rows_ok(unit: WorkUnit, results: Sequence[Result]) -> dict[int, bool]:
    """Per result: whether its output agrees with the submitter's known answers hidden in the unit (all
    True for a unit without any). Read once per distinct output."""
    if not unit.hidden_rows:
        return {r.pk: True for r in results}
    storage = get_storage()
    by_output: dict[str | None, bool] = {}
    module = kind_module(unit.job.kind)
    for result in results:
        if result.output_id not in by_output:
            with storage.local_path(_output_of(result)) as path:
                by_output[result.output_id] = module.known_rows_agree(unit.job.spec, unit.hidden_rows, path)
    return {r.pk: by_output[r.output_id] for r in results}


def _group(spec: dict[str, Any], kind: str, results: Sequence[Result], known_ok: dict[int, bool]) -> list[list[Result]]:
    """Results that agree, in groups; an answer that passes the submitter's known rows never shares a
    group with one that fails them."""
    groups: list[list[Result]] = []
    for result in results:
        for group in groups:
            if known_ok[group[0].pk] == known_ok[result.pk] and _agree(spec, kind, group[0], result):
                group.append(result)
                break
        else:
            groups.append([result])
    return groups


def _judge(results: Sequence[Result], state: str, *, accepted_alone: bool = False, strict: bool = False) -> None:
    """Move reported results to valid or invalid, count them on their devices and (valid) credit them.
    `strict`: every one of them must still be reported, or the whole validation is redone (_Raced)."""
    if not results:
        return
    ids = [r.pk for r in results]
    moved = Result.objects.filter(pk__in=ids, state=Result.State.REPORTED).update(state=state, accepted_alone=accepted_alone)
    if strict and moved != len(ids):
        raise _Raced(f"{len(ids) - moved} of results {ids} were moved while they were being judged")
    counter = "valid_results" if state == Result.State.VALID else "invalid_results"
    # A disputed known answer's row on the original unit repeats the copy's answer: counted and paid once,
    # on the copy (_known_answer_resolve).
    own = [r for r in results if r.disputes_known_answer_id is None]
    if state == Result.State.VALID:
        ledger_hooks.results_valid([r.pk for r in own])  # after commit; idempotent per result
    for result in own:
        Device.objects.filter(pk=_device_of(result)).update(**{counter: F(counter) + 1})


def unit_validate(*, unit_id: int) -> str:
    """Judge a unit's reported results. Safe to run twice and concurrently: the unit row and its reported
    results are locked, and if anything this validation counted moved meanwhile (a ban withdrew it), all
    of it rolls back and the unit is queued to be looked at again."""
    try:
        with transaction.atomic():
            return _validate(unit_id)
    except (_Raced, OperationalError) as exc:
        if isinstance(exc, OperationalError) and not _deadlock(exc):
            raise
        # Nothing of this validation was kept; the unit waits for the next one (the sweep, at the latest).
        log.warning("unit %s: validation raced (%s); it will be validated again", unit_id, exc)
        WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.PENDING).update(need_validate=True)
        return "retry"


def _deadlock(exc: OperationalError) -> bool:
    """PostgreSQL chose this transaction to break a deadlock (SQLSTATE 40P01) or a serialization failure."""
    return getattr(exc.__cause__, "sqlstate", None) in ("40P01", "40001")


def _validate(unit_id: int) -> str:
    unit = WorkUnit.objects.select_for_update().select_related("job").get(pk=unit_id)
    WorkUnit.objects.filter(pk=unit_id).update(need_validate=False)
    # Locked: a ban that would withdraw one of these waits until this validation has committed, then
    # withdraws it (reverify), rather than moving it under a decision that counted it.
    reported = list(
        unit.results.select_for_update(of=("self",)).filter(state=Result.State.REPORTED)
        .exclude(device__state=Device.State.BANNED).order_by("reported_at", "pk")
    )
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
    assert unit.canonical_result_id is not None, f"unit {unit.pk} is done without a canonical result"
    canonical = Result.objects.get(pk=unit.canonical_result_id)
    known_ok = _known_rows_ok(unit, reported)
    agreeing = [r for r in reported if known_ok[r.pk] and _agree(unit.job.spec, unit.job.kind, canonical, r)]
    _judge(agreeing, Result.State.VALID)
    for result in agreeing:
        trust_credit(device_id=_device_of(result), kind=unit.job.kind, hardware_class=result.hardware_class)
    wrong = [r for r in reported if r not in agreeing]
    _judge(wrong, Result.State.INVALID)
    for result in wrong:
        trust_reset(device_id=_device_of(result), kind=unit.job.kind, reason="an invalid result")
    _known_rows_failed(unit, [r for r in wrong if not known_ok[r.pk]], proven=_trusted_in([canonical], unit.job.kind))


def _judge_known_answer(unit: WorkUnit, reported: list[Result]) -> str:
    """A known-answer unit: the answer is the original unit's canonical result. Wrong is a failed audit."""
    assert unit.known_answer_of_id is not None, f"unit {unit.pk} is no known-answer copy"
    original = WorkUnit.objects.select_related("job", "canonical_result").get(pk=unit.known_answer_of_id)
    kind = original.job.kind
    for result in reported:
        if original.canonical_result is not None and _agree(original.job.spec, kind, original.canonical_result, result):
            _judge([result], Result.State.VALID)
            trust_credit(device_id=_device_of(result), kind=kind, hardware_class=result.hardware_class)
            audit_passed(device_id=_device_of(result))
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
    devices that vouched for a wrong answer (see _accept). The row counted on the original is marked by
    its own column (never by anything the device sent) and is neither paid nor counted again."""
    Result.objects.create(
        unit=original, job_id=original.job_id, state=Result.State.REPORTED, device_id=challenger.device_id,
        owner_id=challenger.owner_id, hardware_class=challenger.hardware_class, leased_at=challenger.leased_at,
        lease_expires_at=challenger.lease_expires_at, reported_at=challenger.reported_at,
        output_id=challenger.output_id, signature=challenger.signature, disputes_known_answer=copy,
        **replica_needs(original),
    )
    # Already being re-decided: the challenger's answer simply joins that decision.
    unit_recheck(unit_id=original.pk, reason="a known answer was disputed")


def _known_answer_resolve(copy_id: int, *, right: bool) -> None:
    """The dispute over a known answer is settled: judge the challenger's answer on the copy accordingly
    (that row is the computation: it is the one counted and paid)."""
    copy = WorkUnit.objects.select_related("job").get(pk=copy_id)
    answer = copy.results.filter(state=Result.State.REPORTED).first()
    if answer is None:
        return
    _judge([answer], Result.State.VALID if right else Result.State.INVALID)
    if right:
        trust_credit(device_id=_device_of(answer), kind=copy.job.kind, hardware_class=answer.hardware_class)
        audit_passed(device_id=_device_of(answer))
    WorkUnit.objects.filter(pk=copy_id, state=WorkUnit.State.PENDING).update(
        state=WorkUnit.State.DONE if right else WorkUnit.State.ERROR, finished_at=timezone.now(),
        canonical_result=answer if right else None, error="" if right else "a wrong answer to a known-answer unit",
    )


def _seek_quorum(unit: WorkUnit, reported: list[Result]) -> str:
    kind = unit.job.kind
    if unit.quorum == 1 and not all(is_trusted(device_id=_device_of(r), kind=kind) for r in reported):
        # Left to one trusted device's word, but that device lost its trust since: replicate after all.
        unit.quorum = max(2, unit.job.spec.get("quorum", 2))
        WorkUnit.objects.filter(pk=unit.pk).update(quorum=unit.quorum)
    vouched = list(unit.results.select_for_update(of=("self",)).filter(state=Result.State.VALID)
                   .exclude(device__state=Device.State.BANNED))
    considered = vouched + reported
    known_ok = _known_rows_ok(unit, considered)
    groups = _group(unit.job.spec, kind, considered, known_ok)
    # Only an answer that agrees with the submitter's known rows may decide (every answer, without them).
    eligible = [g for g in groups if known_ok[g[0].pk]]
    outstanding = unit.results.filter(state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS)).count()
    if eligible:
        # Most owners wins; between as many, the answer a trusted device vouches for.
        best = max(eligible, key=lambda g: (_owners(g), len(groups) > 1 and _confirmed(unit, g, kind)))
        owners = _owners(best)
        if owners >= unit.quorum and not _confirmed(unit, best, kind):
            # Devices on probation (every new Sybil identity among them) may not decide a unit among
            # themselves once trusted devices exist: one more replica, up to the cap, for a trusted one to confirm.
            if outstanding or replica_issue(unit_id=unit.pk, reason="no trusted device confirms the answer"):
                return "pending"
        if owners >= unit.quorum:
            _accept(unit, best, [r for group in groups if group is not best for r in group], known_ok)
            return "done"
    else:
        owners = 0
    for _ in range(max(0, unit.quorum - owners - outstanding)):
        if not replica_issue(unit_id=unit.pk, reason="results disagree"):
            break
    if outstanding == 0 and unit.results.filter(state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS)).count() == 0:
        _no_quorum(unit, groups, known_ok)
        return "error"
    return "pending"


def _owners(group: Sequence[Result]) -> int:
    return len({r.owner_id for r in group})


def _no_quorum(unit: WorkUnit, groups: list[list[Result]], known_ok: dict[int, bool]) -> None:
    """The unit reached its cap of results without an answer that may decide it. When devices of a quorum
    of owners agreed on an answer the submitter's known rows refused, the known rows are what is wrong:
    that answer is paid (the submitter ordered the work), nobody loses trust, and the job fails saying so."""
    refused = [g for g in groups if not known_ok[g[0].pk] and _owners(g) >= unit.quorum]
    if refused:
        agreed = max(refused, key=_owners)
        _judge([r for r in agreed if r.state == Result.State.REPORTED], Result.State.VALID)
        unit_error(unit_id=unit.pk, reason=(
            f"devices of {_owners(agreed)} owners agreed on an answer that your known answers refuse, and none "
            "agreed with them: check the known answers you submitted"))
        return
    unit_error(unit_id=unit.pk, reason=f"no {unit.quorum} agreeing results from different owners")


def _trusted_in(results: Sequence[Result], kind: str) -> bool:
    return any(is_trusted(device_id=_device_of(r), kind=kind) for r in results)


def _confirmed(unit: WorkUnit, agreeing: list[Result], kind: str) -> bool:
    """Whether a quorum of a replicated unit may decide it: it includes a device trusted for the kind, or
    too few devices are trusted yet for that to be asked (a cold start), or the rule is switched off."""
    if unit.quorum < 2 or not settings.IDLEGRID_TRUSTED_CONFIRMATION:
        return True
    if _trusted_in(agreeing, kind):
        return True
    pool = settings.IDLEGRID_TRUSTED_POOL_MIN
    return trusted_devices(kind=kind, at_most=pool) < pool


def _colluders(losers: list[Result]) -> list[Result]:
    """Losing results whose exact bytes a device of another owner also sent. Honest devices agree with the
    winning answer (inside a class bitwise, across classes within the tolerance); two owners sending the same
    wrong bytes against an answer a trusted device vouched for is collusion, not float noise."""
    owners_by_output: dict[str | None, set[int | None]] = {}
    for result in losers:
        owners_by_output.setdefault(result.output_id, set()).add(result.owner_id)
    return [r for r in losers if len(owners_by_output[r.output_id]) >= 2]


def _known_rows_failed(unit: WorkUnit, failed: list[Result], *, proven: bool) -> None:
    """Devices whose answer disagreed with the submitter's known rows, now that an answer agreeing with them
    decided the unit: they lose (judged invalid by the caller), and each owner's other recent answers are
    checked again by other owners. With a trusted device among the winners, the evidence is strong enough
    for a ban; at a cold start (nobody trusted yet) a hostile submitter and two accounts of its own could
    otherwise frame an honest device, so there the re-check alone must find what the owner did."""
    if not failed:
        return
    Result.objects.filter(pk__in=[r.pk for r in failed]).update(failed_known_rows=True)
    for result in failed:
        if proven:
            device_ban(device_id=_device_of(result), reason=f"its answer to unit {unit.pk} failed the submitter's known rows")
    for owner_id in {_owner_of(r) for r in failed}:
        owner_answers_recheck(owner_id=owner_id, reason=f"an answer to unit {unit.pk} failed the submitter's known rows")


def _accept(unit: WorkUnit, agreeing: list[Result], losers: list[Result], known_ok: dict[int, bool]) -> None:
    kind = unit.job.kind
    audited = unit.results.order_by("pk").values_list("pk", flat=True).first() if unit.audit else None
    # A ban needs the winning answer vouched for by a device already trusted: two colluders of different
    # owners outvote one honest device, and banning it on their word would also re-verify all its work.
    proven = bool(losers) and _trusted_in(agreeing, kind)
    _winners_credit(unit, [r for r in agreeing if r.state == Result.State.REPORTED], audited=audited)
    _judge([r for r in losers if r.state == Result.State.REPORTED], Result.State.INVALID)
    colluders = {r.pk for r in _colluders(losers)} if proven else set()
    for result in losers:
        trust_reset(device_id=_device_of(result), kind=kind, reason="an invalid result")
        reason = _loser_judge(unit, result, audited=audited, colluder=result.pk in colluders)
        if reason and proven:
            device_ban(device_id=_device_of(result), reason=reason)
    _known_rows_failed(unit, [r for r in losers if not known_ok[r.pk]], proven=proven)
    WorkUnit.objects.filter(pk=unit.pk, state=WorkUnit.State.PENDING).update(
        state=WorkUnit.State.DONE, canonical_result=min(agreeing, key=lambda r: r.pk), finished_at=timezone.now()
    )
    unit.results.filter(state=Result.State.UNSENT).update(state=Result.State.CANCELLED)
    job_merge_if_done(job_id=unit.job_id)
    job_progress(job_id=unit.job_id, owner_id=unit.job.owner_id)  # throttled: one cache operation, mostly


def _winners_credit(unit: WorkUnit, newly_valid: list[Result], *, audited: int | None) -> None:
    """The winning reports become valid: trust credited (not for a unit accepted on one word, nor twice for
    a disputed known answer), a passed audit counted, a disputed known answer settled as right."""
    alone = unit.quorum == 1
    _judge(newly_valid, Result.State.VALID, accepted_alone=alone, strict=True)
    for result in newly_valid:
        if not alone and result.disputes_known_answer_id is None:
            trust_credit(device_id=_device_of(result), kind=unit.job.kind, hardware_class=result.hardware_class)
        if result.pk == audited:
            audit_passed(device_id=_device_of(result))
        if result.disputes_known_answer_id is not None:
            _known_answer_resolve(result.disputes_known_answer_id, right=True)


def _loser_judge(unit: WorkUnit, result: Result, *, audited: int | None, colluder: bool) -> str | None:
    """Settle what a losing result was (a failed audit, a wrong known answer, an accepted answer now
    overturned, a colluder's copy) and return why its device is banned if the winning answer is proven."""
    if result.pk == audited:
        return f"failed the audit of unit {unit.pk}"
    if result.disputes_known_answer_id is not None:
        _known_answer_resolve(result.disputes_known_answer_id, right=False)
        return f"wrong answer to known-answer unit {result.disputes_known_answer_id}"
    if result.state == Result.State.VALID:  # vouched for before, now shown wrong: it colluded
        Result.objects.filter(pk=result.pk, state=Result.State.VALID).update(state=Result.State.INVALID)
        return f"its accepted result for unit {unit.pk} was overturned"
    return f"sent the same wrong answer as another owner for unit {unit.pk}" if colluder else None
