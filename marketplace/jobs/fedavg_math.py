"""The numbers of federated averaging, in numpy: shards, aggregation, central DP, and evaluation.

No torch and no Django here: the Celery task that aggregates a round imports this, and so can anyone
who wants to check a round by hand. Evaluation runs the registry's small architectures (`mlp`, `cnn`)
forward in numpy (float64), so the marketplace measures each round's global model itself instead of
taking an agent's word for it, without torch in Celery.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

AGGREGATIONS = ("mean", "trimmed_mean", "median")
EVAL_CHUNK = 1024
RDP_ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 257)))


def shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, sizes differing by at most one (numpy.array_split's rule), in row order."""
    base, extra = divmod(rows, shards)
    bounds, start = [], 0
    for shard in range(shards):
        stop = start + base + (1 if shard < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


# --- aggregation ----------------------------------------------------------------------------------

def aggregate(
    start: dict[str, np.ndarray],
    updates: Sequence[dict[str, np.ndarray]],
    samples: Sequence[int],
    *,
    method: str,
    trim_fraction: float = 0.0,
    dp: dict[str, Any] | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """The next global weights from the round's start weights and its validated updates (in shard order).

    Works on deltas (update - start) in float64 and returns float32. `mean` weights each delta by its
    shard's samples; `trimmed_mean` and `median` are coordinate-wise and unweighted (a robust second
    line behind verification). With `dp` (central DP, `mean` only): every delta is clipped to L2 norm
    `clip_norm` over all parameters, averaged with equal weights (so one shard moves the mean by at
    most clip_norm / n), and Gaussian noise of std noise_multiplier * clip_norm / n is added."""
    if not updates:
        raise ValueError("no updates to aggregate")
    names = sorted(start)
    deltas = [{n: u[n].astype(np.float64) - start[n].astype(np.float64) for n in names} for u in updates]
    if dp is not None:
        return _private_mean(start, deltas, dp, rng or np.random.default_rng())
    result: dict[str, np.ndarray] = {}
    for name in names:
        stacked = np.stack([d[name] for d in deltas])
        if method == "mean":
            weights = np.asarray(samples, dtype=np.float64)
            step = np.tensordot(weights / weights.sum(), stacked, axes=1)
        elif method == "trimmed_mean":
            k = trimmed_count(len(deltas), trim_fraction)
            step = np.sort(stacked, axis=0)[k : len(deltas) - k].mean(axis=0)
        elif method == "median":
            step = np.median(stacked, axis=0)
        else:
            raise ValueError(f"unknown aggregation {method!r}")
        result[name] = (start[name].astype(np.float64) + step).astype(np.float32)
    return result


def trimmed_count(updates: int, trim_fraction: float) -> int:
    """How many values trimmed_mean drops at each end of every coordinate."""
    return int(math.floor(updates * trim_fraction))


def _private_mean(
    start: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]], dp: dict[str, Any], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    clip, multiplier, n = float(dp["clip_norm"]), float(dp["noise_multiplier"]), len(deltas)
    clipped = []
    for delta in deltas:
        norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in delta.values()))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        clipped.append({name: v * scale for name, v in delta.items()})
    result = {}
    for name in sorted(start):
        mean = np.mean(np.stack([d[name] for d in clipped]), axis=0)
        noise = rng.normal(0.0, multiplier * clip / n, size=mean.shape) if multiplier > 0 else 0.0
        result[name] = (start[name].astype(np.float64) + mean + noise).astype(np.float32)
    return result


def dp_epsilon(*, noise_multiplier: float, rounds: int, delta: float) -> float | None:
    """(epsilon, delta) of `rounds` releases of the Gaussian mechanism with this noise multiplier, every
    shard taking part in every round (no subsampling, so no amplification is claimed), by Renyi DP
    composition (alpha / (2 z^2) per round) and the standard conversion eps = rdp + log(1/delta)/(alpha-1),
    minimised over a grid of orders. None without noise: clipping alone guarantees nothing."""
    if noise_multiplier <= 0:
        return None
    best = min(
        rounds * alpha / (2 * noise_multiplier**2) + math.log(1 / delta) / (alpha - 1) for alpha in RDP_ORDERS
    )
    return round(best, 4)


# --- evaluation -----------------------------------------------------------------------------------

def evaluate(architecture: str, config: dict[str, Any], weights: dict[str, np.ndarray], x: np.ndarray,
             y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a registry model on (x, y), computed in float64 chunks."""
    loss_sum, correct = 0.0, 0
    params = {name: value.astype(np.float64) for name, value in weights.items()}
    for start in range(0, len(x), EVAL_CHUNK):
        logits = forward(architecture, config, params, x[start : start + EVAL_CHUNK].astype(np.float64))
        labels = y[start : start + EVAL_CHUNK]
        peak = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        loss_sum += float(np.sum(log_norm - logits[np.arange(len(labels)), labels]))
        correct += int(np.sum(logits.argmax(axis=1) == labels))
    return loss_sum / len(x), correct / len(x)


def forward(architecture: str, config: dict[str, Any], params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits of the registry's `mlp` or `cnn` (the layouts of worker_agent/architectures.py)."""
    if architecture == "mlp":
        layers = len(config["hidden"]) + 1
        for layer in range(layers):
            x = x @ params[f"net.{2 * layer}.weight"].T + params[f"net.{2 * layer}.bias"]
            if layer < layers - 1:
                x = np.maximum(x, 0.0)
        return x
    if architecture == "cnn":
        for block in range(len(config["channels"])):
            x = _conv_same(x, params[f"features.{3 * block}.weight"], params[f"features.{3 * block}.bias"])
            x = _max_pool2(np.maximum(x, 0.0))
        x = x.reshape(x.shape[0], -1)  # channel-major, like torch's Flatten on NCHW
        x = np.maximum(x @ params["classifier.1.weight"].T + params["classifier.1.bias"], 0.0)
        return x @ params["classifier.3.weight"].T + params["classifier.3.bias"]
    raise ValueError(f"no numpy evaluation for architecture {architecture!r}")


def _conv_same(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out_channels, in_channels, k, _ = weight.shape
    pad = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(padded, (k, k), axis=(2, 3))  # n, c, h, w, k, k
    n, _, h, w = x.shape
    columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, in_channels * k * k)
    out = columns @ weight.reshape(out_channels, -1).T + bias
    return out.reshape(n, h, w, out_channels).transpose(0, 3, 1, 2)


def _max_pool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    h2, w2 = h // 2, w // 2  # MaxPool2d(2) floors
    return x[:, :, : h2 * 2, : w2 * 2].reshape(n, c, h2, 2, w2, 2).max(axis=(3, 5))
