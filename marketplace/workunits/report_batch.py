"""Many reports in one request (POST /api/v1/agent/reports, docs/protocol.md "Batched reports").

Each item is judged on its own, exactly as a single report is (workunits/results.py: the same lease, output
and signature checks, in the same order), and answers on its own: one bad item never fails the others. What
is shared is the SQL, set-based: one statement loads every lease, small outputs that came inline are stored
in five statements for the batch (artifacts_store_inline), one statement finds which uploaded outputs the
device holds and their summaries, and one transaction locks the units, moves every good result with one
conditional UPDATE and marks each unit due for validation once. About ten statements for a batch of 64.

An inline output is stored only for an item that passed every other check, its lease live: the report's
inline bytes cannot become a free store for anything but outputs of this device's own leases.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from marketplace.artifacts.models import Artifact
from marketplace.artifacts.services import artifacts_store_inline, tensor_summary_of
from marketplace.core.exceptions import ApplicationError, LeaseExpired, ValidationFailed
from marketplace.core.tensors import TensorSummary, summarize
from marketplace.workers.models import Device
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.results import (
    LeaseRow,
    ReportedOutput,
    check_extras,
    check_output_sha256,
    check_output_summary,
    check_signature,
    lease_problem,
    leases_for_report,
    not_possessed,
    results_move_reported,
    units_mark_due,
)
from worker_agent.protocol import MAX_INLINE_OUTPUT_BYTES, b64decode, sha256_hex


@dataclass(frozen=True)
class ReportItem:
    """One report of a batch, as the agent sent it (the wire record checked its shape); `output` is the
    inline output, still base64."""

    result_id: int
    output_sha256: str
    signature: str
    elapsed_seconds: float | None = None
    metrics: dict[str, Any] | None = None
    output: str | None = None


@dataclass
class _Accepted:
    """An item that passed its checks so far: what its UPDATE writes."""

    row: LeaseRow
    signature: bytes
    metrics: dict[str, Any]
    elapsed_seconds: float | None
    inline: tuple[bytes, TensorSummary] | None


Outcome = Result | ApplicationError


def results_report_batch(*, device: Device, items: list[ReportItem]) -> list[Outcome]:
    """Judge and record every item; returns, in the items' order, the reported result or the error that
    refused it. The caller checked the envelope (1..MAX_REPORT_BATCH items, distinct result ids)."""
    now = timezone.now()
    loaded = leases_for_report(device=device, result_ids=[item.result_id for item in items], now=now)
    outcomes: dict[int, Outcome] = {}
    accepted: dict[int, _Accepted] = {}
    for item in items:
        try:
            accepted[item.result_id] = _judge(device, item, loaded.get(item.result_id), now)
        except ApplicationError as exc:
            outcomes[item.result_id] = exc
    inline = {item.output_sha256: accepted[item.result_id].inline for item in items
              if item.result_id in accepted and accepted[item.result_id].inline is not None}
    artifacts_store_inline(device=device, blobs={sha: blob for sha, blob in inline.items() if blob is not None})
    _check_uploaded_outputs(device, [(item, accepted[item.result_id]) for item in items
                                     if item.result_id in accepted and accepted[item.result_id].inline is None],
                            outcomes, accepted)
    reported = _move(device, {rid: (item, accepted[rid]) for item in items if (rid := item.result_id) in accepted},
                     now)
    for result_id in accepted:
        outcomes[result_id] = reported.get(result_id) or LeaseExpired(
            f"the lease on result {result_id} expired before the report arrived")
    return [outcomes[item.result_id] for item in items]


def _judge(device: Device, item: ReportItem, row: LeaseRow | None, now: Any) -> _Accepted:
    """The checks of a single report that need no more SQL, in its order; raises the first refusal."""
    if problem := lease_problem(row, device=device, result_id=item.result_id):
        raise problem
    assert row is not None
    metrics = check_extras(item.elapsed_seconds, {} if item.metrics is None else item.metrics)
    sha = check_output_sha256(item.output_sha256)
    blob = None
    if item.output is not None:
        data = _inline_bytes(item.output, sha)
        summary = summarize(io.BytesIO(data), size=len(data))
        check_output_summary(row, summary)
        blob = (data, summary)
    signature = check_signature(device, row, sha, item.signature)
    return _Accepted(row=row, signature=signature, metrics=metrics, elapsed_seconds=item.elapsed_seconds,
                     inline=blob)


def _inline_bytes(encoded: str, sha: str) -> bytes:
    try:
        data = b64decode(encoded)
    except (ValueError, TypeError):
        raise ValidationFailed("output must be the output file's bytes in base64", fields={"output": "invalid"}) from None
    if len(data) > MAX_INLINE_OUTPUT_BYTES:
        raise ValidationFailed(f"an inline output is at most {MAX_INLINE_OUTPUT_BYTES} bytes; upload a larger one",
                               fields={"output": "too large"})
    if sha256_hex(data) != sha:
        raise ValidationFailed("the inline output does not hash to output_sha256",
                               fields={"output": "does not match output_sha256"})
    return data


def _check_uploaded_outputs(device: Device, pending: list[tuple[ReportItem, _Accepted]],
                            outcomes: dict[int, Outcome], accepted: dict[int, _Accepted]) -> None:
    """Outputs named but not sent: the device must hold them (it uploaded them), and their summaries must
    pass the unit's kind. One statement for the batch; a summary never taken is taken now, from the file."""
    if not pending:
        return
    held = dict(Artifact.devices.through.objects.filter(
        device_id=device.pk, artifact_id__in={item.output_sha256 for item, _ in pending},
    ).values_list("artifact_id", "artifact__tensor_header__summary"))
    for item, good in pending:
        try:
            if item.output_sha256 not in held:
                raise not_possessed()
            stored = held[item.output_sha256]
            summary = TensorSummary.from_json(stored) if stored else tensor_summary_of(item.output_sha256)
            check_output_summary(good.row, summary)
        except ApplicationError as exc:
            outcomes[item.result_id] = exc
            del accepted[item.result_id]


def _move(device: Device, moving: dict[int, tuple[ReportItem, _Accepted]], now: Any) -> dict[int, Result]:
    """One transaction: lock the units (in id order, so two batches never deadlock), move every result still
    on a live lease of this device with one conditional UPDATE, and mark the units due. Returns the moved."""
    if not moving:
        return {}
    reports = [ReportedOutput(result_id=rid, output_sha256=item.output_sha256, signature=good.signature,
                              elapsed_seconds=good.elapsed_seconds, metrics=good.metrics)
               for rid, (item, good) in moving.items()]
    with transaction.atomic():
        list(WorkUnit.objects.select_for_update().filter(pk__in={good.row.unit_id for _, good in moving.values()})
             .order_by("pk").values_list("pk", flat=True))
        moved = results_move_reported(device=device, now=now, reports=reports)
        units_mark_due(sorted({moving[rid][1].row.unit_id for rid in moved}))
    return {rid: Result(pk=rid, unit_id=moving[rid][1].row.unit_id, job_id=moving[rid][1].row.job_id, device=device,
                        state=Result.State.REPORTED, output_id=moving[rid][0].output_sha256,
                        signature=moving[rid][1].signature, reported_at=now,
                        elapsed_seconds=moving[rid][1].elapsed_seconds, metrics=moving[rid][1].metrics)
            for rid in moved}
