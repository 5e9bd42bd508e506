"""Sustained load: N minutes of leases and reports with the sweep, a real Celery worker validating and
merging, beat, and the results archive running; does throughput hold, and does the hot table stay bounded?

    .venv/bin/python bench/soak.py                          # 30 minutes, 8 agents, 5-minute windows
    .venv/bin/python bench/soak.py --quick                  # ~1 minute, 4 agents, 10 s windows (tests)
    .venv/bin/python bench/soak.py --minutes 10 --agents 16 --client stdlib

The machinery is bench/dispatch.py's (a fresh PostgreSQL database on the server DATABASE_URL names, dropped at
the end; gunicorn; fixtures; the Celery worker) and bench/agents.py's simulated agents (lease, report the
one pre-uploaded output, signed). Added here: Celery beat with the production schedule (the sweep, lease
expiry, the ledger sweep, the archive), and a feeder that keeps the queue full with new jobs (bench/fixtures.py's
units, without the retirement of earlier work that bench/fixtures.py `job` does) and samples, every
--sample seconds, the hot table (rows, pg_relation_size, dead rows, HOT updates), the archive, the units
decided and the lease statement's cost (EXPLAIN ANALYZE, rolled back).

Time is compressed so the archive has work within the run: the audit window is --audit-window seconds
and results move --archive-after seconds after their job ends (defaults 60 and 120; production: 30 and
37 days), and jobs are free (price 0), so their earnings are "unpaid" and hold nothing back. What a soak
shows is whether the machine keeps its pace as rows pile up and leave, not the money path.

Prints a table per window and, as the last line, one JSON object: throughput per window (reports accepted
and units decided), the hot table over time, and `ratio` = last window / first window (goal >= 0.9).
Exit status 1 when a request failed or nothing was reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import agents, dispatch  # noqa: E402
from demo.cluster import ClusterError, Process  # noqa: E402

GOAL = 0.9  # last window's throughput over the first's (issue 14)


def log(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    parser.add_argument("--window", type=float, default=300.0, help="throughput window in seconds (default 300)")
    parser.add_argument("--agents", type=int, default=8, help="simulated agents, one device and owner each (default 8)")
    parser.add_argument("--batch", type=int, default=1, help="max_units per lease (default 1)")
    parser.add_argument("--workers", type=int, default=3, help="gunicorn sync workers (default 3)")
    parser.add_argument("--load", choices=agents.LOADS, default="processes")
    parser.add_argument("--client", choices=agents.CLIENTS, default="httpx")
    parser.add_argument("--job-units", type=int, default=2000, help="units per job the feeder adds (default 2000)")
    parser.add_argument("--queue", type=int, default=8000, help="the feeder adds a job when fewer replicas wait (default 8000)")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples of the tables (default 30)")
    parser.add_argument("--audit-window", type=int, default=60, help="IDLEGRID_AUDIT_WINDOW_SECONDS (default 60)")
    parser.add_argument("--archive-after", type=int, default=120, help="IDLEGRID_ARCHIVE_AFTER_SECONDS (default 120)")
    parser.add_argument("--archive-every", type=int, default=30, help="IDLEGRID_ARCHIVE_SECONDS (default 30)")
    parser.add_argument("--drain", type=float, default=0.0,
                        help="after the load, wait up to this many seconds for a first job's results to be archived "
                             "(the worker and beat keep running; default 0, --quick 120)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or dispatch.DEFAULT_SERVER)
    parser.add_argument("--broker-url", default=dispatch.DEFAULT_BROKER,
                        help="Redis database dedicated to the bench; its queues are purged at the end (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="~1 minute: 4 agents, 10 s windows, small jobs")
    parser.add_argument("--feeder", type=Path, help=argparse.SUPPRESS)  # internal: the Django-side feeder
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.window, args.agents, args.workers = 0.75, 10.0, 4, 2
        args.job_units, args.queue, args.sample, args.drain = 100, 400, 3.0, 120.0
        args.audit_window, args.archive_after, args.archive_every = 10, 10, 5
    if not 0 < args.minutes <= 24 * 60 or not 5 <= args.window <= 3600 or not 1 <= args.sample <= 600:
        parser.error("--minutes in (0, 1440], --window in [5, 3600], --sample in [1, 600]")
    if not 0 <= args.drain <= 3600:
        parser.error("--drain in [0, 3600]")
    for name in ("agents", "workers", "job_units", "queue", "audit_window", "archive_after", "archive_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.batch <= 64 or args.job_units > 100_000:
        parser.error("--batch in [1, 64], --job-units at most 100000")
    if args.archive_after < args.audit_window:
        parser.error("--archive-after must be at least --audit-window (the marketplace refuses less)")
    return args


# --- the feeder and sampler (a Django process on the bench database) -----------------------------------

def _job_add(setup_data: dict[str, Any], units: int) -> int:
    """A running, free inference job of `units` units with their quorum of unsent replicas, made as
    bench/fixtures.py makes one."""
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from bench import fixtures
    from marketplace.artifacts.models import Artifact
    from marketplace.jobs.models import Job
    from marketplace.workunits.models import Result, WorkUnit

    submitter = get_user_model().objects.get(username=fixtures.SUBMITTER)
    model, label = setup_data["model"], f"soak-{time.time_ns()}"
    x_shas = [hashlib.sha256(f"{label}-{i}".encode()).hexdigest() for i in range(units)]
    spec = {**fixtures._spec(model, units, hashlib.sha256(label.encode()).hexdigest()), "price_per_result": 0}
    with transaction.atomic():
        Artifact.objects.bulk_create([Artifact(sha256=sha, size=32840, uploaded_by=submitter) for sha in x_shas],
                                     batch_size=fixtures.BULK)
        job = Job.objects.create(owner=submitter, kind="inference", state=Job.State.RUNNING, units_total=units,
                                 spec=spec, started_at=timezone.now())
        rows = WorkUnit.objects.bulk_create(
            [WorkUnit(job=job, index=i, payload=fixtures._payload(model, sha), **fixtures._unit_fields())
             for i, sha in enumerate(x_shas)], batch_size=fixtures.BULK)
        through = WorkUnit.inputs.through
        through.objects.bulk_create([through(workunit_id=u.pk, artifact_id=a) for u, sha in zip(rows, x_shas)
                                     for a in (model["weights"], sha)], batch_size=fixtures.BULK)
        Result.objects.bulk_create([Result(unit_id=u.pk, job_id=job.pk, **fixtures.NEEDS) for u in rows
                                    for _ in range(fixtures.QUORUM)], batch_size=fixtures.BULK)
    return job.pk


def _lease_ms(device: Any) -> float | None:
    """EXPLAIN ANALYZE of the lease statement for `device`, rolled back (bench/lease_cost.py's measure)."""
    from django.db import connection, transaction

    from bench.lease_cost import _lease_params

    sql, params = _lease_params(device)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        plan = cursor.fetchone()[0]
        transaction.set_rollback(True)
    plan = (json.loads(plan) if isinstance(plan, str) else plan)[0]
    return round(plan["Execution Time"], 3)


SAMPLE_SQL = """
SELECT (SELECT count(*) FROM workunits_result),
       (SELECT count(*) FROM workunits_result WHERE state = 'unsent'),
       pg_relation_size('workunits_result'), pg_indexes_size('workunits_result'),
       (SELECT count(*) FROM workunits_resultarchive),
       (SELECT count(*) FROM workunits_workunit WHERE state = 'done'),
       (SELECT count(*) FROM workunits_workunit WHERE need_validate),
       (SELECT count(*) FROM jobs_job WHERE state = 'completed'),
       s.n_dead_tup, s.n_tup_upd, s.n_tup_hot_upd, s.autovacuum_count
FROM pg_stat_user_tables s WHERE s.relname = 'workunits_result'
"""
SAMPLE_FIELDS = ("hot_rows", "unsent", "heap_bytes", "index_bytes", "archived", "units_done", "validate_backlog",
                 "jobs_completed", "dead_rows", "updates", "hot_updates", "autovacuums")


def feeder(args: argparse.Namespace) -> int:
    """Keep at least --queue replicas unsent; append a sample line to <dir>/samples.jsonl every --sample s;
    stop on SIGTERM. <dir>/setup.json names the fixtures; <dir>/ready is written after the first jobs."""
    from bench import fixtures

    fixtures._django()
    from django.db import connection

    from marketplace.workers.models import Device

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    folder = args.feeder
    setup_data = json.loads((folder / "setup.json").read_text())
    probe = Device.objects.get(pk=setup_data["probe_device"]["device_id"])
    while _count_unsent() < 2 * args.queue:
        _job_add(setup_data, args.job_units)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE workunits_result")
    (folder / "ready").write_text("ready")
    next_sample = 0.0
    with (folder / "samples.jsonl").open("a") as out:
        while not stopping:
            if _count_unsent() < args.queue:
                _job_add(setup_data, args.job_units)
                continue
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + args.sample
                with connection.cursor() as cursor:
                    cursor.execute(SAMPLE_SQL)
                    sample = dict(zip(SAMPLE_FIELDS, cursor.fetchone()))
                sample["lease_ms"] = _lease_ms(probe)
                out.write(json.dumps({"at": time.monotonic(), **sample}) + "\n")
                out.flush()
            time.sleep(0.5)
    return 0


def _count_unsent() -> int:
    from marketplace.workunits.models import Result

    return Result.objects.filter(state=Result.State.UNSENT).count()


# --- the run ------------------------------------------------------------------------------------------

def soak_env(args: argparse.Namespace, database_url: str, var: Path) -> dict[str, str]:
    env = dispatch.child_env(database_url, args.broker_url, var)
    env.update({
        "IDLEGRID_AUDIT_WINDOW_SECONDS": str(args.audit_window),
        "IDLEGRID_ARCHIVE_AFTER_SECONDS": str(args.archive_after),
        "IDLEGRID_ARCHIVE_SECONDS": str(args.archive_every),
        # Every agent leases like a device already trusted for its hardware: the lease policy's quota on
        # probation (one lease) would make --batch meaningless; known answers are off (no budget here).
        "IDLEGRID_PROBATION_LEASES": "64",
        "IDLEGRID_KNOWN_ANSWER_RATE": "0",
    })
    return env


def beat(env: dict[str, str], work: Path) -> Process:
    return Process.spawn("beat", [sys.executable, "-m", "celery", "-A", "marketplace", "beat", "--loglevel", "WARNING",
                                  "--schedule", str(work / "var" / "celerybeat-schedule")],
                         env=env, log_dir=work / "var" / "logs")


def purge(broker_url: str) -> int:
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        purged = 0
        for queue in ("celery", "webhooks"):
            purged += int(client.llen(queue))
            client.delete(queue)
        return purged
    finally:
        client.close()


def _wait_ready(folder: Path, process: Process, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (folder / "ready").exists():
        if not process.alive():
            raise dispatch.BenchError(f"the feeder exited:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise dispatch.BenchError("the feeder did not fill the queue in time")
        time.sleep(0.5)


def run(args: argparse.Namespace) -> dict[str, Any]:
    name = f"idlegrid_soak_{os.getpid()}"
    maintenance, database_url = dispatch.database_urls(args.database_url, name)
    with tempfile.TemporaryDirectory(prefix="idlegrid-soak-") as tmp, dispatch.bench_database(maintenance, name):
        work = Path(tmp)
        env = soak_env(args, database_url, work / "var")
        dispatch.run_django(env, "manage.py", "migrate", "--noinput", "-v", "0")
        setup = dispatch.fixtures(env, work, "setup", "--devices", str(args.agents + 1))
        setup["probe_device"] = setup["devices"].pop()  # measures the lease statement; never leases
        (work / "setup.json").write_text(json.dumps(setup))
        feed = Process.spawn("feeder", [sys.executable, "bench/soak.py", "--feeder", str(work),
                                        *_feeder_argv(args)], env=env, log_dir=work / "var" / "logs")
        try:
            _wait_ready(work, feed)
            log(f"queue filled; {args.agents} agents for {args.minutes:g} min")
            with dispatch.celery_worker(env, True, work), dispatch.gunicorn(env, args.workers, work) as (_, base_url):
                scheduler = beat(env, work)
                try:
                    result = agents.run_agents(
                        load=args.load, devices=setup["devices"], units=10**12, seconds=60 * args.minutes,
                        plan_args={"base_url": base_url, "batch": args.batch, "output_sha256": setup["output_sha256"],
                                   "client": args.client})
                    _drain(work, args.drain)
                finally:
                    scheduler.stop()
        finally:
            feed.stop()
            purged = purge(args.broker_url)
        samples = _samples(work)
    return summarise(args, result, samples, purged)


def _samples(folder: Path) -> list[dict[str, Any]]:
    path = folder / "samples.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def _drain(folder: Path, seconds: float) -> None:
    """Let the worker and beat finish what the load left (validations, merges, the archive's next runs) until
    some results are archived, for at most `seconds`: a short run's figures then show the whole cycle."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples = _samples(folder)
        if samples and samples[-1]["archived"] > 0:
            return
        time.sleep(1.0)
    if seconds:
        log(f"nothing archived {seconds:g} s after the load")


def _feeder_argv(args: argparse.Namespace) -> list[str]:
    return ["--job-units", str(args.job_units), "--queue", str(args.queue), "--sample", str(args.sample)]


# --- figures ------------------------------------------------------------------------------------------

def summarise(args: argparse.Namespace, result: agents.LoadResult, samples: list[dict[str, Any]],
              purged: int) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for run_ in result.runs:
        for key, count in run_.errors.items():
            errors[key] = errors.get(key, 0) + count
    rates = result.rate_by_window(args.window)
    windows = []
    for index, rate in enumerate(rates):
        start, end = result.began + index * args.window, result.began + (index + 1) * args.window
        inside = [s for s in samples if start <= s["at"] < end]
        before = [s for s in samples if s["at"] < start]
        first, last = (before[-1] if before else inside[0] if inside else None), (inside[-1] if inside else None)
        span = (last["at"] - first["at"]) if first and last and last is not first else 0
        windows.append({
            "start_min": round(index * args.window / 60, 2),
            "reports_per_s": rate,
            "units_decided_per_s": round((last["units_done"] - first["units_done"]) / span, 1) if span else None,
            "lease_ms": round(statistics.median([s["lease_ms"] for s in inside]), 3) if inside else None,
            **({k: last[k] for k in ("hot_rows", "heap_bytes", "index_bytes", "archived", "dead_rows",
                                     "validate_backlog", "jobs_completed")} if last else {}),
        })
    full = [w for w, length in zip(windows, _lengths(result.wall_s, args.window)) if length >= 0.9 * args.window]
    ratio = round(full[-1]["reports_per_s"] / full[0]["reports_per_s"], 3) if len(full) >= 2 and full[0]["reports_per_s"] else None
    updates = samples[-1]["updates"] - samples[0]["updates"] if len(samples) > 1 else 0
    hot = samples[-1]["hot_updates"] - samples[0]["hot_updates"] if len(samples) > 1 else 0
    units = sum(r.reported for r in result.runs)
    return {
        "bench": "soak", "minutes": args.minutes, "window_s": args.window, "agents": args.agents, "batch": args.batch,
        "client": args.client, "workers": args.workers, "cores": os.cpu_count(),
        "audit_window_s": args.audit_window, "archive_after_s": args.archive_after, "archive_every_s": args.archive_every,
        "reports": units, "units_per_s": round(units / result.wall_s, 1) if result.wall_s else 0.0,
        "windows": windows, "ratio": ratio, "goal": GOAL, "meets_goal": ratio is not None and ratio >= GOAL,
        "hot_rows_max": max((s["hot_rows"] for s in samples), default=None),
        "hot_rows_last": samples[-1]["hot_rows"] if samples else None,
        "heap_bytes_max": max((s["heap_bytes"] for s in samples), default=None),
        "archived": samples[-1]["archived"] if samples else None,
        "jobs_completed": samples[-1]["jobs_completed"] if samples else None,
        "hot_update_pct": round(100 * hot / updates, 1) if updates else None,
        "autovacuums": samples[-1]["autovacuums"] - samples[0]["autovacuums"] if len(samples) > 1 else None,
        "lease": agents.latency_ms([s for r in result.runs for s in r.lease_s]),
        "report": agents.latency_ms([s for r in result.runs for s in r.report_s]),
        "agents_finished": len(result.runs), "errors": errors, "broker_messages_purged": purged,
        "samples": [{k: s[k] for k in ("at", "hot_rows", "heap_bytes", "archived", "dead_rows", "lease_ms")}
                    | {"at": round(s["at"] - result.began, 1)} for s in samples],
    }


def _lengths(wall: float, window: float) -> list[float]:
    count = max(1, -(-int(wall) // int(window)))
    return [min(window, wall - i * window) for i in range(count)]


def render(f: dict[str, Any]) -> str:
    head = ["from min", "reports/s", "decided/s", "lease ms", "hot rows", "heap MB", "indexes MB", "dead rows",
            "archived", "to validate", "jobs done"]
    mb = lambda v: f"{v / 2**20:.1f}" if v is not None else "-"  # noqa: E731
    rows = [head] + [[f"{w['start_min']:g}", f"{w['reports_per_s']:.1f}", str(w["units_decided_per_s"] or "-"),
                      str(w["lease_ms"] or "-"), str(w.get("hot_rows", "-")), mb(w.get("heap_bytes")),
                      mb(w.get("index_bytes")), str(w.get("dead_rows", "-")), str(w.get("archived", "-")),
                      str(w.get("validate_backlog", "-")), str(w.get("jobs_completed", "-"))] for w in f["windows"]]
    title = (f"soak: {f['minutes']:g} min, {f['agents']} agents (batch {f['batch']}, {f['client']}), gunicorn "
             f"{f['workers']} workers, 1 Celery worker + beat, archive {f['archive_after_s']} s after a job ends")
    verdict = (f"ratio last/first window: {f['ratio']} (goal >= {f['goal']}: {'ok' if f['meets_goal'] else 'MISS'}); "
               f"hot rows max {f['hot_rows_max']}, last {f['hot_rows_last']}; archived {f['archived']}; "
               f"HOT updates {f['hot_update_pct']}%; autovacuums {f['autovacuums']}; errors {sum(f['errors'].values())}")
    return "\n".join([title, "", dispatch.table(rows), "", verdict])


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: processes stopped, database dropped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.feeder:
        return feeder(args)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        figures = run(args)
    except (dispatch.BenchError, ClusterError) as exc:
        log(str(exc))
        print(json.dumps({"bench": "soak", "error": str(exc).splitlines()[0]}))
        return 2
    print(render(figures))
    print(json.dumps(figures, separators=(",", ":")))
    return 1 if figures["errors"] or not figures["reports"] else 0


if __name__ == "__main__":
    sys.exit(main())
