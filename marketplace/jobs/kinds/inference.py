"""Batch inference: a registry model over a float32 tensor, split by rows, merged into one output."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from math import ceil
from pathlib import Path
from typing import Any

import numpy as np

from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import ValidationFailed
from marketplace.core.tensors import (
    TensorFileError,
    TensorInfo,
    TensorSummary,
    array_file_bytes,
    read_array,
    read_header,
    summarize_file,
)
from marketplace.jobs import comparators
from marketplace.jobs.kinds._spec import (
    artifact_header,
    bounded_int,
    check_weights,
    device_options,
    model_ref,
    spec_open,
    unit_limits,
)
from worker_agent.architectures import resolve
from worker_agent.protocol import sha256_hex
from worker_agent.wire import InferenceInputs, InferenceOutput, InferencePayload

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
    # The device a unit needs (_spec.device_options): "cpu" runs anywhere; "cuda" only on a CUDA GPU
    # with at least min_gpu_memory_mb.
    "device": "cpu",
    "min_gpu_memory_mb": 0,
    # Adaptive replication: a trusted device's units are accepted on its word, audited at random.
    # False replicates every unit to the quorum, whoever computes it.
    "adaptive": True,
    # NaN or infinity in an output is refused at report unless the submitter allows it (a model that
    # legitimately overflows); two owners returning the same all-NaN bytes would otherwise agree.
    "allow_nonfinite": False,
}
# The submitter's own known answers (optional): a safetensors artifact with `x` (rows shaped like the
# dataset's) and `y` (the outputs the submitter computed for them), hidden among every unit's rows.
KNOWN_ANSWER_KEYS = ("known_answers", "known_answers_per_unit")
ALLOWED_KEYS = {"model", "dataset", *DEFAULTS, *KNOWN_ANSWER_KEYS}
MAX_UNITS = 100_000
MAX_KNOWN_ROWS = 10_000
MAX_KNOWN_PER_UNIT = 16
_random = random.SystemRandom()  # where known rows hide must not be predictable by anyone
OUTPUT_NAME = "y"
MASK_NAME = "mask"  # a cancelled job's partial output: which rows of `y` were decided
ZEROS_CHUNK = 1 << 20
_bounded_int = partial(bounded_int, defaults=DEFAULTS)


@dataclass(frozen=True)
class UnitPlan:
    index: int
    payload: dict[str, Any]  # a payload record's to_wire(): exactly what is stored, signed and leased
    inputs: list[bytes]  # the files payload["inputs"] names by sha256, in its order: stored as the unit's inputs
    hidden_rows: list[list[int]] = field(default_factory=list)  # [[position, known row], ...]: server side only


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
    normal.update(device_options(spec, errors))
    for flag in ("adaptive", "allow_nonfinite"):
        normal[flag] = spec.get(flag, DEFAULTS[flag])
        if not isinstance(normal[flag], bool):
            errors[flag] = "must be true or false"
    if normal["max_results_per_unit"] < normal["quorum"]:
        errors["max_results_per_unit"] = "must be at least quorum"
    if arch is not None and config is not None:
        weights = artifact_header(model["weights"], "model.weights", owner, errors)
        if weights is not None:
            check_weights(weights, arch.param_shapes(config), errors)
        dataset = artifact_header(spec.get("dataset"), "dataset", owner, errors)
        if dataset is not None:
            rows = _check_dataset(dataset, arch.input_shape(config), errors)
            if rows and ceil(rows / normal["rows_per_unit"]) > MAX_UNITS:
                errors["rows_per_unit"] = f"would make more than {MAX_UNITS:,} units; use larger units"
            normal["rows"] = rows
        normal.update(_known_answers(spec, owner, arch.input_shape(config), config["out_features"], errors))
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


def _known_answers(spec: dict[str, Any], owner: Any, input_shape: tuple[int, ...], out_features: int,
                   errors: dict[str, str]) -> dict[str, Any]:
    """Check the optional known answers: x [k, *input_shape] and y [k, out_features], float32, finite."""
    if "known_answers" not in spec:
        if "known_answers_per_unit" in spec:
            errors["known_answers_per_unit"] = "is only meaningful with known_answers"
        return {}
    per_unit = bounded_int(spec, "known_answers_per_unit", 1, MAX_KNOWN_PER_UNIT, errors,
                           defaults={"known_answers_per_unit": 1})
    header = artifact_header(spec["known_answers"], "known_answers", owner, errors)
    if header is None:
        return {}
    x, y = header.get("x"), header.get("y")
    if x is None or y is None or len(header) != 2:
        errors["known_answers"] = "must hold exactly two tensors, 'x' (inputs) and 'y' (the outputs you computed)"
        return {}
    k = x.shape[0] if x.shape else 0
    if x.dtype != "F32" or tuple(x.shape[1:]) != input_shape or not 1 <= k <= MAX_KNOWN_ROWS:
        errors["known_answers"] = (f"'x' is {x.dtype}{list(x.shape)}; it must be F32[k, {', '.join(map(str, input_shape))}] "
                                   f"with 1 <= k <= {MAX_KNOWN_ROWS:,}")
        return {}
    if y.dtype != "F32" or tuple(y.shape) != (k, out_features):
        errors["known_answers"] = f"'y' is {y.dtype}{list(y.shape)}; it must be F32[{k}, {out_features}] (one row per x)"
        return {}
    with get_storage().local_path(spec["known_answers"]) as path:  # k <= MAX_KNOWN_ROWS rows: small
        finite = np.isfinite(read_array(path, x)).all() and np.isfinite(read_array(path, y)).all()
    if not finite:
        errors["known_answers"] = "holds NaN or infinity"
        return {}
    return {"known_answers": spec["known_answers"], "known_answers_per_unit": min(per_unit, k), "known_rows": k}


def plan_units(spec: dict[str, Any]) -> Iterator[UnitPlan]:
    """Slice the dataset by rows, one input file per unit, reading one slice at a time. With known
    answers, each unit also gets `known_answers_per_unit` of the submitter's known rows at random
    positions among its own: the payload and the input say nothing of which rows they are."""
    _, config = resolve(spec["model"]["architecture"], spec["model"]["config"])
    known_x = _known_inputs(spec["known_answers"]) if spec.get("known_answers") else None
    step = spec["rows_per_unit"]
    with get_storage().local_path(spec["dataset"]) as path:  # held while the split reads it slice by slice
        x = read_header(path)["x"]
        for index, start in enumerate(range(0, x.shape[0], step)):
            rows = read_array(path, x, rows=slice(start, min(start + step, x.shape[0])))
            yield _unit_plan(spec, index, rows, known_x, out_dim=config["out_features"])


def _known_inputs(sha256: str) -> np.ndarray:
    with get_storage().local_path(sha256) as path:
        return read_array(path, read_header(path)["x"])


def _unit_plan(spec: dict[str, Any], index: int, rows: np.ndarray, known_x: np.ndarray | None, *,
               out_dim: int) -> UnitPlan:
    """One unit over `rows`, with the submitter's known rows hidden among them when there are any."""
    hidden: list[list[int]] = []
    if known_x is not None:
        rows, hidden = _hide_known_rows(rows, known_x, spec["known_answers_per_unit"])
    x_file = array_file_bytes(rows, name="x")
    payload = InferencePayload(
        model=model_ref(spec["model"]),
        inputs=InferenceInputs(x=sha256_hex(x_file)),
        rows=int(rows.shape[0]),
        batch_size=spec["batch_size"],
        output=InferenceOutput(name=OUTPUT_NAME, dtype="float32", shape=(int(rows.shape[0]), out_dim)),
        limits=unit_limits(spec),
    )
    return UnitPlan(index=index, payload=payload.to_wire(), inputs=[x_file], hidden_rows=hidden)


def _hide_known_rows(rows: np.ndarray, known_x: np.ndarray, count: int) -> tuple[np.ndarray, list[list[int]]]:
    """The unit's rows with `count` distinct known rows inserted at random positions; [[position, known row]]."""
    picks = _random.sample(range(len(known_x)), count)
    total = len(rows) + count
    positions = sorted(_random.sample(range(total), count))
    mixed = np.empty((total, *rows.shape[1:]), dtype=rows.dtype)
    own = np.ones(total, dtype=bool)
    own[positions] = False
    mixed[own] = rows
    mixed[positions] = known_x[picks]
    return mixed, [[position, pick] for position, pick in zip(positions, picks)]


def known_rows_agree(spec: dict[str, Any], hidden_rows: list[list[int]], output: Path) -> bool:
    """Whether an output's hidden rows agree with the submitter's known answers, under the job's comparator
    (the submitter computed them on another machine: `exact` is judged as the default allclose there)."""
    with get_storage().local_path(spec["known_answers"]) as known:
        want = read_array(known, read_header(known)["y"])[[pick for _, pick in hidden_rows]]
    got = read_output(output)[[position for position, _ in hidden_rows]]
    compare = comparators.effective(spec["compare"])
    if compare["method"] == "exact":
        compare = comparators.effective(DEFAULTS["compare"])
    return comparators.agree(compare, got, want)


def check_output(payload: dict[str, Any], path: Path, *, allow_nonfinite: bool = False) -> None:
    """Refuse an output file that check_summary refuses (it reads the file to summarize it)."""
    check_summary(payload, summarize_file(path), allow_nonfinite=allow_nonfinite)


def check_summary(payload: dict[str, Any], summary: TensorSummary, *, allow_nonfinite: bool = False) -> None:
    """Refuse an output that is not the one float32 tensor of the expected shape, or holds NaN or infinity
    (unless the job allows them). Reads no file: the summary was taken when the bytes arrived."""
    header = summary.check()
    expected = payload["output"]
    info = header.get(expected["name"])
    if info is None or len(header) != 1:
        raise TensorFileError(f"the output must hold exactly one tensor named {expected['name']!r}")
    dtype, shape = info
    if dtype != "F32" or list(shape) != expected["shape"]:
        raise TensorFileError(f"the output is {dtype}{list(shape)}, expected F32{expected['shape']}")
    if not allow_nonfinite and not summary.finite:
        raise TensorFileError("the output holds NaN or infinity, which this job does not allow (allow_nonfinite)")


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


def output_rows_bytes(path: Path, *, hidden_rows: list[list[int]] | None = None) -> Iterator[bytes]:
    """A unit output's raw tensor bytes, in chunks, for the streamed merge; the submitter's known rows
    hidden in the unit are left out (a unit's output is small: it is read whole then)."""
    info = read_header(path)[OUTPUT_NAME]
    if hidden_rows:
        y = read_array(path, info)
        yield np.delete(y, [position for position, _ in hidden_rows], axis=0).tobytes()
        return
    with path.open("rb") as handle:
        handle.seek(info.start)
        remaining = info.end - info.start
        while remaining:
            chunk = handle.read(min(remaining, 1024 * 1024))
            remaining -= len(chunk)
            yield chunk


def partial_tensors(spec: dict[str, Any], decided: dict[int, tuple[str, list[list[int]]]]) -> list[
        tuple[str, str, tuple[int, ...], Iterator[bytes]]]:
    """A cancelled job's output, for core.tensors.write_many: `y` over every row of the dataset, the rows of
    decided units (`decided`: unit index -> canonical output, hidden rows) filled in and the others zero,
    and `mask` (bool, one per row) saying which are decided. Streamed: one unit output at a time."""
    rows, width = merged_shape(spec)
    step = spec["rows_per_unit"]
    spans = [(index, min(step, rows - start)) for index, start in enumerate(range(0, rows, step))]

    def y_chunks() -> Iterator[bytes]:
        storage = get_storage()
        for index, count in spans:
            if index in decided:
                sha, hidden = decided[index]
                with storage.local_path(sha) as path:
                    yield from output_rows_bytes(path, hidden_rows=hidden)
            else:
                yield from _zeros(count * width * 4)

    def mask_chunks() -> Iterator[bytes]:
        for index, count in spans:
            yield (b"\x01" if index in decided else b"\x00") * count

    return [(OUTPUT_NAME, "F32", (rows, width), y_chunks()), (MASK_NAME, "BOOL", (rows,), mask_chunks())]


def _zeros(size: int) -> Iterator[bytes]:
    while size > 0:
        yield bytes(min(size, ZEROS_CHUNK))
        size -= ZEROS_CHUNK


def units_expected(spec: dict[str, Any]) -> int:
    """Units a validated spec splits into (the ledger escrows price x units x expected replication)."""
    return ceil(spec["rows"] / spec["rows_per_unit"])
