"""Validation by redundant computation: a unit is done when `quorum` results from devices of different
owners agree; agreeing results are valid, the others invalid; disagreement issues another replica."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from marketplace.artifacts.storage import get_storage
from marketplace.jobs.kinds import kind_module
from marketplace.workers.models import Device
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.replicas import replica_issue, unit_error

log = logging.getLogger(__name__)


def _agree(spec: dict, kind: str, a: Result, b: Result) -> bool:
    if a.output_id == b.output_id:
        return True  # same bytes: exact agreement without reading anything
    storage = get_storage()
    return kind_module(kind).outputs_agree(spec, storage.path(a.output_id), storage.path(b.output_id))


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


def _judge(results: Sequence[Result], state: str) -> None:
    if not results:
        return
    Result.objects.filter(pk__in=[r.pk for r in results], state=Result.State.REPORTED).update(state=state)
    counter = "valid_results" if state == Result.State.VALID else "invalid_results"
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
        return _seek_quorum(unit, reported)


def _judge_late(unit: WorkUnit, reported: list[Result]) -> None:
    """A replica reported after the unit was decided is judged against the canonical result."""
    canonical = Result.objects.get(pk=unit.canonical_result_id)
    agreeing = [r for r in reported if _agree(unit.job.spec, unit.job.kind, canonical, r)]
    _judge(agreeing, Result.State.VALID)
    _judge([r for r in reported if r not in agreeing], Result.State.INVALID)


def _seek_quorum(unit: WorkUnit, reported: list[Result]) -> str:
    already_valid = list(unit.results.filter(state=Result.State.VALID))
    groups = _group(unit.job.spec, unit.job.kind, already_valid + reported)
    best = max(groups, key=lambda g: len({r.owner_id for r in g}))
    owners = len({r.owner_id for r in best})
    if owners >= unit.quorum:
        _accept(unit, best, [r for r in reported if r not in best])
        return "done"
    outstanding = unit.results.filter(state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS)).count()
    for _ in range(max(0, unit.quorum - owners - outstanding)):
        if not replica_issue(unit_id=unit.pk, reason="results disagree"):
            break
    if outstanding == 0 and unit.results.filter(state__in=(Result.State.UNSENT, Result.State.IN_PROGRESS)).count() == 0:
        unit_error(unit_id=unit.pk, reason=f"no {unit.quorum} agreeing results from different owners")
        return "error"
    return "pending"


def _accept(unit: WorkUnit, agreeing: list[Result], others: list[Result]) -> None:
    from marketplace.jobs.services import job_merge_if_done

    now = timezone.now()
    canonical = min(agreeing, key=lambda r: r.pk)
    _judge([r for r in agreeing if r.state == Result.State.REPORTED], Result.State.VALID)
    _judge(others, Result.State.INVALID)
    WorkUnit.objects.filter(pk=unit.pk, state=WorkUnit.State.PENDING).update(
        state=WorkUnit.State.DONE, canonical_result=canonical, finished_at=now
    )
    unit.results.filter(state=Result.State.UNSENT).update(state=Result.State.CANCELLED)
    job_merge_if_done(job_id=unit.job_id)
