"""Federated averaging: rounds of local training on shards of the training data, each round's validated
updates aggregated into the next round's global weights (orchestration: marketplace/jobs/rounds.py).

A unit is "train round r's global weights on shard i" (unit index r * shards + i); its output is the
updated weights plus the signed training metrics (worker_agent/kinds/fedavg.py). Units go through the
same verification as every other kind: an update is aggregated only once a quorum agreed on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import ValidationFailed
from marketplace.core.tensors import (
    TensorFileError,
    TensorSummary,
    array_file_bytes,
    read_array,
    read_header,
    summarize_file,
)
from marketplace.jobs import comparators
from marketplace.jobs.fedavg_math import AGGREGATIONS, dp_epsilon, shard_bounds
from marketplace.jobs.kinds._spec import (
    artifact_header,
    bounded_int,
    check_weights,
    device_options,
    model_ref,
    spec_open,
    unit_limits,
)
from marketplace.jobs.kinds.inference import UnitPlan
from worker_agent.architectures import Architecture, resolve
from worker_agent.kinds.fedavg import LOSS_NAME, METRIC_NAMES, SAMPLES_NAME, unit_seed
from worker_agent.protocol import sha256_hex
from worker_agent.wire import FedAvgInputs, FedAvgPayload, FedAvgTrain

ROUNDS = True  # jobs.services.job_merge hands a merging job to rounds.round_aggregate
DEFAULTS: dict[str, Any] = {
    "rounds": 5,
    "shards": 4,
    "local_epochs": 1,
    "batch_size": 32,
    "learning_rate": 0.05,
    "momentum": 0.0,
    "seed": 0,
    "aggregation": "mean",
    "trim_fraction": 0.2,
    # Inside one hardware class replicas train bitwise alike (class_exact). Across classes the rounding
    # differences of ~1e-7 per step compound over a unit's SGD steps; these bounds are far above that and
    # far below any real update (a poisoned or untrained one moves weights by ~1e-2 and more).
    "compare": {"method": "allclose", "rtol": 1e-3, "atol": 1e-5, "top1": False, "class_exact": True},
    "loss_epsilon": 1e-3,
    "quorum": 2,
    "max_results_per_unit": 6,
    "unit_timeout_seconds": 600,
    "unit_memory_mb": 2048,
    # The device a unit needs (_spec.device_options): "cpu" runs anywhere; "cuda" only on a CUDA GPU
    # with at least min_gpu_memory_mb.
    "device": "cpu",
    "min_gpu_memory_mb": 0,
    # An update accepted on one trusted device's word would be aggregated before any audit could
    # catch it, so federated jobs replicate every unit unless the submitter opts in.
    "adaptive": False,
}
OPTIONAL = ("dp", "target")
ALLOWED_KEYS = {"model", "train_dataset", "eval_dataset", *DEFAULTS, *OPTIONAL}
MAX_UNITS = 100_000
MAX_ROWS = 5_000_000
DEFAULT_DELTA = 1e-5
_bounded_int = partial(bounded_int, defaults=DEFAULTS)


def units_expected(spec: dict[str, Any]) -> int:
    """Every unit the job will make if it runs all its rounds (an early stop makes fewer)."""
    return spec["rounds"] * spec["shards"]


# --- the spec -------------------------------------------------------------------------------------

def _number(spec: dict[str, Any], key: str, low: float, high: float, errors: dict[str, str], *,
            low_open: bool = False, high_open: bool = False) -> float:
    value = spec.get(key, DEFAULTS.get(key))
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        errors[key] = f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return DEFAULTS.get(key, low)
    return float(value)


def _dataset(sha: Any, field: str, owner: Any, input_shape: tuple[int, ...], classes: int,
             errors: dict[str, str]) -> int:
    """A dataset is one safetensors file with `x` (float32 [rows, *input_shape]) and `y` (int64 labels [rows])."""
    header = artifact_header(sha, field, owner, errors)
    if header is None:
        return 0
    x, y = header.get("x"), header.get("y")
    if x is None or y is None or len(header) != 2:
        errors[field] = "must hold exactly two tensors, 'x' (float32 inputs) and 'y' (int64 labels)"
        return 0
    rows = x.shape[0] if x.shape else 0
    if x.dtype != "F32" or tuple(x.shape[1:]) != input_shape or rows == 0:
        errors[field] = f"tensor 'x' is {x.dtype}{list(x.shape)}; the model needs F32[rows>0, {', '.join(map(str, input_shape))}]"
        return 0
    if rows > MAX_ROWS:
        errors[field] = f"holds {rows:,} rows; the limit is {MAX_ROWS:,}"
        return 0
    if y.dtype != "I64" or list(y.shape) != [rows]:
        errors[field] = f"tensor 'y' is {y.dtype}{list(y.shape)}; expected I64[{rows}] (one class index per row)"
        return 0
    with get_storage().local_path(sha) as path:  # from object storage, a copy of the dataset (<= MAX_ROWS)
        labels = read_array(path, y)
    if labels.min() < 0 or labels.max() >= classes:
        errors[field] = f"labels must be class indices in [0, {classes})"
        return 0
    return rows


def _privacy(spec: dict[str, Any], normal: dict[str, Any], errors: dict[str, str]) -> dict[str, Any] | None:
    dp = spec.get("dp")
    if dp is None:
        return None
    if not isinstance(dp, dict) or set(dp) - {"clip_norm", "noise_multiplier", "delta"} or "clip_norm" not in dp:
        errors["dp"] = "must be an object with clip_norm, and optionally noise_multiplier and delta"
        return None
    clip = _number(dp, "clip_norm", 0, 1e6, errors, low_open=True)
    multiplier = _number({"noise_multiplier": dp.get("noise_multiplier", 1.0)}, "noise_multiplier", 0, 1e3, errors)
    delta = _number({"delta": dp.get("delta", DEFAULT_DELTA)}, "delta", 0, 1, errors, low_open=True, high_open=True)
    for key in ("clip_norm", "noise_multiplier", "delta"):
        if key in errors:
            errors[f"dp.{key}"] = errors.pop(key)
    if normal["aggregation"] != "mean":
        errors["dp"] = "central DP is defined here for aggregation 'mean' only (its sensitivity is clip_norm / shards)"
    if any(key == "dp" or key.startswith("dp.") for key in errors):
        return None  # the spec is refused; an out-of-range value must not reach the accountant (log(1/0))
    return {
        "clip_norm": clip, "noise_multiplier": multiplier, "delta": delta,
        "epsilon": dp_epsilon(noise_multiplier=multiplier, rounds=normal["rounds"], delta=delta),
        "noise_std": multiplier * clip / normal["shards"],
        "sampling_rate": 1.0,
        "unit": "one training shard's update (add/remove), so also any one training record",
        "accountant": "Renyi DP of the Gaussian mechanism composed over all rounds, no subsampling amplification",
    }


def _target(spec: dict[str, Any], errors: dict[str, str]) -> dict[str, Any] | None:
    target = spec.get("target")
    if target is None:
        return None
    if not isinstance(target, dict) or set(target) != {"metric", "value"} or target["metric"] not in ("accuracy", "loss"):
        errors["target"] = "must be {\"metric\": \"accuracy\" or \"loss\", \"value\": number}"
        return None
    value = _number(target, "value", 0, 1e6, errors)
    if "value" in errors:
        errors["target.value"] = errors.pop("value")
    return {"metric": target["metric"], "value": value}


def validate_spec(spec: Any, *, owner: Any) -> dict[str, Any]:
    """Check everything about a federated training spec. Returns the normalised spec."""
    errors, model, arch, config = spec_open(spec, allowed_keys=ALLOWED_KEYS)
    # The checks run in this order, each adding to `errors`: a later one may replace an earlier message of
    # the same field (rounds, shards, max_results_per_unit) with a more telling one.
    normal = _scalars(spec, errors)
    normal["compare"] = _compare(spec, errors)
    normal.update(_aggregation(spec, errors))
    normal["adaptive"] = _adaptive(spec, errors)
    normal.update(device_options(spec, errors))
    _check_sizes(normal, errors)
    normal["dp"] = _privacy(spec, normal, errors)
    normal["target"] = _target(spec, errors)
    if arch is not None and config is not None:
        _check_weights(model, arch, config, owner, errors)
        normal.update(_datasets(spec, arch, config, owner, normal["shards"], errors))
    if errors:
        raise ValidationFailed("the job spec is invalid", fields=errors)
    normal["model"] = {"architecture": model["architecture"], "config": config, "weights": model["weights"]}
    normal["train_dataset"], normal["eval_dataset"] = spec["train_dataset"], spec["eval_dataset"]
    return normal


def _scalars(spec: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    return {
        "rounds": _bounded_int(spec, "rounds", 1, 1000, errors),
        "shards": _bounded_int(spec, "shards", 1, 1000, errors),
        "local_epochs": _bounded_int(spec, "local_epochs", 1, 1000, errors),
        "batch_size": _bounded_int(spec, "batch_size", 1, 65_536, errors),
        "learning_rate": _number(spec, "learning_rate", 0, 100, errors, low_open=True),
        "momentum": _number(spec, "momentum", 0, 1, errors, high_open=True),
        "seed": _bounded_int(spec, "seed", 0, 2**31 - 1, errors),
        "quorum": _bounded_int(spec, "quorum", 2, 10, errors),
        "max_results_per_unit": _bounded_int(spec, "max_results_per_unit", 2, 20, errors),
        "unit_timeout_seconds": _bounded_int(spec, "unit_timeout_seconds", 1, 86_400, errors),
        "unit_memory_mb": _bounded_int(spec, "unit_memory_mb", 256, 65_536, errors),
        "loss_epsilon": _number(spec, "loss_epsilon", 0, 1e6, errors),
    }


def _compare(spec: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    given = spec.get("compare", {})
    if isinstance(given, dict) and given.get("method", "allclose") == "allclose":
        # Parameters left out take this kind's training bounds, not inference's (tighter, and top-1).
        given = {**DEFAULTS["compare"], **given}
    compare, problems = comparators.validate(given)
    errors.update(problems)
    return compare


def _aggregation(spec: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    """The aggregation, with its trim_fraction when it is trimmed_mean."""
    found = {"aggregation": spec.get("aggregation", DEFAULTS["aggregation"])}
    if found["aggregation"] not in AGGREGATIONS:
        errors["aggregation"] = f"must be one of {', '.join(AGGREGATIONS)}"
    if found["aggregation"] == "trimmed_mean":
        # Below one half, floor(n * f) values trimmed at each end always leave at least one per coordinate.
        found["trim_fraction"] = _number(spec, "trim_fraction", 0, 0.5, errors, high_open=True)
    elif "trim_fraction" in spec:
        errors["trim_fraction"] = "applies to aggregation 'trimmed_mean' only"
    return found


def _adaptive(spec: dict[str, Any], errors: dict[str, str]) -> Any:
    adaptive = spec.get("adaptive", DEFAULTS["adaptive"])
    if not isinstance(adaptive, bool):
        errors["adaptive"] = "must be true or false"
    return adaptive


def _check_sizes(normal: dict[str, Any], errors: dict[str, str]) -> None:
    if normal["max_results_per_unit"] < normal["quorum"]:
        errors["max_results_per_unit"] = "must be at least quorum"
    if normal["rounds"] * normal["shards"] > MAX_UNITS:
        errors["rounds"] = f"rounds x shards would make more than {MAX_UNITS:,} units"


def _check_weights(model: dict[str, Any], arch: Architecture, config: dict[str, Any], owner: Any,
                   errors: dict[str, str]) -> None:
    found = artifact_header(model["weights"], "model.weights", owner, errors)
    if found is not None:
        check_weights(found, arch.param_shapes(config), errors)


def _datasets(spec: dict[str, Any], arch: Architecture, config: dict[str, Any], owner: Any, shards: int,
              errors: dict[str, str]) -> dict[str, int]:
    """train_rows and eval_rows (0 where a dataset is wrong); the training rows must fill every shard."""
    shape, classes = arch.input_shape(config), arch.output_dim(config)
    rows = {
        "train_rows": _dataset(spec.get("train_dataset"), "train_dataset", owner, shape, classes, errors),
        "eval_rows": _dataset(spec.get("eval_dataset"), "eval_dataset", owner, shape, classes, errors),
    }
    if rows["train_rows"] and rows["train_rows"] < shards:
        errors["shards"] = f"cannot split {rows['train_rows']} training rows into {shards} shards"
    return rows


# --- units ----------------------------------------------------------------------------------------

def plan_units(spec: dict[str, Any]) -> Iterator[UnitPlan]:
    """Round 0's units; later rounds are planned when the round before is aggregated."""
    return plan_round(spec, round_index=0, weights=spec["model"]["weights"])


def plan_round(spec: dict[str, Any], *, round_index: int, weights: str) -> Iterator[UnitPlan]:
    """One unit per shard, training `weights` (the round's global weights); shard i is the same rows every round."""
    with get_storage().local_path(spec["train_dataset"]) as path:  # held while the shards are read
        header = read_header(path)
        shards = spec["shards"]
        for shard, (start, stop) in enumerate(shard_bounds(header["x"].shape[0], shards)):
            rows = slice(start, stop)
            x = array_file_bytes(read_array(path, header["x"], rows=rows), name="x")
            y = array_file_bytes(read_array(path, header["y"], rows=rows), name="y")
            payload = FedAvgPayload(
                model=model_ref({**spec["model"], "weights": weights}),
                inputs=FedAvgInputs(x=sha256_hex(x), y=sha256_hex(y)),
                round=round_index,
                shard=shard,
                samples=stop - start,
                train=FedAvgTrain(epochs=spec["local_epochs"], batch_size=spec["batch_size"],
                                  learning_rate=spec["learning_rate"], momentum=spec["momentum"],
                                  seed=unit_seed(spec["seed"], round_index, shard)),
                limits=unit_limits(spec),
            )
            yield UnitPlan(index=round_index * shards + shard, payload=payload.to_wire(), inputs=[x, y])


def check_output(payload: dict[str, Any], path: Path, *, allow_nonfinite: bool = False) -> None:
    """Refuse an output file that check_summary refuses (it reads the file to summarize it)."""
    check_summary(payload, summarize_file(path), allow_nonfinite=allow_nonfinite)


def check_summary(payload: dict[str, Any], summary: TensorSummary, *, allow_nonfinite: bool = False) -> None:
    """Refuse an output that is not the architecture's float32 weights plus the two metric tensors, or
    holds NaN or infinity: an update that is not finite can never be aggregated (`allow_nonfinite` is an
    inference option and does not apply). Reads no file: the summary was taken when the bytes arrived."""
    header = summary.check()
    arch, config = resolve(payload["model"]["architecture"], payload["model"]["config"])
    expected: dict[str, tuple[str, tuple[int, ...]]] = {
        name: ("F32", shape) for name, shape in arch.param_shapes(config).items()
    }
    expected[LOSS_NAME], expected[SAMPLES_NAME] = ("F32", (1,)), ("I64", (1,))
    if set(header) != set(expected):
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        raise TensorFileError(f"the output's tensors do not match (missing {missing}, unexpected {extra})")
    for name, (dtype, shape) in expected.items():
        if header[name] != (dtype, shape):
            got_dtype, got_shape = header[name]
            raise TensorFileError(f"tensor {name!r} is {got_dtype}{list(got_shape)}, expected {dtype}{list(shape)}")
    samples = (summary.integers or {})[SAMPLES_NAME]
    if samples != payload["samples"]:
        raise TensorFileError(f"the output says {samples} samples; the shard has {payload['samples']}")
    if not summary.finite:  # every tensor but the I64 sample count is float32
        raise TensorFileError("the update holds NaN or infinity")


def read_update(path: Path) -> tuple[dict[str, np.ndarray], float]:
    """The weights (by name) and the training loss of a unit output."""
    header = read_header(path)
    weights = {name: read_array(path, info) for name, info in header.items() if name not in METRIC_NAMES}
    return weights, float(read_array(path, header[LOSS_NAME])[0])


def _flat(weights: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([weights[name].ravel() for name in sorted(weights)])


def read_output(path: Path) -> np.ndarray:
    """All weights of an update as one vector (what `manage.py tolerance_calibrate --kind fedavg` compares)."""
    return _flat(read_update(path)[0])


def outputs_agree(spec: dict[str, Any], a: Path, b: Path, *, same_class: bool = False) -> bool:
    """Two updates of one unit agree: inside a hardware class bitwise (class_exact), across classes
    within the job's comparator on all weights and within loss_epsilon on the training loss. A
    non-finite update never agrees, not even with identical bytes of itself."""
    (wa, la), (wb, lb) = read_update(a), read_update(b)
    fa, fb = _flat(wa), _flat(wb)
    if not (np.isfinite(fa).all() and np.isfinite(fb).all() and math.isfinite(la) and math.isfinite(lb)):
        return False
    compare = comparators.effective(spec["compare"])
    if same_class and compare["class_exact"]:
        return comparators.exact(fa, fb) and la == lb
    return comparators.agree(compare, fa, fb) and abs(la - lb) <= spec["loss_epsilon"]
