"""Lease + report throughput through the real HTTP stack: gunicorn (uvicorn workers, as production) + Django + PostgreSQL + Redis,
beside the same database's bare-SQL limit (bench/sql_limit.py), measured in the same run.

    .venv/bin/python bench/dispatch.py                      # 64 agents, single then batched (50), 30 s / 20k units each
    .venv/bin/python bench/dispatch.py --quick              # ~40 s: 2 agents, 200 units (a check that it runs)
    .venv/bin/python bench/dispatch.py --agents 16 --batch 20 --seconds 60 --client httpx

Creates a fresh PostgreSQL database on the server DATABASE_URL names (its own database name is only used
to connect for CREATE/DROP DATABASE) and drops it at the end; runs gunicorn on a free loopback port per
scenario and stops it by process group, always. No Celery worker runs unless --celery: reports still
enqueue `validate_unit` on the broker as production does, and the bench purges that queue at the end.
After each scenario the same agents (one process and connection each) run the marketplace's own lease
statement and a minimal report as bare SQL on a fresh job of the same size: the ratio of the two rates says
how far the server is from what the database alone allows. The single scenario leases and reports one unit
per request (the output uploaded once, at setup); the batched one leases --batch units and reports them in
one POST /agent/reports with every unit's own output inline, as the agent does (the bare-SQL run stores no
outputs, so the batched ratio understates the server). Prints a table, then, as the last line, one
JSON object of the figures. Exit status 1 when any request failed or a scenario reported nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from bench import agents, sql_limit  # noqa: E402
from demo.cluster import ClusterError, Process, free_port, wait_for_health  # noqa: E402

DEFAULT_SERVER = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER = "redis://127.0.0.1:6379/15"
TARGETS = {"single": 800, "batched": 5000}  # units/s wanted on the 2-core machine (issue 14; see README)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# asgi: as production and the demo serve it (the lease's long poll needs an event loop); wsgi: sync workers.
SERVERS = {"asgi": ["marketplace.asgi:application", "--worker-class", "marketplace.core.asgi_worker.AsgiWorker"],
           "wsgi": ["marketplace.wsgi:application", "--worker-class", "sync"]}
PG_COUNTERS = ("sessions", "xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "tup_inserted", "tup_updated", "blks_read", "blks_hit")


def log(message: str) -> None:
    print(f"[dispatch] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# --- configuration --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    name: str
    batch: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=64, help="simulated agents, one device and owner each (default 64, the issue's p99 load)")
    parser.add_argument("--units", type=int, default=20_000, help="replicas to lease and report per scenario, at most (default 20000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="time bound per scenario (default 30)")
    parser.add_argument("--batch", type=int, default=50, help="max_units per lease in the batched scenario (default 50)")
    parser.add_argument("--workers", type=int, default=3, help="gunicorn workers per node (default 3, for 2 cores)")
    parser.add_argument("--load", choices=agents.LOADS, default="processes", help="agents as threads of one process or one process each (default processes: see README)")
    parser.add_argument("--client", choices=agents.CLIENTS, default="stdlib", help="the agents' HTTP client: the cheap stdlib http.client (default: the load generator shares the 2 cores), or httpx, as the real agent")
    parser.add_argument("--scenarios", default="single,batched", help="comma-separated: single, batched (default both)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER, help="PostgreSQL server to create the bench database on (default DATABASE_URL, else %(default)s)")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER, help="Redis database dedicated to the bench; its celery queue is purged at the end (default %(default)s)")
    parser.add_argument("--celery", action="store_true", help="also run one Celery worker (validation) during the scenarios")
    parser.add_argument("--server", choices=tuple(SERVERS), default="asgi",
                        help="asgi: gunicorn with uvicorn workers, as production (default); wsgi: sync workers")
    parser.add_argument("--nodes", type=int, default=1, help="web nodes (gunicorn servers, --workers each) on the one "
                                                             "database and Redis; agents spread over them (default 1)")
    parser.add_argument("--storage", choices=("filesystem", "s3"), default=None,
                        help="artifact storage: s3 is a local S3-compatible server (moto) shared by the nodes "
                             "(default: filesystem for one node, s3 for several)")
    parser.add_argument("--no-queries", dest="queries", action="store_false", help="skip the in-process SQL count per request")
    parser.add_argument("--no-sql-limit", dest="sql_limit", action="store_false",
                        help="skip the bare-SQL lease + report run (bench/sql_limit.py) that each scenario is compared with")
    parser.add_argument("--quick", action="store_true", help="tiny run for tests: 2 agents, 200 units, 10 s bound, 2 workers")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.units, args.seconds, args.workers, args.batch = 2, 200, 10.0, 2, 5
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = set(names) - set(TARGETS)
    if unknown or not names:
        parser.error(f"--scenarios must name some of {', '.join(TARGETS)}")
    args.storage = args.storage or ("s3" if args.nodes > 1 else "filesystem")
    if args.nodes > 1 and args.storage != "s3":
        parser.error("several --nodes need shared artifact storage: --storage s3")
    for name in ("agents", "units", "workers", "batch", "nodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 1 <= args.batch <= 64:
        parser.error("--batch must be between 1 and 64 (the protocol's MAX_LEASE_BATCH)")
    if not 0 < args.seconds <= 600:
        parser.error("--seconds must be in (0, 600]")
    args.scenario_list = [Scenario(n, 1 if n == "single" else args.batch) for n in names]
    return args


def database_urls(server_url: str, name: str) -> tuple[str, str]:
    """(maintenance URL, bench database URL) on the same server."""
    parts = urlsplit(server_url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise BenchError(f"the bench needs PostgreSQL; DATABASE_URL selects {parts.scheme!r}")
    maintenance = parts if parts.path.strip("/") else parts._replace(path="/postgres")
    return urlunsplit(maintenance), urlunsplit(parts._replace(path=f"/{name}"))


def child_env(database_url: str, broker_url: str, var_dir: Path) -> dict[str, str]:
    """The server's environment: the caller's, less anything that would point it at another database or broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDLEGRID_", "CELERY_", "DATABASE_URL", "DJANGO_"))}
    env.update({
        "DJANGO_SETTINGS_MODULE": "marketplace.settings",
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "IDLEGRID_VAR_DIR": str(var_dir),
        # Each simulated agent leases and reports far faster than a real device may (report: 1200/minute by
        # default); the throttles still run and cost what they cost, at rates no agent here reaches.
        "IDLEGRID_THROTTLE_SCALE": "1000",
        "DEBUG": "false",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })
    return env


# --- database, subprocesses and servers -----------------------------------------------------------

@contextmanager
def bench_database(maintenance_url: str, name: str) -> Iterator[None]:
    with psycopg.connect(maintenance_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield
    finally:
        with psycopg.connect(maintenance_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        log(f"dropped database {name}")


def run_django(env: dict[str, str], *argv: str, timeout: float = 600) -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    log(f"{' '.join(argv[:3])}: {time.perf_counter() - started:.1f} s")


def fixtures(env: dict[str, str], work: Path, command: str, *argv: str) -> dict[str, Any]:
    out = work / f"{command}.json"
    run_django(env, "-m", "bench.fixtures", command, *argv, "--out", str(out))
    return json.loads(out.read_text())


@contextmanager
def gunicorn(env: dict[str, str], workers: int, work: Path, server: str = "asgi") -> Iterator[tuple[Process, str]]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = Process.spawn(
        "gunicorn",
        [sys.executable, "-m", "gunicorn", *SERVERS[server], "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), "--log-level", "warning", "--timeout", "60", "--graceful-timeout", "10"],
        env=env, log_dir=work / "var" / "logs",
    )
    try:
        wait_for_health(base_url, [server])
        yield server, base_url
    finally:
        server.stop()


@contextmanager
def s3_server(work: Path) -> Iterator[dict[str, str]]:
    """A local S3-compatible server (moto, as the storage tests use) with one bucket: the artifact store the
    web nodes share, as production's object store. Yields the settings' environment for it."""
    import boto3

    port = free_port()
    server = Process.spawn("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                           env=dict(os.environ), log_dir=work / "var" / "logs")
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                import httpx

                if httpx.get(endpoint, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not server.alive():
                raise BenchError("moto's S3 server did not start")
            time.sleep(0.2)
        keys = {"IDLEGRID_S3_ACCESS_KEY_ID": "bench", "IDLEGRID_S3_SECRET_ACCESS_KEY": "bench-secret"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench-secret").create_bucket(Bucket="idlegrid-bench")
        yield {"IDLEGRID_STORAGE": "s3", "IDLEGRID_S3_BUCKET": "idlegrid-bench", "IDLEGRID_S3_ENDPOINT_URL": endpoint,
               "IDLEGRID_S3_REGION": "us-east-1", "IDLEGRID_S3_ADDRESSING_STYLE": "path", **keys}
    finally:
        server.stop()


@contextmanager
def celery_worker(env: dict[str, str], enabled: bool, work: Path) -> Iterator[Process | None]:
    if not enabled:
        yield None
        return
    worker = Process.spawn(
        "celery",
        [sys.executable, "-m", "celery", "-A", "marketplace", "worker", "--concurrency", "1",
         "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
        env=env, log_dir=work / "var" / "logs",
    )
    try:
        yield worker
    finally:
        worker.stop()


def purge_broker(broker_url: str) -> int:
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        queued = client.llen("celery")
        client.delete("celery")
        return int(queued)
    finally:
        client.close()


# --- what the machine spent -----------------------------------------------------------------------

def process_cpu() -> dict[int, tuple[str, int, float]]:
    """pid -> (command, process group, CPU seconds) for every process visible in /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm, fields = raw[raw.index("(") + 1 : raw.rindex(")")], raw[raw.rindex(")") + 2 :].split()
        table[int(entry.name)] = (comm, int(fields[2]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return table


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def cpu_by_role(before: dict, after: dict, groups: dict[str, list[int] | int]) -> dict[str, float]:
    """CPU seconds spent in the window by gunicorn (and celery) process groups, PostgreSQL, Redis, and the rest
    of the machine (other people's work on it shows here)."""
    own = os.getpgid(0)  # the bench and its agent processes: measured by the load generator itself
    spent = {role: 0.0 for role in [*groups, "postgres", "redis", "other"]}
    for pid, (comm, pgid, seconds) in after.items():
        if pgid == own:
            continue
        delta = seconds - (before[pid][2] if pid in before and before[pid][0] == comm else 0.0)
        role = next((r for r, g in groups.items() if pgid in (g if isinstance(g, list) else [g])), None)
        if role is None:
            role = "postgres" if comm.startswith("postgres") else "redis" if comm.startswith("redis") else "other"
        spent[role] += delta
    return spent


def pg_counters(maintenance_url: str, name: str) -> dict[str, int]:
    with psycopg.connect(maintenance_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(f"SELECT {', '.join(PG_COUNTERS)} FROM pg_stat_database WHERE datname = %s", (name,)).fetchone()
        wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()[0]
    return {**dict(zip(PG_COUNTERS, row)), "wal_bytes": int(wal)}


def wait_disconnected(maintenance_url: str, name: str, timeout: float = 10) -> None:
    """A backend flushes its statistics as it exits; wait for the server's backends to go."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(maintenance_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            count = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()[0]
            if not count:
                return
            time.sleep(0.1)


def redis_calls(broker_url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


# --- one scenario ---------------------------------------------------------------------------------

def run_scenario(args: argparse.Namespace, scenario: Scenario, ctx: dict[str, Any]) -> dict[str, Any]:
    env, work, setup = ctx["env"], ctx["work"], ctx["setup"]
    # Enough replicas for the unit bound, plus the batch each agent may hold when it stops.
    created = fixtures(env, work, "job", "--setup", str(work / "setup.json"),
                       "--replicas", str(args.units + 2 * args.agents * scenario.batch))
    log(f"{scenario.name}: job {created['job_id']}, {created['replicas']} unsent replicas")
    with ExitStack() as stack:
        nodes = [stack.enter_context(gunicorn(env, args.workers, work, args.server)) for _ in range(args.nodes)]
        groups: dict[str, list[int]] = {"gunicorn": [server.popen.pid for server, _ in nodes]}  # process groups
        if ctx["celery"] is not None:
            groups["celery"] = [ctx["celery"].popen.pid]
        pg_before, redis_before = pg_counters(ctx["maint"], ctx["db"]), redis_calls(args.broker_url)
        cpu_before, machine_before = process_cpu(), machine_cpu()
        # Device i talks to node i mod N, as a load balancer would spread them.
        devices = [{**device, "base_url": nodes[i % len(nodes)][1]} for i, device in enumerate(setup["devices"])]
        result = agents.run_agents(
            load=args.load, devices=devices, units=args.units, seconds=args.seconds,
            plan_args={"base_url": nodes[0][1], "batch": scenario.batch, "output_sha256": setup["output_sha256"],
                       "client": args.client, "output_b64": setup["output_b64"],
                       # The batched scenario reports as the agent does: a lease's units in one request, inline.
                       "reports": "single" if scenario.name == "single" else "batched"},
        )
        cpu_after, machine_after = process_cpu(), machine_cpu()
    wait_disconnected(ctx["maint"], ctx["db"])
    pg_after, redis_after = pg_counters(ctx["maint"], ctx["db"]), redis_calls(args.broker_url)
    cpu = cpu_by_role(cpu_before, cpu_after, groups)
    cpu["load generator"] = result.load_cpu_s
    busy = (machine_after[0] - machine_before[0]) / max(1, machine_after[1] - machine_before[1])
    figures = summarise(scenario, args, result, cpu, busy, diff(pg_before, pg_after), diff(redis_before, redis_after))
    if args.sql_limit:
        # The same database, a fresh job of the same size, the same agents and batch: bare SQL, no server.
        fixtures(env, work, "job", "--setup", str(work / "setup.json"),
                 "--replicas", str(args.units + 2 * args.agents * scenario.batch))
        limit = sql_limit.run_sql_limit(
            database_url=ctx["database_url"], devices=setup["devices"], statements=ctx["statements"],
            batch=scenario.batch, output=setup["output_sha256"], units=args.units, seconds=args.seconds)
        figures["sql_limit"] = limit
        figures["ratio_to_sql_limit"] = round(figures["units_per_s"] / limit["units_per_s"], 3) if limit["units_per_s"] else None
        log(f"{scenario.name}: bare SQL {limit['units_per_s']} units/s")
    return figures


def diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def summarise(scenario: Scenario, args: argparse.Namespace, result: agents.LoadResult, cpu: dict[str, float],
              busy: float, pg: dict[str, int], redis_delta: dict[str, int]) -> dict[str, Any]:
    units = sum(r.reported for r in result.runs)
    errors: dict[str, int] = {}
    for run in result.runs:
        for key, count in run.errors.items():
            errors[key] = errors.get(key, 0) + count
    per_unit = max(units, 1)
    rate = units / result.wall_s if result.wall_s > 0 else 0.0
    server_ms = sum(cpu.get(role, 0.0) for role in ("gunicorn", "celery", "postgres", "redis")) * 1000 / per_unit
    return {
        "batch": scenario.batch,
        "reports": "single" if scenario.name == "single" else "batched, outputs inline",
        "units": units,
        "wall_s": round(result.wall_s, 2),
        "units_per_s": round(rate, 1),
        "target_units_per_s": TARGETS[scenario.name],
        "meets_target": rate >= TARGETS[scenario.name],
        "units_per_s_by_5s": result.rate_by_window(5.0),
        "lease": agents.latency_ms([s for r in result.runs for s in r.lease_s]),
        "report": agents.latency_ms([s for r in result.runs for s in r.report_s]),
        "agents_finished": len(result.runs),
        "empty_leases": sum(r.empty_leases for r in result.runs),
        "errors": errors,
        "machine_busy_pct": round(100 * busy, 1),
        # What the server side alone would reach with every core to itself: a figure that other load on
        # the machine (the load generator, other people's processes) disturbs much less than units/s.
        "server_cpu_ms_per_unit": round(server_ms, 3),
        "server_ceiling_units_per_s": round((os.cpu_count() or 1) * 1000 / server_ms) if server_ms else None,
        "cpu_ms_per_unit": {role: round(1000 * s / per_unit, 3) for role, s in cpu.items()},
        "db_per_unit": {k: round(v / per_unit, 2) for k, v in pg.items()},
        "redis_calls_per_unit": {k: round(v / per_unit, 2) for k, v in sorted(redis_delta.items(), key=lambda kv: -kv[1])[:6]},
    }


def count_queries(args: argparse.Namespace, env: dict[str, str], work: Path) -> dict[str, Any]:
    """The in-process check; its failure is reported, not fatal: the throughput figures stand without it."""
    try:
        return fixtures(env, work, "queries", "--setup", str(work / "setup.json"),
                        "--batch", str(args.batch), "--timed", str(20 if args.quick else 200))
    except (BenchError, subprocess.TimeoutExpired) as exc:
        log(f"query count failed: {exc}")
        return {"error": str(exc).splitlines()[0]}


# --- output ---------------------------------------------------------------------------------------

def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(figures: dict[str, Any]) -> str:
    scenarios = figures["scenarios"]
    head = ["scenario", "batch", "units", "wall s", "units/s", "target", "bare SQL/s", "ratio", "lease p50",
            "lease p99", "report p50", "report p99", "errors"]
    rows = [head] + [
        [name, str(s["batch"]), str(s["units"]), f"{s['wall_s']:.1f}", f"{s['units_per_s']:.0f}",
         f"{s['target_units_per_s']} {'ok' if s['meets_target'] else 'MISS'}",
         f"{s['sql_limit']['units_per_s']:.0f}" if "sql_limit" in s else "-",
         f"{s['ratio_to_sql_limit']:.2f}" if s.get("ratio_to_sql_limit") is not None else "-",
         *(f"{s[k][p]} ms" if s[k][p] is not None else "-" for k in ("lease", "report") for p in ("p50_ms", "p99_ms")),
         str(sum(s["errors"].values()))]
        for name, s in scenarios.items()
    ]
    roles = list(next(iter(scenarios.values()))["cpu_ms_per_unit"])
    cost_head = ["CPU per unit", *[f"{r} ms" for r in roles], "busy %", "server ceiling/s", "commits", "rows upd",
                 "WAL B", "redis calls"]
    cost = [cost_head] + [
        [name, *(f"{s['cpu_ms_per_unit'][r]:.2f}" for r in roles), f"{s['machine_busy_pct']:.0f}",
         str(s["server_ceiling_units_per_s"]),
         f"{s['db_per_unit'].get('xact_commit', 0):.1f}", f"{s['db_per_unit'].get('tup_updated', 0):.1f}",
         f"{s['db_per_unit'].get('wal_bytes', 0):.0f}", f"{sum(s['redis_calls_per_unit'].values()):.1f}"]
        for name, s in scenarios.items()
    ]
    title = (f"dispatch: {figures['agents']} agents ({figures['load']}, {figures['client']}), "
             f"{figures['nodes']} node(s) of gunicorn {figures['workers']} {figures['server']} workers, {figures['storage']} storage, "
             f"PostgreSQL + Redis, bound {figures['units']} units or {figures['seconds']:.0f} s per scenario")
    parts = [title, "", table(rows), "", table(cost)]
    if figures.get("queries", {}).get("error"):
        parts += ["", f"SQL statements per request: not counted ({figures['queries']['error']})"]
    elif figures.get("queries"):
        q = figures["queries"]
        parts += ["", "SQL statements per request (Django-counted; + 1 unlogged `SELECT 1` health check each):"]
        parts += [f"  {k}: {v['queries']}" for k, v in q.items() if isinstance(v, dict) and "queries" in v]
        t = q["in_process_ms"]
        parts += [f"  in process, no HTTP: lease {t['lease_ms']} ms ({t['lease_cpu_ms']} ms CPU in Django), "
                  f"report {t['report_ms']} ms ({t['report_cpu_ms']} ms CPU in Django)"]
    return "\n".join(parts)


# --- main -----------------------------------------------------------------------------------------

def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: servers stopped, database dropped


def bench(args: argparse.Namespace) -> dict[str, Any]:
    name = f"idlegrid_bench_{os.getpid()}"
    maintenance, database_url = database_urls(args.database_url, name)
    figures: dict[str, Any] = {
        "bench": "dispatch", "agents": args.agents, "load": args.load, "client": args.client, "workers": args.workers,
        "nodes": args.nodes, "storage": args.storage, "server": args.server,
        "units": args.units, "seconds": args.seconds, "cores": os.cpu_count(),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="idlegrid-bench-") as tmp, bench_database(maintenance, name), \
            ExitStack() as services:
        work = Path(tmp)
        env = child_env(database_url, args.broker_url, work / "var")
        if args.storage == "s3":
            env.update(services.enter_context(s3_server(work)))
        run_django(env, "manage.py", "migrate", "--noinput", "-v", "0")
        setup = fixtures(env, work, "setup", "--devices", str(args.agents))
        (work / "setup.json").write_text(json.dumps(setup))
        try:
            with celery_worker(env, args.celery, work) as worker:
                ctx = {"env": env, "work": work, "setup": setup, "maint": maintenance, "db": name, "celery": worker,
                       "database_url": database_url, "statements": fixtures(env, work, "sql")}
                for scenario in args.scenario_list:
                    figures["scenarios"][scenario.name] = run_scenario(args, scenario, ctx)
                    log(f"{scenario.name}: {figures['scenarios'][scenario.name]['units_per_s']} units/s")
            if args.queries:
                figures["queries"] = count_queries(args, env, work)
        finally:
            figures["broker_messages_purged"] = purge_broker(args.broker_url)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        figures = bench(args)
    except (BenchError, ClusterError) as exc:  # ClusterError: gunicorn did not start
        log(str(exc))
        print(json.dumps({"bench": "dispatch", "error": str(exc).splitlines()[0]}))
        return 2
    print(render(figures))
    print(json.dumps(figures, separators=(",", ":")))
    failed = any(s["errors"] or not s["units"] for s in figures["scenarios"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
