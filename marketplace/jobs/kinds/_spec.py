"""Spec checks every job kind shares: the spec's outer shape, its model, bounded integers, artifact headers;
and the parts of a unit payload every kind takes from its normalised spec (the records of worker_agent/wire.py).

Each helper records a problem under its field key in `errors` instead of raising, so a submitter sees
every problem of a spec at once; the kind raises ValidationFailed when it has looked at everything.
"""

from __future__ import annotations

from typing import Any

from marketplace.artifacts.models import Artifact
from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import ValidationFailed
from marketplace.core.tensors import TensorFileError, TensorInfo, read_header_from
from worker_agent.architectures import Architecture, ArchitectureError, resolve
from worker_agent.protocol import is_sha256_hex
from worker_agent.wire import DEVICE_TYPES, Limits, ModelRef


def spec_open(
    spec: Any, *, allowed_keys: set[str]
) -> tuple[dict[str, str], Any, Architecture | None, dict[str, Any] | None]:
    """Refuse a spec that is not an object; note unknown keys and resolve the model.

    Returns (errors so far, the raw `model` value, its architecture, its resolved config); the last two
    are None when the model could not be resolved (the reason is in errors)."""
    if not isinstance(spec, dict):
        raise ValidationFailed("spec must be an object", fields={"spec": "must be an object"})
    errors: dict[str, str] = {}
    unknown = sorted(set(spec) - allowed_keys)
    if unknown:
        errors["spec"] = f"unknown keys: {', '.join(unknown)}"
    model = spec.get("model")
    arch = config = None
    if not isinstance(model, dict) or set(model) != {"architecture", "config", "weights"}:
        errors["model"] = "must be an object with exactly architecture, config and weights"
    else:
        try:
            arch, config = resolve(model["architecture"], model["config"])
        except ArchitectureError as exc:
            errors["model.architecture" if "architecture" in str(exc) else "model.config"] = str(exc)
    return errors, model, arch, config


def bounded_int(
    spec: dict[str, Any], key: str, low: int, high: int, errors: dict[str, str], *, defaults: dict[str, Any]
) -> int:
    """spec[key] (defaults[key] when absent) if it is an integer in [low, high]; else the default, noting why."""
    value = spec.get(key, defaults[key])
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        errors[key] = f"must be an integer between {low} and {high}"
        return defaults[key]
    return value


def artifact_header(sha256: Any, field: str, owner: Any, errors: dict[str, str]) -> dict[str, TensorInfo] | None:
    """The tensor header of an artifact `owner` uploaded, or None (the reason in errors). Only the header's
    bytes are read, wherever the artifact is stored: a submission does not fetch a whole dataset."""
    if not is_sha256_hex(sha256):
        errors[field] = "must be the sha256 of an uploaded artifact (64 lowercase hex digits)"
        return None
    size = Artifact.objects.filter(sha256=sha256, owners=owner).values_list("size", flat=True).first()
    if size is None:
        errors[field] = f"you have uploaded no artifact {sha256}"
        return None
    try:
        with get_storage().open(sha256) as stream:
            return read_header_from(stream, size=size)
    except TensorFileError as exc:
        errors[field] = str(exc)
        return None


def check_weights(header: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], errors: dict[str, str]) -> None:
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or extra:
        errors["model.weights"] = f"tensor names do not match the architecture (missing {missing}, unexpected {extra})"
        return
    for name, shape in expected.items():
        if header[name].dtype != "F32" or header[name].shape != shape:
            errors["model.weights"] = (
                f"tensor {name!r} is {header[name].dtype}{list(header[name].shape)}, expected F32{list(shape)}"
            )
            return


DEVICES = DEVICE_TYPES  # the agent's device types (worker_agent/wire.py)
MAX_GPU_MEMORY_MB = 1 << 20  # 1 TiB: above any GPU made


def device_options(spec: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    """The job's device requirement: `device` "cpu" (the default: runs on any device, on its CPU) or "cuda"
    (only devices that report a CUDA GPU), and `min_gpu_memory_mb` (cuda only; normalised to at least 1:
    a cuda unit needs some GPU, which is how the lease tells it from a CPU unit)."""
    device = spec.get("device", "cpu")
    gpu_mb = spec.get("min_gpu_memory_mb", 0)
    if device not in DEVICES:
        errors["device"] = f"must be one of {', '.join(DEVICES)}"
        device = "cpu"
    if isinstance(gpu_mb, bool) or not isinstance(gpu_mb, int) or not 0 <= gpu_mb <= MAX_GPU_MEMORY_MB:
        errors["min_gpu_memory_mb"] = f"must be an integer between 0 and {MAX_GPU_MEMORY_MB}"
        gpu_mb = 0
    elif device == "cpu" and gpu_mb:
        errors["min_gpu_memory_mb"] = "is only meaningful with device 'cuda'"
        gpu_mb = 0
    return {"device": device, "min_gpu_memory_mb": max(1, gpu_mb) if device == "cuda" else 0}


# --- payload parts --------------------------------------------------------------------------------

def model_ref(model: dict[str, Any]) -> ModelRef:
    """A normalised spec's `model` (validate_spec made it exactly these three) as the payload's record."""
    return ModelRef(architecture=model["architecture"], config=model["config"], weights=model["weights"])


def unit_limits(spec: dict[str, Any]) -> Limits:
    return Limits(seconds=spec["unit_timeout_seconds"], memory_mb=spec["unit_memory_mb"])
