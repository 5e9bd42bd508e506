"""The compute child: bitwise results, clear refusals of bad inputs, and enforced limits."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from agent_models import CNN, MLP, inputs, payload, reference_forward, weights, write_safetensors
from safetensors.torch import load_file

from worker_agent.jobfile import ChildJob, Limits
from worker_agent.kinds import JobError, inference
from worker_agent.runner import run_child

WEIGHTS_SHA, INPUT_SHA = "a" * 64, "b" * 64


def make_job(tmp_path: Path, arch: str, config: dict[str, Any], *, rows: int, batch_size: int,
             x: torch.Tensor | None = None, state: dict[str, torch.Tensor] | None = None,
             seconds: float = 60, memory_mb: int = 2048, fault: str | None = None, name: str = "job") -> ChildJob:
    workdir = tmp_path / name
    workdir.mkdir()
    state = weights(arch, config) if state is None else state
    x = inputs(arch, config, rows) if x is None else x
    weights_path = write_safetensors(workdir / "weights.safetensors", state)
    input_path = write_safetensors(workdir / "x.safetensors", {"x": x})
    return ChildJob(
        payload=payload(arch, config, weights_sha=WEIGHTS_SHA, x_sha=INPUT_SHA, rows=rows, batch_size=batch_size,
                        seconds=seconds, memory_mb=memory_mb),
        artifacts={WEIGHTS_SHA: str(weights_path), INPUT_SHA: str(input_path)},
        output_path=str(workdir / "output.safetensors"),
        status_path=str(workdir / "status.json"),
        fault=fault,
        fault_seed=91,
        limits=Limits(seconds=seconds, memory_mb=memory_mb),
    )


def run_in_child(job: ChildJob) -> tuple[bool, str]:
    outcome = run_child(job, Path(job.output_path).parent)
    return outcome.ok, outcome.error


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChildJob, dict[str, torch.Tensor], torch.Tensor]:
    """One CNN unit computed by a real child, shared: each child start costs seconds of torch import."""
    arch, config = CNN
    state, x = weights(arch, config), inputs(arch, config, 100)
    job = make_job(tmp_path_factory.mktemp("cnn"), arch, config, rows=100, batch_size=32, x=x, state=state)
    ok, error = run_in_child(job)
    assert ok, error
    return job, state, x


@pytest.mark.usefixtures("single_thread_torch")
def test_the_child_computes_an_mlp_exactly_like_the_same_model_in_process(tmp_path: Path) -> None:
    arch, config = MLP
    state, x = weights(arch, config), inputs(arch, config, 100)
    job = make_job(tmp_path, arch, config, rows=100, batch_size=32, x=x, state=state)

    ok, error = run_in_child(job)

    assert ok, error
    y = load_file(job.output_path)["y"]
    assert y.dtype == torch.float32 and list(y.shape) == [100, 3]
    assert torch.equal(y, reference_forward(arch, config, state, x, batch_size=32))


@pytest.mark.usefixtures("single_thread_torch")
def test_the_child_computes_a_cnn_exactly_like_the_same_model_in_process(
    cnn_run: tuple[ChildJob, dict[str, torch.Tensor], torch.Tensor],
) -> None:
    job, state, x = cnn_run

    y = load_file(job.output_path)["y"]

    assert y.dtype == torch.float32 and list(y.shape) == [100, 10]
    assert torch.equal(y, reference_forward(*CNN, state, x, batch_size=32))


def test_the_same_inputs_give_identical_output_bytes_twice(
    tmp_path: Path, cnn_run: tuple[ChildJob, dict[str, torch.Tensor], torch.Tensor]
) -> None:
    first, state, x = cnn_run
    second = make_job(tmp_path, *CNN, rows=100, batch_size=32, x=x, state=state)

    ok, error = run_in_child(second)

    assert ok, error
    assert Path(second.output_path).read_bytes() == Path(first.output_path).read_bytes()


def test_a_wrong_dtype_input_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    arch, config = MLP
    job = make_job(tmp_path, arch, config, rows=10, batch_size=4, x=inputs(arch, config, 10).to(torch.float64))

    with pytest.raises(JobError, match=r"^input x has dtype float64, expected float32$"):
        inference.execute(job)


def test_a_wrong_shape_input_is_refused(tmp_path: Path) -> None:
    arch, config = MLP
    job = make_job(tmp_path, arch, config, rows=10, batch_size=4, x=torch.zeros(10, 5))

    with pytest.raises(JobError, match=r"input x has shape \[10, 5\], expected \[10, 6\]"):
        inference.execute(job)


def test_a_row_count_other_than_the_payload_says_is_refused(tmp_path: Path) -> None:
    arch, config = MLP
    job = make_job(tmp_path, arch, config, rows=10, batch_size=4, x=inputs(arch, config, 11))

    with pytest.raises(JobError, match=r"expected \[10, 6\]"):
        inference.execute(job)


class _PlantsAMarker:
    """Unpickling this creates a file: proof that somebody ran pickle on our weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_passed_as_weights_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    arch, config = MLP
    job = make_job(tmp_path, arch, config, rows=4, batch_size=4)
    marker = tmp_path / "unpickled"
    Path(job.artifacts[WEIGHTS_SHA]).write_bytes(pickle.dumps({"net.0.weight": _PlantsAMarker(marker)}))

    with pytest.raises(JobError, match="weights are not a valid safetensors file"):
        inference.execute(job)

    assert not marker.exists()


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    arch, config = MLP
    job = make_job(tmp_path, arch, config, rows=4, batch_size=4, state=weights(*CNN))

    with pytest.raises(JobError, match="weights do not match the architecture: missing"):
        inference.execute(job)


def test_the_time_limit_kills_a_child_that_runs_too_long(tmp_path: Path) -> None:
    # A genuinely slow unit: 400k rows through eight 512-wide layers is ~1.7 TFLOP, about a minute on one core.
    arch, config = "mlp", {"in_features": 8, "hidden": [512] * 8, "out_features": 10}
    job = make_job(tmp_path, arch, config, rows=400_000, batch_size=4096, seconds=2)

    ok, error = run_in_child(job)

    assert not ok
    assert error == "time limit of 2 s exceeded; the child was killed"
    assert not Path(job.output_path).exists()


def test_the_memory_limit_stops_a_child_that_would_exceed_it(tmp_path: Path) -> None:
    # One batch of 1024 rows through a 65536-wide layer needs 256 MB of activations; allow 64 MB.
    arch, config = "mlp", {"in_features": 4, "hidden": [65536], "out_features": 10}
    job = make_job(tmp_path, arch, config, rows=1024, batch_size=1024, memory_mb=64)

    ok, error = run_in_child(job)

    assert not ok
    assert error.startswith("memory limit of 64 MB exceeded")
    assert not Path(job.output_path).exists()


@pytest.mark.usefixtures("single_thread_torch")
def test_the_sabotage_mode_gives_a_plausible_but_wrong_output(tmp_path: Path) -> None:
    arch, config = MLP
    state, x = weights(arch, config), inputs(arch, config, 20)
    job = make_job(tmp_path, arch, config, rows=20, batch_size=8, x=x, state=state, fault="wrong")

    inference.execute(job)

    wrong = load_file(job.output_path)["y"]
    honest = reference_forward(arch, config, state, x, batch_size=8)
    assert wrong.shape == honest.shape and wrong.dtype == torch.float32
    assert not torch.allclose(wrong, honest, rtol=1e-3, atol=1e-3)
