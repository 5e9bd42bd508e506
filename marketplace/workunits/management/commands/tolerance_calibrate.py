"""manage.py tolerance_calibrate: the honest disagreement between valid replicas, and tolerances for it."""

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from marketplace.jobs.kinds import KINDS
from marketplace.workunits.calibration import GROUPS, calibrate


def _g(value: float) -> str:
    return f"{value:.3g}"


class Command(BaseCommand):
    help = (
        "Read valid results of decided units pairwise (bounded sample, most recent units first), print the "
        "observed differences per pair of hardware classes, and recommend compare tolerances "
        "(high quantile x safety factor, floored). The last line is one JSON object."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--kind", default="inference", choices=sorted(KINDS))
        parser.add_argument("--quantile", type=float, default=0.999, help="of the per-pair differences (default 0.999)")
        parser.add_argument("--safety", type=float, default=10.0, help="factor on the quantile (default 10)")
        parser.add_argument("--job", type=int, default=None, help="only this job's units")
        parser.add_argument("--max-units", type=int, default=1000, help="units read at most (default 1000)")
        parser.add_argument("--max-pairs-per-unit", type=int, default=6, help="pairs sampled per unit (default 6)")
        parser.add_argument("--seed", type=int, default=0, help="for the pair sample")

    def handle(self, *args: Any, kind: str, quantile: float, safety: float, job: int | None, max_units: int,
               max_pairs_per_unit: int, seed: int, **options: Any) -> None:
        if not 0 < quantile <= 1:
            raise CommandError("--quantile must be in (0, 1]")
        if safety < 1:
            raise CommandError("--safety must be at least 1")
        if max_units < 1 or max_pairs_per_unit < 1:
            raise CommandError("--max-units and --max-pairs-per-unit must be at least 1")
        result = calibrate(kind=kind, quantile=quantile, safety=safety, job_id=job, max_units=max_units,
                           max_pairs_per_unit=max_pairs_per_unit, seed=seed)
        out = self.stdout.write
        out(f"tolerance calibration: kind {kind}, {result.units} units with 2+ valid results, "
            f"quantile {quantile:g}, safety x{safety:g}")
        header = ("pairs", "count", "identical", "differing", "max_abs q", "max_abs max", "rel q", "rel max",
                  "small_abs q", "mean_diff q", "top1 min")
        out("  ".join(f"{h:>13}" for h in header))
        for name in GROUPS:
            g = result.groups[name]
            cells = (name, g.pairs, g.identical, g.differing, _g(g.max_abs_q), _g(g.max_abs_max), _g(g.rel_q),
                     _g(g.rel_max), _g(g.small_abs_q), _g(g.mean_diff_q), _g(g.top1_min))
            out("  ".join(f"{c:>13}" for c in cells))
        default = result.default
        if result.recommended is None:
            out("no two valid results of a unit differed: nothing to calibrate on; keep the default "
                f"(rtol {default.get('rtol')}, atol {default.get('atol')})")
        else:
            r = result.recommended
            out(f"recommended: allclose rtol {r['rtol']:g}, atol {r['atol']:g}; metric (mean) epsilon "
                f"{r['epsilon']:g}; top1 min_agreement {r['min_agreement']:g} "
                f"(default: rtol {default.get('rtol')}, atol {default.get('atol')})")
        out(json.dumps(result.as_json(), sort_keys=True))
