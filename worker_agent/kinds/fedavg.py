"""The `fedavg` kind: train the round's global weights on one data shard, locally and deterministically.

Replicas of a unit are compared by the marketplace, so local training must be a pure function of the
unit: the data order comes from the unit's seed (a torch.Generator, never the global RNG), the child
runs one thread with torch's deterministic algorithms (1 vs 2 threads differ in the last bits), the
optimiser is plain SGD started fresh every unit (no state carried between rounds), and the output is
safetensors (bytes a pure function of the tensors). Inside one hardware class two honest replicas are
bitwise identical; across classes the marketplace compares with a tolerance.

Output file: every parameter of the architecture under its own name (float32), plus the training
metrics in the signed file itself, `__train_loss__` (float32 [1], the mean cross-entropy over every
local step) and `__samples__` (int64 [1], the shard's rows). Metrics in the report body are not signed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker_agent.architectures import Architecture
from worker_agent.jobfile import ChildJob
from worker_agent.kinds import JobError
from worker_agent.kinds._checkpoint import Ticker
from worker_agent.kinds._device import to_cpu, to_device
from worker_agent.kinds._payload import model_resolve, payload_of_kind
from worker_agent.wire import FedAvgPayload

LOSS_NAME = "__train_loss__"
SAMPLES_NAME = "__samples__"
METRIC_NAMES = (LOSS_NAME, SAMPLES_NAME)
# --faulty poison: the honest update, sign-flipped and boosted (a model-poisoning client's classic move).
POISON_SCALE = -10.0
SABOTAGE_NOISE = 0.05


@dataclass(frozen=True)
class TrainSpec:
    arch: Architecture
    config: dict[str, Any]
    weights: str
    x: str
    y: str
    samples: int
    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    seed: int


def unit_seed(seed: int, round_index: int, shard: int) -> int:
    """The data-order seed of one unit: different per round and shard, the same for every replica.
    The marketplace puts it in the payload; the reference loop derives it the same way."""
    digest = hashlib.sha256(f"idlegrid-fedavg-v1\n{seed}\n{round_index}\n{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch.Generator takes a non-negative int64


# --- reading the payload (pure Python) -----------------------------------------------------------

def parse(payload: dict[str, Any]) -> TrainSpec:
    unit = payload_of_kind(payload, FedAvgPayload)
    arch, config = model_resolve(unit.model)
    train = unit.train
    return TrainSpec(
        arch=arch, config=config, weights=unit.model.weights, x=unit.inputs.x, y=unit.inputs.y,
        samples=unit.samples, epochs=train.epochs, batch_size=train.batch_size,
        learning_rate=float(train.learning_rate), momentum=float(train.momentum), seed=train.seed,
    )


# --- child side (torch) ---------------------------------------------------------------------------

def execute(job: ChildJob) -> dict[str, float]:
    from safetensors.torch import save_file

    spec = parse(job.payload)
    ticker = Ticker(job)
    started = time.perf_counter()
    model = to_device(load_model(spec, job.artifact_path(spec.weights)), job)
    start_weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    x, y = to_device(load_shard(spec, job.artifact_path(spec.x), job.artifact_path(spec.y)), job)
    loaded = time.perf_counter()
    if job.fault == "lazy":  # a free rider: sends the global weights back untrained
        weights, loss = start_weights, 0.0
    else:
        loss = train_local(model, x, y, epochs=spec.epochs, batch_size=spec.batch_size,
                           learning_rate=spec.learning_rate, seed=spec.seed, momentum=spec.momentum,
                           ticker=ticker)
        weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    weights, start_weights = to_cpu(weights), to_cpu(start_weights)
    weights = sabotage(weights, start_weights, fault=job.fault, seed=job.fault_seed, unit_seed=spec.seed)
    computed = time.perf_counter()
    save_file(output_tensors(weights, loss=loss, samples=spec.samples), job.output_path)
    return {
        "samples": spec.samples,
        "train_loss": round(loss, 6),
        "load_seconds": round(loaded - started, 4),
        "compute_seconds": round(computed - loaded, 4),
        **ticker.metrics(),
    }


def train_local(model: Any, x: Any, y: Any, *, epochs: int, batch_size: int, learning_rate: float, seed: int,
                momentum: float = 0.0, ticker: Ticker | None = None) -> float:
    """Minibatch SGD (with optional momentum, its state fresh every unit) on cross-entropy, in an order fixed by `seed`; returns the mean loss per sample.
    Shared with the reference loop (demo/fedavg_reference.py), so both train exactly alike.

    With a ticker: resumes from its checkpoint and checkpoints between batches when it says so. A
    checkpoint holds all that the rest of the run depends on: the weights, the optimiser's state
    (momentum buffers), the data position (epoch, next batch, that epoch's order), the order
    generator's state and the loss sums; so a resumed run gives the same bytes as a straight one."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    model.train()
    position = _TrainPosition()
    if ticker is not None:
        position = _resume_training(ticker, model, optimiser, generator) or position
    batches = -(-x.shape[0] // batch_size)
    if ticker is not None and position.seen:
        ticker.resumed_from = (position.epoch * batches + position.batch) / (epochs * batches)
        ticker.progress(ticker.resumed_from, force=True)
    for epoch in range(position.epoch, epochs):
        if position.order is None:
            position.order = torch.randperm(x.shape[0], generator=generator)
        for index, batch in enumerate(position.order.split(batch_size)):
            if index < position.batch:
                continue
            optimiser.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimiser.step()
            position.total += float(loss.detach()) * len(batch)
            position.seen += len(batch)
            if ticker is not None:
                position.epoch, position.batch = epoch, index + 1
                _tick_training(ticker, model, optimiser, generator, position)
                ticker.progress((epoch * batches + index + 1) / (epochs * batches))
        position.order, position.batch = None, 0
    model.eval()
    return position.total / position.seen


@dataclass
class _TrainPosition:
    epoch: int = 0
    batch: int = 0  # the next batch of `order` to train on
    order: Any = None  # this epoch's permutation (drawn at its start), None before it is drawn
    total: float = 0.0
    seen: int = 0


def _tick_training(ticker: Ticker, model: Any, optimiser: Any, generator: Any, position: _TrainPosition) -> None:
    if not ticker.due():
        return
    tensors = {f"model.{name}": tensor.detach() for name, tensor in model.state_dict().items()}
    buffers: list[int] = []
    for index, state in optimiser.state_dict()["state"].items():
        if state.get("momentum_buffer") is not None:
            tensors[f"momentum.{index}"] = state["momentum_buffer"]
            buffers.append(index)
    tensors["generator"] = generator.get_state()
    tensors["order"] = position.order
    ticker.save(tensors, {"epoch": position.epoch, "batch": position.batch, "total": position.total,
                          "seen": position.seen, "momentum": buffers})


def _resume_training(ticker: Ticker, model: Any, optimiser: Any, generator: Any) -> _TrainPosition | None:
    saved = ticker.load()
    if saved is None:
        return None
    tensors, state = saved
    try:
        weights = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
        model.load_state_dict(weights, strict=True)
        groups = optimiser.state_dict()["param_groups"]
        momentum = {index: {"momentum_buffer": tensors[f"momentum.{index}"]} for index in state["momentum"]}
        optimiser.load_state_dict({"state": momentum, "param_groups": groups})
        generator.set_state(tensors["generator"])
        position = _TrainPosition(epoch=state["epoch"], batch=state["batch"], order=tensors["order"],
                                  total=float(state["total"]), seen=int(state["seen"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        # Not what this code writes (the digest includes the agent's version, so hardly ever). The model
        # may be half loaded, so this run cannot start over in place: the checkpoint goes, the next one does.
        if ticker.path is not None:
            ticker.path.unlink(missing_ok=True)
        raise RuntimeError(f"checkpoint unusable and deleted ({exc}); the unit starts over when run again") from None
    return position


def output_tensors(weights: dict[str, Any], *, loss: float, samples: int) -> dict[str, Any]:
    import torch

    tensors = {name: tensor.to(torch.float32).contiguous() for name, tensor in weights.items()}
    tensors[LOSS_NAME] = torch.tensor([loss], dtype=torch.float32)
    tensors[SAMPLES_NAME] = torch.tensor([samples], dtype=torch.int64)
    return tensors


def sabotage(weights: dict[str, Any], start: dict[str, Any], *, fault: str | None, seed: int, unit_seed: int) -> dict[str, Any]:
    """Demo/test faults. poison: the update sign-flipped and scaled; wrong: noise differing per result;
    collude: the same noise for the same unit on every colluding device; lazy was handled by the caller."""
    import torch

    if fault == "poison":
        return {name: start[name] + POISON_SCALE * (weights[name] - start[name]) for name in weights}
    if fault in ("wrong", "collude"):
        generator = torch.Generator().manual_seed(seed if fault == "wrong" else unit_seed)
        return {name: w + SABOTAGE_NOISE * torch.randn(w.shape, generator=generator) for name, w in sorted(weights.items())}
    return weights


def load_model(spec: TrainSpec, weights_path: Path) -> Any:
    from worker_agent.kinds.inference import _check_parameters, _read_safetensors

    state = _read_safetensors(weights_path, "weights")
    _check_parameters(state, spec.arch.param_shapes(spec.config))
    model = spec.arch.build(spec.config)
    model.load_state_dict(state, strict=True)
    return model


def load_shard(spec: TrainSpec, x_path: Path, y_path: Path) -> tuple[Any, Any]:
    import torch

    x, y = _one_tensor(x_path, "x"), _one_tensor(y_path, "y")
    if x.dtype != torch.float32:
        raise JobError(f"shard x has dtype {str(x.dtype).removeprefix('torch.')}, expected float32")
    if y.dtype != torch.int64:
        raise JobError(f"shard y has dtype {str(y.dtype).removeprefix('torch.')}, expected int64")
    expected = [spec.samples, *spec.arch.input_shape(spec.config)]
    if list(x.shape) != expected:
        raise JobError(f"shard x has shape {list(x.shape)}, expected {expected}")
    if list(y.shape) != [spec.samples]:
        raise JobError(f"shard y has shape {list(y.shape)}, expected [{spec.samples}]")
    classes = spec.arch.output_dim(spec.config)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise JobError(f"shard y holds labels outside [0, {classes})")
    return x, y


def _one_tensor(path: Path, name: str) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if list(handle.keys()) != [name]:
                raise JobError(f"shard file must hold exactly one tensor `{name}` (found: {', '.join(handle.keys()) or 'none'})")
            return handle.get_tensor(name)
    except SafetensorError as exc:
        raise JobError(f"shard {name} is not a valid safetensors file: {exc}") from None
