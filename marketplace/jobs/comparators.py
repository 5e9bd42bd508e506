"""How two replicated outputs of one unit are judged to agree: the job spec's `compare`.

Methods (the job chooses one; `docs/protocol.md` has the wire form):

- `exact`: the output tensors are bitwise identical (same shape, dtype and bytes).
- `allclose`: every element within `atol + rtol * |b|` (numpy's `allclose`), and with `top1` the same
  arg-max in every row.
- `top1`: the fraction of rows whose arg-max (predicted class) is the same is at least `min_agreement`.
- `metric`: one scalar summary of each output (`mean`, `mean_abs` or `rms` over all elements, computed
  here from the signed output file; an agent's self-reported `metrics` are not signed and never
  judged) differs by at most `epsilon`.

A non-finite value (NaN, +-inf) never agrees under a tolerance method: NaN is not close to anything,
and an overflow is not a result. (Under `exact`, bytes are bytes.)

`class_exact` (default true) says that two results from devices of one hardware class must be bitwise
identical, whatever the method: CPU inference is bitwise stable inside a class, so different bytes
there mean a fault, not rounding. The tolerance method applies across classes only.

Pure numpy: this module never imports torch or Django.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

METHODS = ("exact", "allclose", "top1", "metric")
METRICS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda y: float(np.mean(y, dtype=np.float64)),
    "mean_abs": lambda y: float(np.mean(np.abs(y), dtype=np.float64)),
    "rms": lambda y: float(np.sqrt(np.mean(np.square(y, dtype=np.float64)))),
}
REQUIRED = object()  # a parameter without a default
# Each method's parameters and their defaults. `allclose` keeps the historical default (the spec
# format before methods existed was `{"rtol", "atol", "top1"}`, which still means allclose).
PARAMETERS: dict[str, dict[str, Any]] = {
    "exact": {},
    "allclose": {"rtol": 1e-5, "atol": 1e-6, "top1": True},
    "top1": {"min_agreement": 1.0},
    "metric": {"metric": "mean", "epsilon": REQUIRED},
}
COMMON = {"method": "allclose", "class_exact": True}
MAX_EPSILON = 1e12


def validate(compare: Any, *, field: str = "compare") -> tuple[dict[str, Any], dict[str, str]]:
    """Normalise a `compare` object, defaults filled in. Returns (normalised, field errors)."""
    errors: dict[str, str] = {}
    if not isinstance(compare, dict):
        errors[field] = f"must be an object with a method ({', '.join(METHODS)}) and its parameters"
        return normal_default(), errors
    method = compare.get("method", COMMON["method"])
    if method not in PARAMETERS:
        errors[f"{field}.method"] = f"must be one of {', '.join(METHODS)}"
        return normal_default(), errors
    allowed = PARAMETERS[method]
    unknown = sorted(set(compare) - set(allowed) - set(COMMON))
    if unknown:
        errors[field] = f"unknown keys for method {method}: {', '.join(unknown)} (allowed: {_allowed(method)})"
    normal: dict[str, Any] = {"method": method, "class_exact": compare.get("class_exact", COMMON["class_exact"])}
    if not isinstance(normal["class_exact"], bool):
        errors[f"{field}.class_exact"] = "must be true or false"
    for key, default in allowed.items():
        value = compare.get(key, default)
        if value is REQUIRED:
            errors[f"{field}.{key}"] = f"is required for method {method}"
            continue
        problem = _check(key, value)
        if problem:
            errors[f"{field}.{key}"] = problem
        normal[key] = value
    return normal, errors


def normal_default() -> dict[str, Any]:
    return {**COMMON, **PARAMETERS["allclose"]}


def effective(compare: dict[str, Any]) -> dict[str, Any]:
    """A stored (already validated) compare object with today's defaults filled in: specs stored
    before methods existed (`{"rtol", "atol", "top1"}`) mean allclose, and exact inside a class."""
    normal, errors = validate(compare)
    if errors:
        raise ValueError(f"invalid stored compare spec {compare!r}: {errors}")
    return normal


def _allowed(method: str) -> str:
    return ", ".join([*COMMON, *PARAMETERS[method]])


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _check(key: str, value: Any) -> str | None:
    if key in ("rtol", "atol"):
        return None if _number(value) and 0 <= value <= 1 else "must be a number between 0 and 1"
    if key == "top1":
        return None if isinstance(value, bool) else "must be true or false"
    if key == "min_agreement":
        return None if _number(value) and 0 < value <= 1 else "must be a number above 0 and at most 1"
    if key == "epsilon":
        return None if _number(value) and 0 <= value <= MAX_EPSILON else f"must be a number between 0 and {MAX_EPSILON:g}"
    if key == "metric":
        return None if value in METRICS else f"must be one of {', '.join(METRICS)}"
    raise AssertionError(f"no check for {key}")


# --- judging two outputs ---------------------------------------------------------------------------

def agree(compare: dict[str, Any], a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two outputs agree under a normalised compare object's method (class_exact is the
    caller's business: see `inference.outputs_agree`)."""
    if a.shape != b.shape:
        return False
    method = compare["method"]
    if method == "exact":
        return exact(a, b)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return False
    if method == "allclose":
        if not np.allclose(a, b, rtol=compare["rtol"], atol=compare["atol"]):
            return False
        return not compare["top1"] or top1_agreement(a, b) == 1.0
    if method == "top1":
        return top1_agreement(a, b) >= compare["min_agreement"]
    if method == "metric":
        measure = METRICS[compare["metric"]]
        return abs(measure(a) - measure(b)) <= compare["epsilon"]
    raise ValueError(f"unknown compare method {method!r}")


def exact(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _rows(y: np.ndarray) -> np.ndarray:
    """Rows of class scores: [rows, classes] as it is; one row for a vector; trailing axes flattened."""
    if y.ndim == 0:
        return y.reshape(1, 1)
    if y.ndim == 1:
        return y.reshape(1, -1)
    return y.reshape(y.shape[0], -1)


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of rows whose arg-max is the same in both (1.0 for no rows)."""
    ra, rb = _rows(a), _rows(b)
    if ra.shape[0] == 0 or ra.shape[1] == 0:
        return 1.0
    return float(np.mean(ra.argmax(axis=1) == rb.argmax(axis=1)))


# --- measuring honest disagreement (tolerance calibration) -----------------------------------------

@dataclass(frozen=True)
class PairDiff:
    """How far apart two outputs of one unit are, in the terms the comparators use.

    `max_abs` is max |a - b| over all elements. For calibrating allclose (|a - b| <= atol + rtol |b|)
    the elements are split at the pair's median magnitude m = min(|a|, |b|): `small_abs` is the
    largest |a - b| among the elements at or below the median (the absolute noise floor: what atol
    must cover), `rel` the largest (|a - b| - small_abs) / m among those above it (what exceeds that
    floor in proportion to the value: what rtol must cover). allclose(rtol=rel, atol=small_abs) holds.
    """

    max_abs: float
    rel: float
    small_abs: float
    top1_agreement: float
    mean_diff: float  # |mean(a) - mean(b)|, what the `metric` method with `mean` sees
    identical: bool
    finite: bool


def pair_diff(a: np.ndarray, b: np.ndarray) -> PairDiff:
    if a.shape != b.shape:
        raise ValueError(f"outputs of one unit with different shapes: {a.shape} and {b.shape}")
    identical = exact(a, b)
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    if identical or not finite or a.size == 0:
        nan = 0.0 if identical or a.size == 0 else math.nan
        return PairDiff(nan, nan, nan, top1_agreement(a, b) if finite else math.nan, nan, identical, finite)
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    diff = np.abs(a64 - b64)
    magnitude = np.minimum(np.abs(a64), np.abs(b64))
    small = magnitude <= np.median(magnitude)  # zeros are always here: a relative bound means nothing at 0
    small_abs = float(diff[small].max())
    large = ~small
    excess = np.maximum(diff[large] - small_abs, 0.0) / magnitude[large]
    return PairDiff(
        max_abs=float(diff.max()),
        rel=float(excess.max()) if large.any() else 0.0,
        small_abs=small_abs,
        top1_agreement=top1_agreement(a, b),
        mean_diff=abs(float(a64.mean()) - float(b64.mean())),
        identical=False,
        finite=True,
    )
