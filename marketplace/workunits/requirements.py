"""What a unit needs of the device that computes it (memory, a device type and GPU memory, its kind), and
what a device can run (`Capacity`, from the capabilities it reports): the two sides the lease matches.

Computed once, when the unit is made (units_create), from its payload and its job's spec, and stored
on the unit and on every replica row (denormalised: the lease statement filters replicas by them with
no join per candidate). Every place that makes a Result row copies them with `replica_needs`.

Memory is an estimate of what the unit itself takes on top of the agent's runtime (the same thing its
`limits.memory_mb` caps, worker_agent/child.py): the weights (four copies when training: weights,
gradients, momentum and the round's start), the input rows (and outputs or labels), and the
activations of one batch, ACTIVATION_FACTOR times its input and output widths, plus allocator slack.
`limits.memory_mb` is the submitter's cap, not an estimate (default 2048 whatever the model): the
need is the estimate, never more than that cap (the child is killed at the cap anyway), so a job with
default limits asks of a device no more than the agent's old fixed 2048 MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod
from typing import Any

from django.conf import settings
from django.db.models import Q

from worker_agent.architectures import resolve
from worker_agent.wire import DEFAULT_MEMORY_MB, Capabilities

ACTIVATION_FACTOR = 16  # activations per batch row, in multiples of its input + output widths
SLACK_MB = 64  # the allocator's and safetensors' buffers around the tensors themselves
FLOAT_BYTES, LABEL_BYTES = 4, 8
NEEDS = ("need_memory_mb", "need_device", "need_gpu_mb", "kind")  # the columns on WorkUnit and Result
# The kinds every agent shipped before agents reported capabilities (an old agent runs these).
UNREPORTED_KINDS = ("fedavg", "inference")


@dataclass(frozen=True)
class Requirements:
    memory_mb: int
    device: str  # "cpu" (any device) or "cuda"
    gpu_memory_mb: int  # 0 for cpu; at least 1 for cuda (jobs/kinds/_spec.device_options)
    kind: str

    def columns(self) -> dict[str, Any]:
        return dict(zip(NEEDS, (self.memory_mb, self.device, self.gpu_memory_mb, self.kind), strict=True))


@dataclass(frozen=True)
class Capacity:
    """What a device can run, as the lease matches it: memory for a unit (MB), GPU memory (MB, 0: no
    CUDA device) and the kinds it ships."""

    memory_mb: int
    gpu_mb: int
    kinds: tuple[str, ...]


def capacity_of(capabilities: Capabilities | None) -> Capacity:
    """A lease request's capabilities as the lease matches them. None (an agent older than capability
    matching) is matched conservatively: a CPU device with IDLEGRID_UNREPORTED_MEMORY_MB, running the kinds
    agents shipped then."""
    if capabilities is None:
        return Capacity(settings.IDLEGRID_UNREPORTED_MEMORY_MB, 0, UNREPORTED_KINDS)
    gpu = capabilities.gpu_memory_mb if capabilities.device_type == "cuda" else 0
    return Capacity(capabilities.memory_mb, gpu, tuple(sorted(capabilities.kinds)))


def memory_estimate_mb(*, architecture: str, config: dict[str, Any], rows: int, batch_size: int,
                       training: bool) -> int:
    """MB a unit of `rows` rows of this model takes (module docstring)."""
    arch, normal = resolve(architecture, config)
    params = sum(prod(shape) for shape in arch.param_shapes(normal).values())
    width, out = prod(arch.input_shape(normal)), arch.output_dim(normal)
    weights = params * FLOAT_BYTES * (4 if training else 1)
    data = rows * (width * FLOAT_BYTES + (LABEL_BYTES if training else out * FLOAT_BYTES))
    activations = min(batch_size, rows) * (width + out) * FLOAT_BYTES * ACTIVATION_FACTOR
    return SLACK_MB + ceil((weights + data + activations) / (1 << 20))


def unit_requirements(*, payload: dict[str, Any], spec: dict[str, Any]) -> Requirements:
    """A unit's requirements from its payload (a payload record's to_wire()) and its job's normalised spec."""
    kind = payload["kind"]
    training = kind == "fedavg"
    estimate = memory_estimate_mb(
        architecture=payload["model"]["architecture"], config=payload["model"]["config"],
        rows=payload["samples"] if training else payload["rows"],
        batch_size=payload["train"]["batch_size"] if training else payload["batch_size"], training=training,
    )
    cap = payload.get("limits", {}).get("memory_mb", DEFAULT_MEMORY_MB)
    device = spec.get("device", "cpu")
    return Requirements(memory_mb=min(estimate, cap), device=device,
                        gpu_memory_mb=spec.get("min_gpu_memory_mb", 0) if device == "cuda" else 0, kind=kind)


def replica_needs(unit: Any) -> dict[str, Any]:
    """The requirement columns a new replica of `unit` (a WorkUnit, or a dict of its NEEDS) carries."""
    if isinstance(unit, dict):
        return {name: unit[name] for name in NEEDS}
    return {name: getattr(unit, name) for name in NEEDS}


def job_requirements(*, kind: str, spec: dict[str, Any]) -> Requirements:
    """What the largest unit of a validated job (its normalised spec) will need, before it is split: the
    quote's question (marketplace/jobs/quotes.py)."""
    training = kind == "fedavg"
    if training:
        rows, batch = ceil(spec["train_rows"] / spec["shards"]), spec["batch_size"]
    else:
        rows = min(spec["rows_per_unit"], spec["rows"]) + spec.get("known_answers_per_unit", 0)
        batch = spec["batch_size"]
    model = spec["model"]
    estimate = memory_estimate_mb(architecture=model["architecture"], config=model["config"], rows=rows,
                                  batch_size=batch, training=training)
    device = spec.get("device", "cpu")
    return Requirements(memory_mb=min(estimate, spec["unit_memory_mb"]), device=device,
                        gpu_memory_mb=spec.get("min_gpu_memory_mb", 0) if device == "cuda" else 0, kind=kind)


def devices_able(needs: Requirements) -> Q:
    """A filter of workers.Device: the devices whose last reported capabilities (Device.cap_*) fit `needs`,
    matched as the lease matches them. A device that never reported any (an old agent) counts as the
    lease treats it: a CPU device with IDLEGRID_UNREPORTED_MEMORY_MB, running UNREPORTED_KINDS."""
    reported = Q(cap_memory_mb__gte=needs.memory_mb, cap_gpu_mb__gte=needs.gpu_memory_mb,
                 cap_kinds__contains=f",{needs.kind},")
    unreported = needs.gpu_memory_mb == 0 and needs.kind in UNREPORTED_KINDS and (
        needs.memory_mb <= settings.IDLEGRID_UNREPORTED_MEMORY_MB)
    return reported | Q(cap_memory_mb__isnull=True) if unreported else reported


def not_runnable_sentence(needs: Requirements) -> str:
    """Why no device can run units with these needs, in a sentence for the submitter."""
    gpu = f" and a CUDA GPU with {needs.gpu_memory_mb} MB" if needs.device == "cuda" else ""
    return (f"no active device can run this job's units: each needs {needs.memory_mb} MB of free memory{gpu} "
            f"and an agent that runs {needs.kind!r}")
