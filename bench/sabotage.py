"""Verification under sabotage: the real verification services on a real database, driven by a simulated
population of honest devices and saboteurs.

    .venv/bin/python bench/sabotage.py                          # every scenario at its default size
    .venv/bin/python bench/sabotage.py --scenario colluding_10  # the headline alone (200,000 units)
    .venv/bin/python bench/sabotage.py --quick                  # every scenario, tiny (what the tests run)
    .venv/bin/python bench/sabotage.py --scenario cold_colluding_pair --scenario cold_colluding_pair_known
    .venv/bin/python bench/sabotage.py --database-url postgres://postgres@127.0.0.1:5432/postgres

Each scenario runs in a child process (bench/sabotage_run.py) on a fresh database: by default a new
SQLite file in a temporary folder under /dev/shm, migrated once and copied per scenario; with
--database-url, fresh PostgreSQL databases on that server (a migrated template, then one copy per
scenario), all dropped at the end. Jobs are real inference jobs of a tiny MLP submitted through
`job_submit`; devices enrol through `device_enroll` with real Ed25519 keys, lease through
`workunit_lease`, upload through `artifact_store` and report signed results through `result_report`;
validation, merging and the periodic sweep run the Celery tasks' own functions in process. The
platform's verification budget is funded generously at the start, so known-answer copies are made as the
settings ask. Banned saboteurs re-enrol at once as new devices under new accounts (Sybil), so the
saboteur share stays constant.

Two families of scenarios (bench/sabotage_run.py, SCENARIOS):

- the six steady-state ones (`honest` ... `lazy`): 20% saboteurs of a population scaled with the units,
  one row per unit;
- the cold network (`cold_*`): --devices honest devices (default 30) plus a pair of colluders of two
  owners working from the first unit, everyone on probation, four rows per unit; `*_known` adds the
  submitter's own known answers, one hidden row per unit. `cold_colluding_pair*` corrupts whole units,
  `cold_subtle_pair*` one row of each unit.

Figures per scenario: wrong rows and units of the delivered job outputs as they stand at the end (rows
that disagree with the true output under the job's comparator) and as first delivered, mean results
computed per unit (known-answer copies, audits and re-verification included) and rows computed per row
delivered, the honest false-mismatch rate (honest devices' results judged invalid / judged), bans,
answers that failed the submitter's known rows, units re-decided, the saboteurs' results judged valid,
jobs reopened, wall time. A table, then, as the last line, one JSON object of all figures. Exit status 1
when a scenario could not run to its end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.sabotage_run import HEADLINE, SCENARIOS  # noqa: E402
from demo.cluster import Process  # noqa: E402

TARGETS = {"accepted_wrong_rate": 1e-5, "results_per_unit": 1.3, "honest_false_mismatch_rate": 1e-3, "bans_honest": 0}
COLD = [name for name, scenario in SCENARIOS.items() if scenario.pair]
DEFAULT_UNITS = {name: 20_000 for name in SCENARIOS} | {HEADLINE: 200_000} | dict.fromkeys(COLD, 2_000)
# Devices scale with units so that each computes as much (~870 results) at every size: trust, audits and
# bans then play out alike, and the cheaters still at work when the last job completes weigh the same.
DEVICES_PER_UNIT = 300 / 200_000
# The cold network is a fixed 30 honest devices beside the pair instead: how often the pair forms a unit's
# quorum depends on the population, not on the units (among 32 devices, both first replicas or one of them
# and the tie-break replica: ~0.6% of units; 10 to 22 of 2,000 measured), and at 2,000 units of 4 rows each
# device computes ~130 results: the first honest devices earn trust (100 in a row) after ~80% of the
# reports, so most of the run is cold (--trust-threshold 100000 keeps all of it cold).
COLD_DEVICES = 30
COLD_UNITS_PER_JOB = 200  # ten jobs of 800 rows at the default size: deliveries along the run, not one at its end
QUICK = {"units": 200, "devices": 16, "units_per_job": 100}
QUICK_COLD_DEVICES = 8  # beside the pair: it shares a unit often enough to show in 200 units
SYBIL = ("banned saboteurs re-enrol at once as new devices under new accounts (Sybil), "
         "so the saboteur share of the population stays constant")
TRUST_FLAGS = {
    "trust_threshold": "IDLEGRID_TRUST_THRESHOLD", "audit_rate": "IDLEGRID_AUDIT_RATE",
    "known_answer_rate": "IDLEGRID_KNOWN_ANSWER_RATE", "audit_window": "IDLEGRID_AUDIT_WINDOW_SECONDS",
}


def log(message: str) -> None:
    print(f"[sabotage] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                        help="run this scenario (repeatable; default every one)")
    parser.add_argument("--units", type=int,
                        help=f"units per scenario (default {HEADLINE}: 200,000; cold_*: 2,000; others 20,000)")
    parser.add_argument("--devices", type=int,
                        help=f"population size (default {DEVICES_PER_UNIT * 1000:g} per 1,000 units: 300 for the headline); "
                             f"for cold_*, the honest devices beside the pair (default {COLD_DEVICES})")
    parser.add_argument("--batch", type=int, default=4, help="max_units per lease request (default 4)")
    parser.add_argument("--units-per-job", type=int,
                        help=f"units per job (default 2000; cold_*: {COLD_UNITS_PER_JOB})")
    parser.add_argument("--rows-per-unit", type=int, help="rows per unit (default: 1; cold_*: 4)")
    parser.add_argument("--known-per-unit", type=int,
                        help="the submitter's known rows hidden per unit, in the *_known scenarios (default 1)")
    parser.add_argument("--collusion-groups", type=int, default=1,
                        help="colluders split into this many groups with their own schedules and answers (default 1: one coalition, the worst case)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trust-threshold", type=int, help="IDLEGRID_TRUST_THRESHOLD for the run (default: the settings default)")
    parser.add_argument("--audit-rate", type=float, help="IDLEGRID_AUDIT_RATE for the run")
    parser.add_argument("--known-answer-rate", type=float, help="IDLEGRID_KNOWN_ANSWER_RATE for the run")
    parser.add_argument("--audit-window", type=int, help="IDLEGRID_AUDIT_WINDOW_SECONDS for the run")
    parser.add_argument("--database-url", help="a PostgreSQL server to create the bench databases on (default: SQLite under /dev/shm)")
    parser.add_argument("--parallel", type=int, help="scenarios run at once, each in its own process (default 1; 2 with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (SQLite databases, artifacts) for inspection")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny: {QUICK['units']} units per scenario, {QUICK['devices']} devices "
                             f"({QUICK_COLD_DEVICES} honest beside the pair in cold_*)")
    args = parser.parse_args(argv)
    if args.quick:
        args.units = args.units or QUICK["units"]
        args.units_per_job = args.units_per_job or QUICK["units_per_job"]
    args.parallel = args.parallel or (2 if args.quick else 1)
    args.scenarios = args.scenario or list(SCENARIOS)
    return args


def scenario_size(args: argparse.Namespace, name: str) -> tuple[int, int, int]:
    """(units, devices, units per job) of a scenario: the flags, else its defaults."""
    cold = name in COLD
    units = args.units or DEFAULT_UNITS[name]
    if args.devices:
        devices = args.devices
    elif args.quick:
        devices = QUICK_COLD_DEVICES if cold else QUICK["devices"]
    else:
        devices = COLD_DEVICES if cold else max(10, round(units * DEVICES_PER_UNIT))
    return units, devices, args.units_per_job or (COLD_UNITS_PER_JOB if cold else 2000)


# --- databases -------------------------------------------------------------------------------------

class SQLiteDatabases:
    """A migrated template file, copied per scenario (a copy costs nothing beside a migration)."""

    vendor = "sqlite"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.template = work / "template.sqlite3"

    def template_url(self) -> str:
        return f"sqlite:///{self.template}"

    def scenario_url(self, name: str) -> str:
        copy = self.work / f"{name}.sqlite3"
        shutil.copyfile(self.template, copy)
        return f"sqlite:///{copy}"

    def close(self) -> None:
        pass  # the files go with the temporary folder


class PostgresDatabases:
    """Fresh databases on a PostgreSQL server: a migrated template and one copy per scenario, all dropped."""

    vendor = "postgresql"

    def __init__(self, server_url: str) -> None:
        import psycopg

        parts = urlsplit(server_url)
        if parts.scheme not in ("postgres", "postgresql"):
            raise BenchError(f"--database-url must be postgres://...; got {parts.scheme!r}")
        self.psycopg, self.parts, self.created = psycopg, parts, []
        self.maintenance = urlunsplit(parts if parts.path.strip("/") else parts._replace(path="/postgres"))
        self.prefix = f"idlegrid_sabotage_{os.getpid()}"

    def _create(self, name: str, template: str | None = None) -> str:
        with self.psycopg.connect(self.maintenance, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        self.created.append(name)
        return urlunsplit(self.parts._replace(path=f"/{name}"))

    def template_url(self) -> str:
        return self._create(f"{self.prefix}_template")

    def scenario_url(self, name: str) -> str:
        return self._create(f"{self.prefix}_{name}", template=f"{self.prefix}_template")

    def close(self) -> None:
        with self.psycopg.connect(self.maintenance, autocommit=True) as conn:
            for name in reversed(self.created):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        log(f"dropped {len(self.created)} databases")


@contextmanager
def databases(args: argparse.Namespace, work: Path) -> Iterator[SQLiteDatabases | PostgresDatabases]:
    dbs: SQLiteDatabases | PostgresDatabases = (
        PostgresDatabases(args.database_url) if args.database_url else SQLiteDatabases(work)
    )
    try:
        yield dbs
    finally:
        dbs.close()


# --- child processes -------------------------------------------------------------------------------

def child_env(args: argparse.Namespace, database_url: str, var_dir: Path) -> dict[str, str]:
    """The caller's environment less anything that would point Django elsewhere; the trust overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDLEGRID_", "CELERY_", "DATABASE_URL", "DJANGO_"))}
    env.update({
        "DJANGO_SETTINGS_MODULE": "marketplace.settings",
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": "filesystem://",  # never used: the bench stubs Celery's enqueue
        "IDLEGRID_VAR_DIR": str(var_dir),
        "IDLEGRID_ARTIFACT_DIR": str(var_dir / "artifacts"),
        "IDLEGRID_ENROLLMENTS_PER_HOUR": "1000000",
        # Devices here call the API back to back, faster than the per-device rates a real agent never reaches.
        "IDLEGRID_THROTTLE_SCALE": "1000",
        "DEBUG": "false",
        "LOG_LEVEL": "ERROR",  # every ban and reopened job logs a warning
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })
    for flag, setting in TRUST_FLAGS.items():
        if getattr(args, flag) is not None:
            env[setting] = str(getattr(args, flag))
    return env


def run_child(env: dict[str, str], *argv: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.sabotage_run", *argv], cwd=REPO, env=env)
    if done.returncode != 0:
        raise BenchError(f"bench.sabotage_run {' '.join(argv[:2])} exited with {done.returncode}")


class ScenarioRun:
    """One scenario's child process, on its own database and folder."""

    def __init__(self, args: argparse.Namespace, name: str, dbs: SQLiteDatabases | PostgresDatabases, work: Path) -> None:
        self.name, self.keep, self.folder = name, args.keep, work / name
        self.out = self.folder / "figures.json"
        units, devices, per_job = scenario_size(args, name)
        log(f"{name}: {units} units, {devices} {'honest devices and a pair' if name in COLD else 'devices'}")
        argv = [
            "--scenario", name, "--units", str(units), "--devices", str(devices), "--batch", str(args.batch),
            "--units-per-job", str(per_job), "--collusion-groups", str(args.collusion_groups),
            "--seed", str(args.seed), "--out", str(self.out),
            *(["--rows-per-unit", str(args.rows_per_unit)] if args.rows_per_unit else []),
            *(["--known-per-unit", str(args.known_per_unit)] if args.known_per_unit else []),
        ]
        env = child_env(args, dbs.scenario_url(name), self.folder / "var")
        # No log file: its progress lines and any traceback go to the bench's own stderr, as they happen.
        self.process = Process.spawn(name, [sys.executable, "-m", "bench.sabotage_run", *argv], env=env, log_dir=None)

    def figures(self) -> dict[str, Any]:
        """Its figures, or {"error": ...} when it crashed (the other scenarios go on)."""
        if self.process.popen.wait() != 0:
            return {"error": f"exited with {self.process.popen.returncode} (its traceback is above)"}
        if not self.keep:
            shutil.rmtree(self.folder / "var", ignore_errors=True)  # its artifacts: free the memory
        return json.loads(self.out.read_text())


def run_scenarios(args: argparse.Namespace, dbs: SQLiteDatabases | PostgresDatabases, work: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every scenario, at most --parallel at a time, the largest first; yields each as it finishes."""
    pending = sorted(args.scenarios, key=lambda name: -scenario_size(args, name)[0])
    running: list[ScenarioRun] = []
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                running.append(ScenarioRun(args, pending.pop(0), dbs, work))
            done = next((run for run in running if not run.process.alive()), None)
            if done is None:
                time.sleep(0.5)
                continue
            running.remove(done)
            yield done.name, done.figures()
    finally:
        for run in running:
            run.process.stop()


# --- report --------------------------------------------------------------------------------------

def verdict(figures: dict[str, Any]) -> dict[str, bool]:
    return {
        "accepted_wrong_rate": (figures["accepted_wrong_rate"] or 0) <= TARGETS["accepted_wrong_rate"],
        "results_per_unit": (figures["results_per_unit"] or 0) <= TARGETS["results_per_unit"],
        "honest_false_mismatch_rate": (figures["honest_false_mismatch_rate"] or 0) <= TARGETS["honest_false_mismatch_rate"],
        "bans_honest": figures["bans_honest"] == 0,
    }


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _devices(f: dict[str, Any]) -> str:
    saboteur = f["saboteur"]
    return f"{f['honest_devices']}+2" if saboteur and saboteur["pair"] else str(f["devices"])


def render(report: dict[str, Any]) -> str:
    header = ["scenario", "units", "devices", "rows/unit", "wrong rows", "wrong rate", "wrong 1st", "res/unit",
              "rows/row", "later half", "honest mism", "bans h/s", "known fail h/s", "redecided", "cheats valid",
              "reopened", "failed", "wall s", "units/s", "targets"]
    rows = [header]
    for name, f in report["scenarios"].items():
        if "error" in f:
            rows.append([name, "-", "-", "error: " + f["error"]] + [""] * (len(header) - 4))
            continue
        met = verdict(f)
        later, failed = f["later_half"], f["known_rows_failed"]
        known = f"+{f['known_rows_per_unit']}" if f["known_rows_per_unit"] else ""
        rows.append([
            name + (" *" if name == HEADLINE else ""), f"{f['units']:,}", _devices(f), f"{f['rows_per_unit']}{known}",
            str(f["accepted_wrong_rows"]), _rate(f["accepted_wrong_row_rate"]), str(f["wrong_at_first_delivery_rows"]),
            f"{f['results_per_unit']:.3f}", f"{f['rows_computed_per_row_delivered']:.3f}",
            f"{later['results_per_unit']:.3f} {_rate(later['accepted_wrong_rate'])}",
            _rate(f["honest_false_mismatch_rate"]), f"{f['bans_honest']}/{f['bans_saboteur']}",
            f"{failed['honest']}/{failed['saboteur']}", str(f["units_redecided"]),
            f"{f['cheated_results_valid']}/{f['cheated_results']}", str(f["jobs_reopened"]), f"{f['jobs_failed']}/{f['jobs']}",
            f"{f['wall_seconds']:.0f}", f"{f['units_per_second']:.1f}",
            "-" if name in COLD else "met" if all(met.values()) else "missed: " + ", ".join(k for k, ok in met.items() if not ok),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    settings = ", ".join(f"{k.removeprefix('IDLEGRID_')}={v}" for k, v in report["settings"].items())
    lines += [
        f"* headline. targets: accepted-wrong <= {TARGETS['accepted_wrong_rate']:g}, results/unit <= "
        f"{TARGETS['results_per_unit']}, honest false-mismatch <= {TARGETS['honest_false_mismatch_rate']:g}, no honest "
        "ban; none for cold_* (a cold network replicates every unit by design)",
        "wrong rows: rows of the delivered outputs still wrong at the end (wrong rate: per row delivered); wrong 1st: "
        "wrong in the outputs as first delivered; rows/unit: the unit's own rows + the submitter's hidden known rows; "
        "rows/row: rows computed per row delivered; later half: results/unit and wrong unit rate of the second half "
        "of the jobs (past the cold start); known fail: answers that failed the submitter's known rows (each re-checks "
        "its owner's recent answers); redecided: units decided again (ban, dispute, re-check); cheats valid: "
        "saboteurs' wrong answers judged valid / made",
        f"settings: {settings}; populations: 20% saboteurs, or (cold_*) honest devices + a pair of colluders "
        f"cheating on every unit, everyone on probation at the start; lease batch {report['batch']}",
        f"adversary: {SYBIL}",
    ]
    return "\n".join(lines)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: scenarios stopped, databases dropped, temporary folder removed


def scenarios_collect(args: argparse.Namespace, dbs: SQLiteDatabases | PostgresDatabases, work: Path) -> dict[str, Any]:
    """Every scenario's figures with its verdict, in the order asked for; each logged as it finishes."""
    finished = {}
    # closing(): the children are in sessions of their own, so a Ctrl-C reaches this process only; whatever
    # ends the loop (an exception, a signal) must stop the scenarios still running, at once.
    with closing(run_scenarios(args, dbs, work)) as runs:
        for name, figures in runs:
            finished[name] = figures
            if "error" in figures:
                log(f"{name}: {figures['error']}")
                continue
            figures["targets_met"] = verdict(figures)
            log(f"{name}: {figures['accepted_wrong_rows']} wrong rows delivered, {figures['results_per_unit']} results/unit")
    return {name: finished[name] for name in args.scenarios}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    shm = Path("/dev/shm")
    report: dict[str, Any] = {
        "bench": "sabotage", "quick": args.quick, "batch": args.batch, "collusion_groups": args.collusion_groups,
        "seed": args.seed, "adversary": SYBIL, "targets": TARGETS, "headline": HEADLINE, "cold": COLD,
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "scenarios": {},
    }
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="idlegrid-sabotage-", dir=shm if shm.is_dir() else None))
    try:
        with databases(args, work) as dbs:
            report["database"] = dbs.vendor
            run_child(child_env(args, dbs.template_url(), work / "template-var"), "--migrate-only", "--out", "-")
            report["scenarios"] = scenarios_collect(args, dbs, work)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    ran = [f for f in report["scenarios"].values() if "error" not in f]
    report["settings"] = ran[0]["settings"] if ran else {}
    if HEADLINE in report["scenarios"] and "error" not in report["scenarios"][HEADLINE]:
        report["headline_met"] = all(report["scenarios"][HEADLINE]["targets_met"].values())
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = bench(args)
    except BenchError as exc:
        log(str(exc))
        print(json.dumps({"bench": "sabotage", "error": str(exc)}))
        return 1
    print(render(report))
    print(json.dumps(report, separators=(",", ":")))
    return 1 if any("error" in f or f["stalled"] for f in report["scenarios"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
