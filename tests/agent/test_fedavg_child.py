"""The fedavg kind in the compute child: local training that is a pure function of the unit (identical
bytes twice, identical to the same training in process), its signed metrics, clear refusals, and the
sabotage modes the e2e tests and the demo use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from agent_models import MLP, weights, write_safetensors
from safetensors.torch import load_file

from worker_agent.jobfile import ChildJob, PayloadError
from worker_agent.kinds import fedavg
from worker_agent.runner import ComputeChild

WEIGHTS_SHA, X_SHA, Y_SHA = "a" * 64, "b" * 64, "c" * 64
ROWS = 40


def shard(rows: int = ROWS, *, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((rows, 6), generator=generator)
    return x, x[:, :3].argmax(dim=1)


def train_payload(*, samples: int = ROWS, seed: int = 7, **train: Any) -> dict[str, Any]:
    arch, config = MLP
    return {
        "kind": "fedavg", "model": {"architecture": arch, "config": config, "weights": WEIGHTS_SHA},
        "inputs": {"x": X_SHA, "y": Y_SHA}, "round": 0, "shard": 0, "samples": samples,
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 0.1, "momentum": 0.5, "seed": seed, **train},
        "limits": {"seconds": 60, "memory_mb": 2048},
    }


def make_job(tmp_path: Path, name: str, *, fault: str | None = None, x=None, y=None, **payload: Any) -> ChildJob:
    workdir = tmp_path / name
    workdir.mkdir()
    default_x, default_y = shard()
    x, y = (default_x if x is None else x), (default_y if y is None else y)
    return ChildJob(
        payload=train_payload(**payload),
        artifacts={WEIGHTS_SHA: str(write_safetensors(workdir / "w", weights(*MLP))),
                   X_SHA: str(write_safetensors(workdir / "x", {"x": x})),
                   Y_SHA: str(write_safetensors(workdir / "y", {"y": y}))},
        output_path=str(workdir / "out.safetensors"), fault=fault, fault_seed=5,
    )


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComputeChild]:
    with ComputeChild(tmp_path_factory.mktemp("child-scratch")) as compute_child:
        yield compute_child


def in_process(job: ChildJob) -> tuple[dict[str, torch.Tensor], float]:
    arch, config = MLP
    from worker_agent.architectures import resolve

    architecture, normal = resolve(arch, config)
    model = architecture.build(normal)
    model.load_state_dict(weights(*MLP))
    x, y = shard()
    train = job.payload["train"]
    loss = fedavg.train_local(model, x, y, epochs=train["epochs"], batch_size=train["batch_size"],
                              learning_rate=train["learning_rate"], momentum=train["momentum"], seed=train["seed"])
    return model.state_dict(), loss


def test_a_training_unit_gives_identical_bytes_twice_in_a_warm_child(tmp_path, child):
    first, second = make_job(tmp_path, "one"), make_job(tmp_path, "two")

    assert child.run(first).ok and child.run(second).ok

    assert Path(first.output_path).read_bytes() == Path(second.output_path).read_bytes()


@pytest.mark.usefixtures("single_thread_torch")
def test_the_child_trains_exactly_like_the_same_loop_in_process(tmp_path, child):
    job = make_job(tmp_path, "unit")
    assert child.run(job).ok

    output = load_file(job.output_path)
    expected, loss = in_process(job)

    assert all(torch.equal(output[name], expected[name]) for name in expected)
    assert output[fedavg.LOSS_NAME].item() == pytest.approx(loss, rel=1e-6)
    assert output[fedavg.SAMPLES_NAME].tolist() == [ROWS]


def test_another_seed_orders_the_data_otherwise_and_trains_other_weights(tmp_path, child):
    a, b = make_job(tmp_path, "a", seed=1), make_job(tmp_path, "b", seed=2)

    assert child.run(a).ok and child.run(b).ok

    assert Path(a.output_path).read_bytes() != Path(b.output_path).read_bytes()


def test_a_poisoning_agent_sends_the_update_sign_flipped_and_scaled(tmp_path, child):
    honest, poisoned = make_job(tmp_path, "honest"), make_job(tmp_path, "poisoned", fault="poison")
    assert child.run(honest).ok and child.run(poisoned).ok
    start, good, bad = weights(*MLP), load_file(honest.output_path), load_file(poisoned.output_path)

    for name, value in start.items():
        torch.testing.assert_close(bad[name], value + fedavg.POISON_SCALE * (good[name] - value), rtol=1e-5, atol=1e-6)


def test_a_lazy_agent_sends_the_global_weights_back_untrained(tmp_path, child):
    job = make_job(tmp_path, "lazy", fault="lazy")
    assert child.run(job).ok

    output = load_file(job.output_path)
    assert all(torch.equal(output[name], value) for name, value in weights(*MLP).items())


def test_labels_outside_the_models_classes_are_refused(tmp_path, child):
    x, _ = shard()
    outcome = child.run(make_job(tmp_path, "labels", y=torch.full((ROWS,), 7)))

    assert not outcome.ok and "labels outside [0, 3)" in outcome.error


def test_a_shard_of_other_size_than_the_payload_says_is_refused(tmp_path, child):
    outcome = child.run(make_job(tmp_path, "size", samples=ROWS + 1))

    assert not outcome.ok and f"expected [{ROWS + 1}, 6]" in outcome.error


@pytest.mark.parametrize(
    ("change", "message"),
    [({"inputs": {"x": X_SHA}}, "exactly the shard's `x` and `y`"),
     ({"train": {"epochs": 1, "batch_size": 8, "learning_rate": -1, "seed": 1}}, "learning_rate"),
     ({"train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1, "seed": -1}}, "seed"),
     ({"train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1, "momentum": 1, "seed": 1}}, "momentum")],
)
def test_a_malformed_payload_is_refused_with_a_clear_error(change, message):
    with pytest.raises(PayloadError, match=message):
        fedavg.parse({**train_payload(), **change})


def test_every_round_and_shard_gets_its_own_data_order_seed():
    seeds = {fedavg.unit_seed(0, r, s) for r in range(10) for s in range(10)}

    assert len(seeds) == 100 and all(0 <= seed < 2**63 for seed in seeds)
