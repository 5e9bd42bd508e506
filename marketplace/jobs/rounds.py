"""Rounds of a `fedavg` job: when every unit of round r is decided, its canonical updates are aggregated
into new global weights, evaluated, stored, and round r + 1's units are made from them (or the job
ends: last round, or the target metric reached).

The job's states carry the rounds: `running` while a round trains, `merging` while it is aggregated
(job_merge_if_done moves it there once, when the round's last unit is decided), then `running` again
with the next round's units, or `completed` with the final weights as the job's output. The slow part
(reading updates, aggregating, evaluating, storing the artifact) runs before any lock; one short
transaction then locks the job row and commits the round only if the job is still merging and the round
not yet recorded, so a retried or concurrent task yields one set of global weights and one next round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.db import transaction
from django.db.models import F

from marketplace.artifacts.models import Artifact
from marketplace.artifacts.services import artifact_store
from marketplace.artifacts.storage import get_storage
from marketplace.core.tensors import read_array, read_header
from marketplace.jobs import fedavg_math
from marketplace.jobs.events import job_round_event
from marketplace.jobs.kinds import fedavg
from marketplace.jobs.lifecycle import job_complete, job_fail
from marketplace.jobs.models import FedRound, Job
from marketplace.workunits.creation import units_create
from marketplace.workunits.models import WorkUnit

log = logging.getLogger(__name__)


class RoundNotReady(Exception):
    """A unit of the round is pending again (a ban reopened it): the job is running, not merging, now."""


@dataclass(frozen=True)
class Aggregated:
    index: int
    weights_in: str
    weights_out: Artifact
    updates: list[int]
    samples: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float


def round_current(*, job: Job) -> int:
    """The round whose units were made last (units of round r have indexes r * shards .. r * shards + shards - 1)."""
    last = WorkUnit.objects.filter(job=job, known_answer_of__isnull=True).order_by("-index").values_list("index", flat=True).first()
    return 0 if last is None else last // job.spec["shards"]


def round_aggregate(*, job_id: int) -> Job:
    """Aggregate the merging job's current round and start the next one, or complete the job. Safe to
    run twice and concurrently: only the first commit records the round."""
    job = Job.objects.get(pk=job_id)
    if job.state != Job.State.MERGING:
        return job
    index = round_current(job=job)
    if FedRound.objects.filter(job=job, index=index).exists():
        return _finish_again(job)
    try:
        aggregated = _compute(job, index)
    except RoundNotReady:
        job.refresh_from_db()
        return job
    except ValueError as exc:
        job_fail(job_id=job_id, reason=f"round {index} could not be aggregated: {exc}")
        job.refresh_from_db()
        return job
    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job_id)
        if locked.state != Job.State.MERGING or FedRound.objects.filter(job=job, index=index).exists():
            return locked  # another run of this task got here first; its weights stand
        fed = FedRound.objects.create(
            job=job, index=index, weights_in_id=aggregated.weights_in, weights_out=aggregated.weights_out,
            updates=aggregated.updates, samples=aggregated.samples, train_loss=aggregated.train_loss,
            eval_loss=aggregated.eval_loss, eval_accuracy=aggregated.eval_accuracy,
        )
        stop = _stop_reason(job.spec, aggregated)
        job_round_event(job_id=job_id, round_id=fed.pk, last=bool(stop))
        if stop:
            job_complete(job_id=job_id, output_id=aggregated.weights_out.sha256)
            log.info("job %s completed after round %s (%s): accuracy %.4f", job_id, index, stop, aggregated.eval_accuracy)
        else:
            _start_round(locked, index + 1, aggregated.weights_out.sha256)
    job.refresh_from_db()
    return job


def _compute(job: Job, index: int) -> Aggregated:
    spec = job.spec
    shards = spec["shards"]
    units = list(
        WorkUnit.objects.filter(job=job, known_answer_of__isnull=True, index__gte=index * shards,
                                index__lt=(index + 1) * shards)
        .select_related("canonical_result").order_by("index")
    )
    if len(units) != shards or any(u.state != WorkUnit.State.DONE or u.canonical_result is None for u in units):
        raise RoundNotReady(f"round {index} has {len(units)} units, not all decided")
    weights_in = units[0].payload["model"]["weights"]
    start = _read_weights(weights_in)
    updates, losses = [], []
    for unit in units:
        with get_storage().local_path(unit.canonical_result.output_id) as path:
            weights, loss = fedavg.read_update(path)
        if not all(np.isfinite(w).all() for w in weights.values()) or not np.isfinite(loss):
            raise ValueError(f"the accepted update of unit #{unit.index} is not finite")
        updates.append(weights)
        losses.append(loss)
    samples = [unit.payload["samples"] for unit in units]
    new = fedavg_math.aggregate(
        start, updates, samples, method=spec["aggregation"], trim_fraction=spec.get("trim_fraction", 0.0),
        dp=spec.get("dp"),
    )
    eval_loss, eval_accuracy = _evaluate(spec, new)
    artifact, _ = artifact_store(chunks=[_safetensors_bytes(new)], uploaded_by=job.owner)
    return Aggregated(
        index=index, weights_in=weights_in, weights_out=artifact, updates=[u.canonical_result_id for u in units],
        samples=sum(samples), train_loss=float(np.average(losses, weights=samples)),
        eval_loss=eval_loss, eval_accuracy=eval_accuracy,
    )


def _evaluate(spec: dict[str, Any], weights: dict[str, np.ndarray]) -> tuple[float, float]:
    with get_storage().local_path(spec["eval_dataset"]) as path:
        header = read_header(path)
        x, y = read_array(path, header["x"]), read_array(path, header["y"])
    model = spec["model"]
    return fedavg_math.evaluate(model["architecture"], model["config"], weights, x, y)


def _read_weights(sha256: str) -> dict[str, np.ndarray]:
    with get_storage().local_path(sha256) as path:
        return {name: read_array(path, info) for name, info in read_header(path).items()}


def _safetensors_bytes(weights: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(weights[name], dtype=np.float32) for name in sorted(weights)})


def _stop_reason(spec: dict[str, Any], aggregated: Aggregated) -> str | None:
    if aggregated.index + 1 >= spec["rounds"]:
        return "last round"
    target = spec.get("target")
    if target and target["metric"] == "accuracy" and aggregated.eval_accuracy >= target["value"]:
        return f"target accuracy {target['value']} reached"
    if target and target["metric"] == "loss" and aggregated.eval_loss <= target["value"]:
        return f"target loss {target['value']} reached"
    return None


def _start_round(job: Job, index: int, weights: str) -> None:
    plans = list(fedavg.plan_round(job.spec, round_index=index, weights=weights))
    units_create(job=job, plans=plans)
    Job.objects.filter(pk=job.pk, state=Job.State.MERGING).update(
        state=Job.State.RUNNING, units_total=F("units_total") + len(plans)
    )
    log.info("job %s: round %s started with %s units", job.pk, index, len(plans))


def _finish_again(job: Job) -> Job:
    """The current round is already recorded, yet the job is merging again: a ban reopened units the job
    relied on and they were decided anew. Later rounds are not recomputed; the job ends on its weights."""
    last = FedRound.objects.filter(job=job).order_by("-index").first()
    with transaction.atomic():
        job_complete(job_id=job.pk, output_id=last.weights_out_id)
    job.refresh_from_db()
    return job
