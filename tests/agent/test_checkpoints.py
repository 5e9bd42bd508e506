"""Checkpoints in the compute child: a unit killed after a checkpoint and run again resumes from it and
gives the very bytes of an uninterrupted run (each kind); a checkpoint of another unit, or a broken one,
is discarded; SIGUSR1 asks for one at once; progress is written as the unit goes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from agent_models import MLP, inputs, payload, weights, write_safetensors
from safetensors.torch import load_file

from worker_agent.jobfile import ChildJob, Limits
from worker_agent.kinds import _checkpoint
from worker_agent.runner import ChildAborted, ComputeChild

WEIGHTS_SHA, X_SHA, Y_SHA = "a" * 64, "b" * 64, "c" * 64
# Big enough that the unit is still running ~0.1 s after its first checkpoint, small enough to take ~0.5 s.
ROWS = 10_000
SAMPLES = 400


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComputeChild]:
    with ComputeChild(tmp_path_factory.mktemp("child-scratch")) as compute_child:
        yield compute_child


def inference_job(directory: Path, *, rows: int = ROWS) -> ChildJob:
    directory.mkdir()
    arch, config = MLP
    return ChildJob(
        payload=payload(arch, config, weights_sha=WEIGHTS_SHA, x_sha=X_SHA, rows=rows, batch_size=1),
        artifacts={WEIGHTS_SHA: str(write_safetensors(directory / "w", weights(arch, config))),
                   X_SHA: str(write_safetensors(directory / "x", {"x": inputs(arch, config, rows)}))},
        output_path=str(directory / "output.safetensors"), limits=Limits(seconds=60),
    )


def fedavg_job(directory: Path) -> ChildJob:
    directory.mkdir()
    arch, config = MLP
    x = torch.randn((SAMPLES, 6), generator=torch.Generator().manual_seed(3))
    return ChildJob(
        payload={"kind": "fedavg", "model": {"architecture": arch, "config": config, "weights": WEIGHTS_SHA},
                 "inputs": {"x": X_SHA, "y": Y_SHA}, "round": 0, "shard": 0, "samples": SAMPLES,
                 "train": {"epochs": 2, "batch_size": 2, "learning_rate": 0.05, "momentum": 0.5, "seed": 7},
                 "limits": {"seconds": 60, "memory_mb": 2048}},
        artifacts={WEIGHTS_SHA: str(write_safetensors(directory / "w", weights(arch, config))),
                   X_SHA: str(write_safetensors(directory / "x", {"x": x})),
                   Y_SHA: str(write_safetensors(directory / "y", {"y": x[:, :3].argmax(dim=1)}))},
        output_path=str(directory / "output.safetensors"), limits=Limits(seconds=60),
    )


def checkpointing(job: ChildJob, *, seconds: float) -> ChildJob:
    return replace(job, checkpoint_dir=str(Path(job.output_path).parent), checkpoint_seconds=seconds)


def checkpoint_of(job: ChildJob) -> Path:
    assert job.checkpoint_dir is not None
    return Path(job.checkpoint_dir) / _checkpoint.CHECKPOINT_FILE


def digest(job: ChildJob) -> str:
    return hashlib.sha256(Path(job.output_path).read_bytes()).hexdigest()


def run_straight(child: ComputeChild, job: ChildJob) -> str:
    outcome = child.run(job)
    assert outcome.ok, outcome.error
    return digest(job)


def kill_after_first_checkpoint(child: ComputeChild, job: ChildJob, *, ask: bool = False) -> None:
    """Run the unit and kill the child as soon as a checkpoint is on disk (asking for one by SIGUSR1 if
    `ask`). Fails if the unit finished first."""
    asked: list[bool] = []

    def abort() -> str | None:
        if ask and not asked:
            asked.append(child.request_checkpoint())
        return "killed by the test" if checkpoint_of(job).is_file() else None

    with pytest.raises(ChildAborted):
        child.run(job, should_abort=abort)
    assert not ask or asked == [True]


def test_an_inference_unit_killed_after_a_checkpoint_resumes_to_the_same_bytes(tmp_path, child):
    straight = run_straight(child, inference_job(tmp_path / "straight"))
    job = checkpointing(inference_job(tmp_path / "interrupted"), seconds=0.05)

    kill_after_first_checkpoint(child, job)
    _tensors, state = _checkpoint.load(checkpoint_of(job), digest=_checkpoint.unit_digest(job)) or ({}, {})
    assert 0 < state["rows_done"] < ROWS
    fraction = json.loads((Path(job.checkpoint_dir) / _checkpoint.PROGRESS_FILE).read_text())["fraction"]
    assert 0 < fraction < 1
    outcome = child.run(job)

    assert outcome.ok, outcome.error
    assert digest(job) == straight


def test_a_fedavg_unit_asked_to_checkpoint_by_sigusr1_and_killed_resumes_to_the_same_bytes(tmp_path, child):
    straight = run_straight(child, fedavg_job(tmp_path / "straight"))
    job = checkpointing(fedavg_job(tmp_path / "interrupted"), seconds=3600)  # the clock never ticks: SIGUSR1 does

    kill_after_first_checkpoint(child, job, ask=True)
    _tensors, state = _checkpoint.load(checkpoint_of(job), digest=_checkpoint.unit_digest(job)) or ({}, {})
    assert (state["epoch"], state["batch"]) > (0, 0) and state["momentum"]  # mid-training, with momentum
    outcome = child.run(job)

    assert outcome.ok, outcome.error
    assert digest(job) == straight


def test_a_resumed_unit_really_starts_from_the_checkpoint(tmp_path, child):
    job = checkpointing(inference_job(tmp_path / "unit", rows=10), seconds=3600)
    # A checkpoint of this unit claiming 4 rows done, with outputs no model would give: they must show.
    _checkpoint.save(checkpoint_of(job), {"y": torch.full((4, 3), 7.0)}, {"rows_done": 4},
                     digest=_checkpoint.unit_digest(job))

    outcome = child.run(job)

    assert outcome.ok, outcome.error
    y = load_file(job.output_path)["y"]
    assert torch.equal(y[:4], torch.full((4, 3), 7.0)) and not torch.equal(y[4:], torch.full((6, 3), 7.0))


@pytest.mark.parametrize("damage", ["another unit", "garbage"])
def test_a_checkpoint_that_does_not_match_the_unit_is_discarded_and_the_unit_starts_over(tmp_path, child, damage):
    straight = run_straight(child, inference_job(tmp_path / "straight", rows=10))
    job = checkpointing(inference_job(tmp_path / "unit", rows=10), seconds=3600)
    if damage == "another unit":
        _checkpoint.save(checkpoint_of(job), {"y": torch.full((4, 3), 7.0)}, {"rows_done": 4}, digest="0" * 64)
    else:
        checkpoint_of(job).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")

    outcome = child.run(job)

    assert outcome.ok, outcome.error
    assert digest(job) == straight
    assert not checkpoint_of(job).exists()
