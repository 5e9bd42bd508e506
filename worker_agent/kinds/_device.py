"""Where a unit computes, on the child's side (torch): the CPU or the CUDA device of `job.device`.

The kinds move their model and tensors with `to_device` and bring results back with `to_cpu` before
saving, so a CPU unit runs the same code path as a CUDA one (`.to("cpu")` of a CPU tensor is the tensor
itself). The child calls `cuda_prepare` before its warm-up and `cuda_facts` for its numerics facts.

Determinism on CUDA: torch's deterministic algorithms are already on in the child (an op with no
deterministic CUDA kernel raises rather than varying); cuDNN is pinned to deterministic kernels with
benchmarking (which picks kernels by timing) off; TF32 is off for matmul and cuDNN (it drops float32's
mantissa to 10 bits); cuBLAS gets a fixed workspace (CUBLAS_WORKSPACE_CONFIG=":4096:8", which CUDA >= 10.2
needs for reproducible results, set in the environment before torch is imported).

Memory: RLIMIT_AS bounds the child's address space, not the card's memory, so a CUDA unit's
`limits.memory_mb` is also applied as the caching allocator's share of the card
(`torch.cuda.set_per_process_memory_fraction`); exceeding it raises torch.cuda.OutOfMemoryError, reported
as the unit's memory limit.
"""

from __future__ import annotations

import os
from typing import Any

from worker_agent.gpu import CHILD_GPU_ENV
from worker_agent.jobfile import ChildJob

CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def gpu_wanted() -> bool:
    """Whether the agent lets this child use a GPU (the policy's `gpu` key, passed in its environment)."""
    return os.environ.get(CHILD_GPU_ENV) == "auto"


def cuda_env() -> None:
    """Before torch is imported: the environment CUDA reads once, at its first use."""
    if gpu_wanted():
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG


def cuda_usable() -> bool:
    import torch

    return gpu_wanted() and torch.cuda.is_available()


def cuda_prepare() -> None:
    """On a CUDA device the agent allows: the determinism switches, then a tiny op on cuda:0, so the
    CUDA context (and the address space it maps) exists before the child measures its baseline."""
    import torch

    if not cuda_usable():
        return
    cuda_switches()
    with torch.inference_mode():
        torch.nn.functional.linear(torch.zeros(1, 4, device="cuda:0"), torch.zeros(2, 4, device="cuda:0")).cpu()


def cuda_switches() -> None:
    import torch

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def cuda_facts() -> dict[str, object]:
    """The child's CUDA facts (added to numerics_facts), or {} on the CPU. `gpu_uuid` lets the agent
    find the same card in NVML (CUDA and NVML number devices differently); it is not a class fact."""
    import torch

    if not cuda_usable():
        return {}
    props = torch.cuda.get_device_properties(0)
    return {
        "device_type": "cuda",
        "gpu": {"name": str(props.name), "memory_mb": int(props.total_memory) >> 20,
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda},
        "gpu_uuid": str(getattr(props, "uuid", "")) or None,
        "cuda_numerics": {
            "cudnn_version": torch.backends.cudnn.version(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        },
    }


def torch_device(job: ChildJob) -> Any:
    """The torch.device of the unit. On CUDA it also caps the caching allocator at the unit's
    memory_mb; RuntimeError when this child may not or cannot use that device."""
    import torch

    device = torch.device(job.device)
    if device.type == "cuda":
        if not cuda_usable():
            raise RuntimeError(f"this compute child has no usable CUDA device for {job.device} "
                               f"(the agent's gpu policy is {os.environ.get(CHILD_GPU_ENV, 'off')!r})")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"this compute child sees {torch.cuda.device_count()} CUDA device(s), not {job.device}")
        total_mb = torch.cuda.get_device_properties(index).total_memory >> 20
        torch.cuda.set_per_process_memory_fraction(min(1.0, job.limits.memory_mb / total_mb), index)
    return device


def to_device(value: Any, job: ChildJob) -> Any:
    """A module, tensor, or tuple of tensors on the unit's device."""
    device = torch_device(job)
    if isinstance(value, tuple):
        return tuple(item.to(device) for item in value)
    return value.to(device)


def to_cpu(value: Any) -> Any:
    """A tensor, or dict of tensors, back on the CPU (where outputs are saved and sabotage noise is drawn)."""
    if isinstance(value, dict):
        return {name: tensor.to("cpu") for name, tensor in value.items()}
    return value.to("cpu")
