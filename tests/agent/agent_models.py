"""Model, weight and input builders for the agent tests (the tests may import torch; the agent may not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file

from worker_agent.architectures import resolve

MLP = ("mlp", {"in_features": 6, "hidden": [16, 8], "out_features": 3})
CNN = ("cnn", {"in_channels": 1, "height": 8, "width": 8, "channels": [4, 8], "hidden": 16, "out_features": 10})


def weights(arch_name: str, config: dict[str, Any], *, seed: int = 0) -> dict[str, torch.Tensor]:
    arch, normal = resolve(arch_name, config)
    torch.manual_seed(seed)
    model = arch.build(normal)
    return {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}


def inputs(arch_name: str, config: dict[str, Any], rows: int, *, seed: int = 1) -> torch.Tensor:
    arch, normal = resolve(arch_name, config)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, *arch.input_shape(normal)), generator=generator)


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def payload(arch_name: str, config: dict[str, Any], *, weights_sha: str, x_sha: str, rows: int, batch_size: int,
            seconds: float = 60, memory_mb: int = 2048) -> dict[str, Any]:
    arch, normal = resolve(arch_name, config)
    return {
        "kind": "inference",
        "model": {"architecture": arch_name, "config": config, "weights": weights_sha},
        "inputs": {"x": x_sha},
        "rows": rows,
        "batch_size": batch_size,
        "output": {"name": "y", "dtype": "float32", "shape": [rows, arch.output_dim(normal)]},
        "limits": {"seconds": seconds, "memory_mb": memory_mb},
    }


def reference_forward(arch_name: str, config: dict[str, Any], state: dict[str, torch.Tensor], x: torch.Tensor,
                      batch_size: int) -> torch.Tensor:
    """The same computation in this process, batch by batch: what the child must match bit for bit."""
    arch, normal = resolve(arch_name, config)
    model = arch.build(normal)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
