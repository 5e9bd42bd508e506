"""Tolerance calibration: how far apart honest replicas of one unit actually are.

Valid results of a decided unit agreed under the job's comparator, so the differences between them are
the honest disagreement of the fleet (rounding from other instruction sets, libraries, builds). This
module reads a bounded sample of them pairwise and recommends tolerances from what it saw:
a high quantile of the observed differences times a safety factor, never below a floor. It reads
output files only; nothing is written. `manage.py tolerance_calibrate` prints the result.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from django.db.models import Count, Q

from marketplace.artifacts.storage import get_storage
from marketplace.jobs import comparators
from marketplace.jobs.kinds import kind_module
from marketplace.workunits.models import Result, WorkUnit

# Below these the recommendation says nothing useful: float32 carries ~7 digits (eps 1.19e-7), so
# relative differences of a few ulps are rounding whatever the sample showed.
RTOL_FLOOR = 1e-6
ATOL_FLOOR = 1e-7
EPSILON_FLOOR = 1e-7
GROUPS = ("cross-class", "same-class", "unknown-class")


@dataclass(frozen=True)
class ObservedPair:
    unit_id: int
    group: str  # cross-class, same-class, unknown-class (a result leased before classes were recorded)
    diff: comparators.PairDiff


@dataclass
class GroupSummary:
    pairs: int = 0
    identical: int = 0
    differing: int = 0
    max_abs_q: float = 0.0
    max_abs_max: float = 0.0
    rel_q: float = 0.0
    rel_max: float = 0.0
    small_abs_q: float = 0.0
    mean_diff_q: float = 0.0
    top1_min: float = 1.0


@dataclass
class Calibration:
    kind: str
    quantile: float
    safety: float
    units: int
    groups: dict[str, GroupSummary] = field(default_factory=dict)
    # None when no two valid results of a unit differed: there was nothing to calibrate on.
    recommended: dict[str, float] | None = None
    default: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _group_of(a: str, b: str) -> str:
    if not a or not b:
        return "unknown-class"
    return "same-class" if a == b else "cross-class"


def observed_pairs(
    *, kind: str = "inference", job_id: int | None = None, max_units: int = 1000, max_pairs_per_unit: int = 6,
    seed: int = 0,
) -> tuple[int, list[ObservedPair]]:
    """Pairs of valid results of the most recent decided units (at most max_units, and at most
    max_pairs_per_unit pairs each, sampled with `seed`). Returns (units read, pairs)."""
    module = kind_module(kind)
    units = WorkUnit.objects.filter(job__kind=kind, state=WorkUnit.State.DONE)
    if job_id is not None:
        units = units.filter(job_id=job_id)
    unit_ids = list(
        units.annotate(valid=Count("results", filter=Q(results__state=Result.State.VALID)))
        .filter(valid__gte=2)
        .order_by("-pk")
        .values_list("pk", flat=True)[:max_units]
    )
    by_unit: dict[int, list[tuple[str, str]]] = {}
    rows = (
        Result.objects.filter(unit_id__in=unit_ids, state=Result.State.VALID)
        .order_by("unit_id", "pk")
        .values_list("unit_id", "output_id", "hardware_class")
    )
    for unit_id, output_id, hardware_class in rows:
        by_unit.setdefault(unit_id, []).append((output_id, hardware_class))
    rng = random.Random(seed)
    storage = get_storage()
    pairs: list[ObservedPair] = []
    for unit_id in unit_ids:
        combos = list(itertools.combinations(by_unit.get(unit_id, []), 2))
        if len(combos) > max_pairs_per_unit:
            combos = rng.sample(combos, max_pairs_per_unit)
        outputs: dict[str, np.ndarray] = {}
        for (out_a, class_a), (out_b, class_b) in combos:
            for output_id in (out_a, out_b):
                if output_id not in outputs:
                    with storage.local_path(output_id) as path:
                        outputs[output_id] = module.read_output(path)
            diff = comparators.pair_diff(outputs[out_a], outputs[out_b])
            pairs.append(ObservedPair(unit_id, _group_of(class_a, class_b), diff))
    return len(unit_ids), pairs


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=np.float64), q, method="higher")) if values else 0.0


def summarise(pairs: list[ObservedPair], *, quantile: float) -> GroupSummary:
    summary = GroupSummary(pairs=len(pairs))
    differing = [p.diff for p in pairs if not p.diff.identical and p.diff.finite]
    summary.identical = sum(p.diff.identical for p in pairs)
    summary.differing = len(differing)
    if differing:
        summary.max_abs_q = _quantile([d.max_abs for d in differing], quantile)
        summary.max_abs_max = max(d.max_abs for d in differing)
        summary.rel_q = _quantile([d.rel for d in differing], quantile)
        summary.rel_max = max(d.rel for d in differing)
        summary.small_abs_q = _quantile([d.small_abs for d in differing], quantile)
        summary.mean_diff_q = _quantile([d.mean_diff for d in differing], quantile)
        summary.top1_min = min(d.top1_agreement for d in differing)
    return summary


def round_up(value: float, digits: int = 2) -> float:
    """Up to `digits` significant digits, never below value (floating noise of x*10 is not a digit)."""
    if value <= 0 or not math.isfinite(value):
        return value
    unit = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return float(f"{math.ceil(value / unit - 1e-9) * unit:.{digits}g}")


def recommend(pairs: list[ObservedPair], *, quantile: float, safety: float) -> dict[str, float] | None:
    """Tolerances covering the observed honest disagreement with a margin.

    rtol from the relative differences of the larger elements, atol from the absolute differences of
    the smaller ones (comparators.PairDiff: together they pass allclose for every pair up to the
    quantile), epsilon for the `mean` metric from the differences of means, min_agreement for `top1`
    from the worst observed agreement; each the quantile's value times `safety`, floored."""
    differing = [p.diff for p in pairs if not p.diff.identical and p.diff.finite]
    if not differing:
        return None
    rel = _quantile([d.rel for d in differing], quantile)
    small_abs = _quantile([d.small_abs for d in differing], quantile)
    mean_diff = _quantile([d.mean_diff for d in differing], quantile)
    disagreement = _quantile([1.0 - d.top1_agreement for d in differing], quantile)
    return {
        "rtol": round_up(max(RTOL_FLOOR, rel * safety)),
        "atol": round_up(max(ATOL_FLOOR, small_abs * safety)),
        "epsilon": round_up(max(EPSILON_FLOOR, mean_diff * safety)),
        "min_agreement": max(0.0, round(1.0 - disagreement * safety, 6)),
    }


def calibrate(
    *, kind: str = "inference", quantile: float = 0.999, safety: float = 10.0, job_id: int | None = None,
    max_units: int = 1000, max_pairs_per_unit: int = 6, seed: int = 0,
) -> Calibration:
    units, pairs = observed_pairs(
        kind=kind, job_id=job_id, max_units=max_units, max_pairs_per_unit=max_pairs_per_unit, seed=seed
    )
    return Calibration(
        kind=kind,
        quantile=quantile,
        safety=safety,
        units=units,
        groups={name: summarise([p for p in pairs if p.group == name], quantile=quantile) for name in GROUPS},
        recommended=recommend(pairs, quantile=quantile, safety=safety),
        default=dict(kind_module(kind).DEFAULTS["compare"]),
    )
