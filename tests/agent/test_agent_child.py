"""The compute child: bitwise results, clear refusals of bad inputs, enforced limits, and one warm
child serving unit after unit until a unit kills it."""

from __future__ import annotations

import os
import pickle
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from agent_models import CNN, MLP, inputs, payload, reference_forward, weights, write_safetensors
from safetensors.torch import load_file

from worker_agent.jobfile import ChildJob, Limits
from worker_agent.kinds import JobError, inference
from worker_agent.runner import ChildAborted, ChildOutcome, ComputeChild

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
        fault=fault,
        fault_seed=91,
        limits=Limits(seconds=seconds, memory_mb=memory_mb),
    )


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComputeChild]:
    """One warm child for the whole module, as the agent keeps one: a start costs seconds of torch
    import. Tests that kill it leave a fresh one behind, exactly as the agent would."""
    with ComputeChild(tmp_path_factory.mktemp("child-scratch")) as compute_child:
        yield compute_child


def run_in_child(child: ComputeChild, job: ChildJob) -> tuple[bool, str]:
    outcome = child.run(job)
    return outcome.ok, outcome.error


def small_unit(tmp_path: Path, name: str) -> ChildJob:
    return make_job(tmp_path, *MLP, rows=10, batch_size=4, name=name)


def assert_done(outcome: ChildOutcome, job: ChildJob) -> None:
    assert outcome.ok, outcome.error
    assert list(load_file(job.output_path)["y"].shape) == [10, 3]


@pytest.fixture(scope="module")
def cnn_run(
    tmp_path_factory: pytest.TempPathFactory, child: ComputeChild,
) -> tuple[ChildJob, dict[str, torch.Tensor], torch.Tensor]:
    """One CNN unit computed by the real child, shared by the tests that look at its output."""
    arch, config = CNN
    state, x = weights(arch, config), inputs(arch, config, 100)
    job = make_job(tmp_path_factory.mktemp("cnn"), arch, config, rows=100, batch_size=32, x=x, state=state)
    ok, error = run_in_child(child, job)
    assert ok, error
    return job, state, x


@pytest.mark.usefixtures("single_thread_torch")
def test_the_child_computes_an_mlp_exactly_like_the_same_model_in_process(tmp_path: Path, child: ComputeChild) -> None:
    arch, config = MLP
    state, x = weights(arch, config), inputs(arch, config, 100)
    job = make_job(tmp_path, arch, config, rows=100, batch_size=32, x=x, state=state)

    ok, error = run_in_child(child, job)

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


def test_the_same_inputs_give_identical_output_bytes_twice_in_a_warm_child(
    tmp_path: Path, child: ComputeChild, cnn_run: tuple[ChildJob, dict[str, torch.Tensor], torch.Tensor]
) -> None:
    first, state, x = cnn_run
    run_in_child(child, make_job(tmp_path, *MLP, rows=50, batch_size=7, name="in-between"))  # other work first
    second = make_job(tmp_path, *CNN, rows=100, batch_size=32, x=x, state=state)

    ok, error = run_in_child(child, second)

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


def test_units_computed_back_to_back_share_one_child(tmp_path: Path, child: ComputeChild) -> None:
    first, second = small_unit(tmp_path, "first"), small_unit(tmp_path, "second")

    one, two = child.run(first), child.run(second)

    assert_done(one, first)
    assert_done(two, second)
    assert one.child_pid == two.child_pid == child.pid
    assert one.metrics["rows"] == two.metrics["rows"] == 10


def test_a_unit_refused_for_bad_input_fails_alone_and_the_child_stays(tmp_path: Path, child: ComputeChild) -> None:
    before = child.run(small_unit(tmp_path, "before"))
    bad = make_job(tmp_path, *MLP, rows=4, batch_size=4, state=weights(*CNN), name="bad")

    refused = child.run(bad)
    after = child.run(small_unit(tmp_path, "after"))

    assert not refused.ok and refused.error.startswith("weights do not match the architecture: missing")
    assert after.ok, after.error
    assert before.child_pid == refused.child_pid == after.child_pid


# A genuinely slow unit: 400k rows through eight 512-wide layers is ~1.7 TFLOP, about a minute on one core.
SLOW_MLP = {"in_features": 8, "hidden": [512] * 8, "out_features": 10}


def test_the_time_limit_kills_a_unit_that_runs_too_long_and_the_next_unit_gets_a_fresh_child(
    tmp_path: Path, child: ComputeChild,
) -> None:
    slow = make_job(tmp_path, "mlp", SLOW_MLP, rows=400_000, batch_size=4096, seconds=1, name="slow")
    following = small_unit(tmp_path, "following")

    timed_out = child.run(slow)
    after = child.run(following)

    assert not timed_out.ok
    assert timed_out.error == "time limit of 1 s exceeded; the child was killed"
    assert not Path(slow.output_path).exists()
    assert_done(after, following)
    assert after.child_pid != timed_out.child_pid
    assert not _alive(timed_out.child_pid)


def test_the_memory_limit_stops_a_unit_that_would_exceed_it_and_the_next_unit_succeeds(
    tmp_path: Path, child: ComputeChild,
) -> None:
    # One batch of 1024 rows through a 65536-wide layer needs 256 MB of activations; allow 64 MB.
    greedy = make_job(tmp_path, "mlp", {"in_features": 4, "hidden": [65536], "out_features": 10},
                      rows=1024, batch_size=1024, memory_mb=64, name="greedy")
    following = small_unit(tmp_path, "following")

    failed = child.run(greedy)
    after = child.run(following)

    assert not failed.ok
    assert failed.error.startswith("memory limit of 64 MB exceeded")
    assert not Path(greedy.output_path).exists()
    assert_done(after, following)
    assert after.child_pid != failed.child_pid  # an interpreter that ran out of memory is not trusted again


def test_an_abandoned_unit_kills_its_child_and_the_next_unit_gets_a_fresh_one(tmp_path: Path, child: ComputeChild) -> None:
    assert child.run(small_unit(tmp_path, "warm-up")).ok  # the child is ready: the abort lands mid-unit
    victim_pid = child.pid
    assert victim_pid is not None
    slow = make_job(tmp_path, "mlp", SLOW_MLP, rows=400_000, batch_size=4096, name="slow")

    with pytest.raises(ChildAborted, match="lease lost"):
        child.run(slow, should_abort=lambda: "lease lost")
    following = small_unit(tmp_path, "following")
    after = child.run(following)

    assert not _alive(victim_pid)
    assert_done(after, following)
    assert after.child_pid != victim_pid


def test_a_child_killed_mid_unit_fails_only_that_unit(tmp_path: Path, child: ComputeChild) -> None:
    assert child.run(small_unit(tmp_path, "warm-up")).ok  # the child is ready: the next wait is for the unit
    victim_pid = child.pid
    assert victim_pid is not None
    slow = make_job(tmp_path, "mlp", SLOW_MLP, rows=400_000, batch_size=4096, name="slow")

    killed: list[int] = []

    def kill_the_child_once() -> None:  # polled while the parent waits for the unit's answer
        if not killed:
            os.kill(victim_pid, signal.SIGKILL)
            killed.append(victim_pid)

    crashed = child.run(slow, should_abort=kill_the_child_once)
    following = small_unit(tmp_path, "following")
    after = child.run(following)

    assert not crashed.ok
    assert crashed.error.startswith("the compute child was killed by SIGKILL")
    assert crashed.child_pid == victim_pid
    assert_done(after, following)
    assert after.child_pid != victim_pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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


def test_time_a_child_spends_stopped_counts_against_neither_the_limit_nor_elapsed(
    child: ComputeChild, tmp_path: Path,
) -> None:
    job = make_job(tmp_path, *MLP, rows=10, batch_size=4, seconds=1)
    child.wait_facts()
    child.pause()  # SIGSTOP: the unit cannot start until resumed, 1.6 s later, past its 1 s limit
    resumer = threading.Timer(1.6, child.resume)
    resumer.start()
    try:
        outcome = child.run(job)
    finally:
        resumer.cancel()
        child.resume()
    assert outcome.ok, outcome.error
    assert outcome.elapsed_seconds < 1.0
    assert child.paused_seconds() >= 1.6


def test_a_child_killed_for_a_reason_fails_its_unit_with_that_reason(child: ComputeChild, tmp_path: Path) -> None:
    job = make_job(tmp_path, *MLP, rows=10, batch_size=4)
    child.wait_facts()
    child.pause()  # held, so the unit cannot finish before the kill
    killer = threading.Timer(0.3, child.kill_for, args=("memory cap: the unit held too much",))
    killer.start()
    try:
        outcome = child.run(job)
    finally:
        killer.cancel()
    assert (outcome.ok, outcome.error) == (False, "memory cap: the unit held too much")
