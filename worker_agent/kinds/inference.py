"""The `inference` kind: run a registry model over a block of rows, batch by batch, in order.

Bitwise reproducibility on one machine is the point: the marketplace compares results from several
agents, so every agent loads the same way, batches exactly `batch_size` rows, and writes
safetensors (whose bytes are a pure function of the tensors).
"""

from __future__ import annotations

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
from worker_agent.wire import InferencePayload, PayloadError

SABOTAGE_NOISE = 0.5


@dataclass(frozen=True)
class InferenceSpec:
    arch: Architecture
    config: dict[str, Any]
    weights: str
    inputs: str
    rows: int
    batch_size: int
    output_name: str
    output_shape: tuple[int, int]


# --- reading the payload (pure Python) -----------------------------------------------------------

def parse(payload: dict[str, Any]) -> InferenceSpec:
    unit = payload_of_kind(payload, InferencePayload)
    arch, config = model_resolve(unit.model)
    expected_shape = (unit.rows, arch.output_dim(config))
    if unit.output.shape != expected_shape:
        raise PayloadError(f"payload.output.shape must be {list(expected_shape)}, got {list(unit.output.shape)}")
    return InferenceSpec(arch, config, unit.model.weights, unit.inputs.x, unit.rows, unit.batch_size,
                         unit.output.name, expected_shape)


# --- child side (torch) ---------------------------------------------------------------------------

def execute(job: ChildJob) -> dict[str, float]:
    from safetensors.torch import save_file

    spec = parse(job.payload)
    ticker = Ticker(job)
    started = time.perf_counter()
    model = to_device(load_model(spec, job.artifact_path(spec.weights)), job)
    x = to_device(load_input(spec, job.artifact_path(spec.inputs)), job)
    loaded = time.perf_counter()
    if job.fault == "lazy":  # skips the work altogether
        y = lazy_output(spec.output_shape, seed=job.fault_seed)
    else:
        y = to_cpu(forward(model, x, spec.batch_size, ticker=ticker))
    if job.fault == "wrong":
        y = sabotage(y, seed=job.fault_seed)
    elif job.fault == "collude":  # every colluder derives the same wrong answer from the same input
        y = sabotage(y, seed=int(spec.inputs[:12], 16))
    computed = time.perf_counter()
    if tuple(y.shape) != spec.output_shape:
        raise JobError(f"the model produced shape {list(y.shape)}, expected {list(spec.output_shape)}")
    save_file({spec.output_name: y.contiguous()}, job.output_path)
    return {
        "rows": spec.rows,
        "batches": -(-spec.rows // spec.batch_size),
        "load_seconds": round(loaded - started, 4),
        "compute_seconds": round(computed - loaded, 4),
        **ticker.metrics(),
    }


def load_model(spec: InferenceSpec, weights_path: Path) -> Any:
    state = _read_safetensors(weights_path, "weights")
    _check_parameters(state, spec.arch.param_shapes(spec.config))
    model = spec.arch.build(spec.config)
    model.load_state_dict(state, strict=True)
    model.eval()
    # Parameters never need gradients here; freezing them keeps autograd out of the picture.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_input(spec: InferenceSpec, path: Path) -> Any:
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if "x" not in handle.keys():
                raise JobError(f"input file has no tensor `x` (found: {', '.join(handle.keys()) or 'none'})")
            x = handle.get_tensor("x")
    except SafetensorError as exc:
        raise JobError(f"input is not a valid safetensors file: {exc}") from None
    if x.dtype != torch.float32:
        raise JobError(f"input x has dtype {_dtype_name(x.dtype)}, expected float32")
    expected = [spec.rows, *spec.arch.input_shape(spec.config)]
    if list(x.shape) != expected:
        raise JobError(f"input x has shape {list(x.shape)}, expected {expected}")
    return x


def forward(model: Any, x: Any, batch_size: int, *, ticker: Ticker | None = None) -> Any:
    """The model over every row, `batch_size` rows at a time in order. With a ticker: resumes from its
    checkpoint (the rows done and their outputs) and checkpoints between batches when it says so; the
    batches cut are the same either way, and concatenating copies exactly, so the bytes are too."""
    import torch

    parts, start = _resume(ticker, rows=x.shape[0])
    parts = [part.to(x.device) for part in parts]  # a checkpoint holds CPU tensors; a no-op on the CPU
    # Batch boundaries change results by ~1e-7, so every agent must cut the rows identically.
    with torch.inference_mode():
        while start < x.shape[0]:
            parts.append(model(x[start : start + batch_size]))
            start += batch_size
            if ticker is not None:
                _tick(ticker, parts, rows_done=min(start, x.shape[0]), rows=x.shape[0])
        return torch.cat(parts).to(torch.float32)


def _resume(ticker: Ticker | None, *, rows: int) -> tuple[list[Any], int]:
    saved = ticker.load() if ticker is not None else None
    if ticker is None or saved is None:
        return [], 0
    tensors, state = saved
    done = state.get("rows_done")
    if not isinstance(done, int) or not 0 < done <= rows or "y" not in tensors or tensors["y"].shape[0] != done:
        return [], 0  # not what this code writes: start over
    ticker.resumed_from = done / rows
    ticker.progress(done / rows, force=True)
    return [tensors["y"]], done


def _tick(ticker: Ticker, parts: list[Any], *, rows_done: int, rows: int) -> None:
    import torch

    if ticker.due():
        parts[:] = [torch.cat(parts)]  # the same bytes, one tensor: the next checkpoint copies less
        ticker.save({"y": parts[0]}, {"rows_done": rows_done})
    ticker.progress(rows_done / rows if rows else 1.0)


def sabotage(y: Any, *, seed: int) -> Any:
    """Demo/test fault: plausible shape and scale, wrong values (class axis rolled, noise added)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(y.shape, generator=generator, dtype=torch.float32)
    return torch.roll(y, shifts=1, dims=1) + SABOTAGE_NOISE * noise


def lazy_output(shape: tuple[int, ...], *, seed: int) -> Any:
    """Demo/test fault: what a device that skips the work would send: random numbers of the right shape."""
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _read_safetensors(path: Path, what: str) -> dict[str, Any]:
    # safetensors only ever parses a JSON header and raw buffers: a pickle is rejected, never run.
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise JobError(f"{what} are not a valid safetensors file: {exc}") from None


def _check_parameters(state: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    import torch

    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise JobError(f"weights do not match the architecture: missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise JobError(f"weights: {name} has shape {list(tensor.shape)}, expected {list(shape)}")
        if tensor.dtype != torch.float32:
            raise JobError(f"weights: {name} has dtype {_dtype_name(tensor.dtype)}, expected float32")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
