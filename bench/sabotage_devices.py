"""What each simulated device returns for a unit: pure numpy, no Django.

Honest devices belong to hardware classes. Class 0 returns the true output; class c > 0 returns it
perturbed by a deterministic pattern of relative size ~1e-7 seeded by (class, unit input): identical
bytes inside a class, tolerance-level differences across classes, as CPU inference does
(shared/research/BASELINES.md: up to ~1.6e-7 across batch layouts or instruction sets).

Saboteurs return plausible wrong outputs (same shape and dtype):

- `always_wrong`: every unit, the truth off by a per-device offset (a broken device: wrong, and wrong
  the same way each time, but unlike any other device).
- `intermittent`: each unit with probability `cheat_rate`, a plausible random output, independently.
- `colluding`: a group cheats on the units whose input digest hashes (salted by the group) into the
  first `cheat_rate` of the range, so its members cheat on the same units, and all return the same
  wrong bytes for a unit, derived from the group and the unit's input, so they agree with each other.
- `colluding_row`: the same schedule and shared bytes as `colluding`, but only one row of the unit is
  wrong (chosen, like the wrong values, from the group and the unit's input): a pair that knows a
  submitter may hide its own known rows in a unit, but not which rows they are, and bets on one row.
- `lazy`: every unit, random output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

HONEST_NOISE = 1e-7  # relative, per element, across hardware classes


@dataclass(frozen=True)
class Behaviour:
    kind: str
    cheat_rate: float = 0.0
    group: int = 0  # colluding groups: members share the cheat schedule and the wrong answers

    @property
    def honest(self) -> bool:
        return self.kind == "honest"


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def mlp_forward(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The true output of the registry MLP (Linear, ReLU, Linear, ...) in float32."""
    layers = sorted({int(name.split(".")[1]) for name in weights})
    h = x.astype(np.float32)
    for position, index in enumerate(layers):
        h = h @ weights[f"net.{index}.weight"].T + weights[f"net.{index}.bias"]
        if position < len(layers) - 1:
            h = np.maximum(h, 0)
    return h.astype(np.float32)


def honest_output(truth: np.ndarray, *, hardware_class: int, input_sha: str) -> np.ndarray:
    if hardware_class == 0:
        return truth
    pattern = np.random.default_rng(_seed("class", hardware_class, input_sha)).uniform(-1, 1, truth.shape)
    return (truth.astype(np.float64) * (1 + HONEST_NOISE * pattern)).astype(np.float32)


def colluders_cheat(behaviour: Behaviour, input_sha: str) -> bool:
    """The group's shared schedule: a deterministic cut of the input digest, salted by the group."""
    return _seed("schedule", behaviour.group, input_sha) % 1_000_000 < behaviour.cheat_rate * 1_000_000


def _plausible_wrong(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shaped like the truth, of its scale, and far outside any tolerance."""
    scale = float(np.abs(truth).mean()) + 0.5
    return (truth + rng.standard_normal(truth.shape) * scale).astype(np.float32)


class Device:
    """The compute side of one simulated device: the output it reports for a unit, and whether it cheated."""

    def __init__(self, behaviour: Behaviour, *, hardware_class: int, seed: int) -> None:
        self.behaviour = behaviour
        self.hardware_class = hardware_class
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def compute(self, truth: np.ndarray, input_sha: str) -> tuple[np.ndarray, bool]:
        kind = self.behaviour.kind
        if kind == "always_wrong":
            offset = np.random.default_rng(_seed("broken", self.seed)).uniform(0.05, 0.5, truth.shape)
            return (truth + offset).astype(np.float32), True
        if kind == "lazy":
            return self.rng.standard_normal(truth.shape).astype(np.float32), True
        if kind == "intermittent" and self.rng.random() < self.behaviour.cheat_rate:
            return _plausible_wrong(truth, self.rng), True
        if kind in ("colluding", "colluding_row") and colluders_cheat(self.behaviour, input_sha):
            shared = np.random.default_rng(_seed("wrong", self.behaviour.group, input_sha))
            if kind == "colluding":
                return _plausible_wrong(truth, shared), True
            wrong, row = truth.copy(), int(shared.integers(len(truth)))
            wrong[row] = _plausible_wrong(truth[row], shared)
            return wrong, True
        return honest_output(truth, hardware_class=self.hardware_class, input_sha=input_sha), False
