"""Batch inference: a registry model over a float32 tensor, split by rows, merged into one output."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from math import ceil
from pathlib import Path
from typing import Any

import numpy as np

from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import ValidationFailed
from marketplace.core.tensors import TensorFileError, TensorInfo, array_file_bytes, read_array, read_header
from marketplace.jobs import comparators
from marketplace.jobs.kinds._spec import artifact_header, bounded_int, check_weights, spec_open
from worker_agent.architectures import resolve

DEFAULTS: dict[str, Any] = {
    "rows_per_unit": 256,
    "batch_size": 64,
    # Inside one hardware class: bitwise equality (class_exact). Across classes: allclose + same top-1.
    # Honest disagreement measured on the project's machine (torch 2.13 CPU float32, MLP and CNN
    # units): ~1.6e-7 across batch layouts and instruction sets (shared/research/BASELINES.md); with
    # MKL and oneDNN capped at AVX2 vs native AVX512, at most 2.1e-7 absolute, an absolute floor of
    # 2.0e-7 plus 4.6e-7 relative beyond it, predicted class never changed. `manage.py
    # tolerance_calibrate` on those pairs recommends rtol 4.6e-6, atol 2.1e-6 (x10 margin); these
    # defaults pass every such pair with 1e-6 + 1e-5|y| (>= 5x the largest difference seen).
    "compare": {"method": "allclose", "rtol": 1e-5, "atol": 1e-6, "top1": True, "class_exact": True},
    "quorum": 2,
    "max_results_per_unit": 6,
    "unit_timeout_seconds": 300,
    "unit_memory_mb": 2048,
    # Adaptive replication: a trusted device's units are accepted on its word, audited at random.
    # False replicates every unit to the quorum, whoever computes it.
    "adaptive": True,
}
ALLOWED_KEYS = {"model", "dataset", *DEFAULTS}
MAX_UNITS = 100_000
OUTPUT_NAME = "y"
_bounded_int = partial(bounded_int, defaults=DEFAULTS)


@dataclass(frozen=True)
class UnitPlan:
    index: int
    payload: dict[str, Any]
    inputs: list[bytes]  # raw files to store as the unit's input artifacts, in payload order


def _compare(spec: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    compare, problems = comparators.validate(spec.get("compare", {}))
    errors.update(problems)
    return compare


def validate_spec(spec: Any, *, owner: Any) -> dict[str, Any]:
    """Check everything about an inference spec, reading only artifact headers. Returns the normalised spec."""
    errors, model, arch, config = spec_open(spec, allowed_keys=ALLOWED_KEYS)
    normal: dict[str, Any] = {
        "rows_per_unit": _bounded_int(spec, "rows_per_unit", 1, 1_000_000, errors),
        "batch_size": _bounded_int(spec, "batch_size", 1, 65_536, errors),
        "compare": _compare(spec, errors),
        "quorum": _bounded_int(spec, "quorum", 2, 10, errors),
        "max_results_per_unit": _bounded_int(spec, "max_results_per_unit", 2, 20, errors),
        "unit_timeout_seconds": _bounded_int(spec, "unit_timeout_seconds", 1, 86_400, errors),
        "unit_memory_mb": _bounded_int(spec, "unit_memory_mb", 256, 65_536, errors),
    }
    normal["adaptive"] = spec.get("adaptive", DEFAULTS["adaptive"])
    if not isinstance(normal["adaptive"], bool):
        errors["adaptive"] = "must be true or false"
    if normal["max_results_per_unit"] < normal["quorum"]:
        errors["max_results_per_unit"] = "must be at least quorum"
    if arch is not None and config is not None:
        weights = artifact_header(model["weights"], "model.weights", owner, errors)
        if weights is not None:
            check_weights(weights[1], arch.param_shapes(config), errors)
        dataset = artifact_header(spec.get("dataset"), "dataset", owner, errors)
        if dataset is not None:
            rows = _check_dataset(dataset[1], arch.input_shape(config), errors)
            if rows and ceil(rows / normal["rows_per_unit"]) > MAX_UNITS:
                errors["rows_per_unit"] = f"would make more than {MAX_UNITS:,} units; use larger units"
            normal["rows"] = rows
    if errors:
        raise ValidationFailed("the job spec is invalid", fields=errors)
    normal["model"] = {"architecture": model["architecture"], "config": config, "weights": model["weights"]}
    normal["dataset"] = spec["dataset"]
    return normal


def _check_dataset(header: dict[str, TensorInfo], input_shape: tuple[int, ...], errors: dict[str, str]) -> int:
    x = header.get("x")
    if x is None or len(header) != 1:
        errors["dataset"] = "must hold exactly one tensor named 'x'"
        return 0
    if x.dtype != "F32":
        errors["dataset"] = f"tensor 'x' must be float32 (F32), not {x.dtype}"
        return 0
    if len(x.shape) != 1 + len(input_shape) or tuple(x.shape[1:]) != input_shape or x.shape[0] == 0:
        errors["dataset"] = f"tensor 'x' has shape {list(x.shape)}; the model needs [rows>0, {', '.join(map(str, input_shape))}]"
        return 0
    return x.shape[0]


def plan_units(spec: dict[str, Any]) -> Iterator[UnitPlan]:
    """Slice the dataset by rows, one input file per unit, reading one slice at a time."""
    path = get_storage().path(spec["dataset"])
    x = read_header(path)["x"]
    _, config = resolve(spec["model"]["architecture"], spec["model"]["config"])
    out_dim = config["out_features"]
    step = spec["rows_per_unit"]
    for index, start in enumerate(range(0, x.shape[0], step)):
        rows = read_array(path, x, rows=slice(start, min(start + step, x.shape[0])))
        payload = {
            "kind": "inference",
            "model": spec["model"],
            "inputs": {"x": None},  # filled with the slice's sha256 when stored
            "rows": int(rows.shape[0]),
            "batch_size": spec["batch_size"],
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [int(rows.shape[0]), out_dim]},
            "limits": {"seconds": spec["unit_timeout_seconds"], "memory_mb": spec["unit_memory_mb"]},
        }
        yield UnitPlan(index=index, payload=payload, inputs=[array_file_bytes(rows, name="x")])


def check_output(payload: dict[str, Any], path: Path) -> None:
    """Refuse an output that is not the one float32 tensor of the expected shape."""
    header = read_header(path)
    expected = payload["output"]
    info = header.get(expected["name"])
    if info is None or len(header) != 1:
        raise TensorFileError(f"the output must hold exactly one tensor named {expected['name']!r}")
    if info.dtype != "F32" or list(info.shape) != expected["shape"]:
        raise TensorFileError(f"the output is {info.dtype}{list(info.shape)}, expected F32{expected['shape']}")


def read_output(path: Path) -> np.ndarray:
    return read_array(path, read_header(path)[OUTPUT_NAME])


def outputs_agree(spec: dict[str, Any], a: Path, b: Path, *, same_class: bool = False) -> bool:
    """Whether two unit outputs with different digests agree (same digest: the caller agreed already).

    Inside one hardware class (`same_class`) and unless the job opted out (`class_exact: false`), only
    bitwise-identical tensors agree: CPU inference is bitwise stable within a class, so other bytes
    there are a fault. Otherwise the job's comparator decides (comparators.py)."""
    compare = comparators.effective(spec["compare"])
    ya, yb = read_output(a), read_output(b)
    if same_class and compare["class_exact"]:
        return comparators.exact(ya, yb)
    return comparators.agree(compare, ya, yb)


def merged_shape(spec: dict[str, Any]) -> tuple[int, int]:
    return spec["rows"], spec["model"]["config"]["out_features"]


def output_rows_bytes(path: Path) -> Iterator[bytes]:
    """A unit output's raw tensor bytes, in chunks, for the streamed merge."""
    info = read_header(path)[OUTPUT_NAME]
    with path.open("rb") as handle:
        handle.seek(info.start)
        remaining = info.end - info.start
        while remaining:
            chunk = handle.read(min(remaining, 1024 * 1024))
            remaining -= len(chunk)
            yield chunk


def units_expected(spec: dict[str, Any]) -> int:
    """Units a validated spec splits into (the ledger escrows price x units x expected replication)."""
    return ceil(spec["rows"] / spec["rows_per_unit"])
