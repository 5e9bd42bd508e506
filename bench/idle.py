"""Idle agents: what N agents long-polling for work cost the server, and how fast new work reaches them.

    .venv/bin/python bench/idle.py                     # 1000 agents, 25 s waits, a 60 s idle window
    .venv/bin/python bench/idle.py --agents 3000 --workers 3
    .venv/bin/python bench/idle.py --quick             # ~15 s of load: 50 agents, 5 s waits (a check that it runs)

Creates a fresh PostgreSQL database on the server DATABASE_URL names (as bench/dispatch.py does, with its
helpers), enrols one device per agent (bench/fixtures.py), and serves the marketplace as production does:
gunicorn with uvicorn workers on marketplace.asgi, on a free loopback port. The agents are coroutines of
this process, one kept-alive HTTP/1.1 connection each over asyncio streams (a client far cheaper than
httpx's, so that the load generator leaves the cores to the server it measures): every agent asks for one unit with
`wait_seconds`, and after an empty answer asks again after its retry_after. Their first requests are
spread over one wait, so the idle rate is steady from then on.

1. Idle window (`--seconds`): no work exists. Measured: the CPU the web workers and PostgreSQL spent
   (per idle agent per minute, and per request), requests answered per second, the most database
   connections and web-server threads seen at once (sampled each second).
2. Split rounds (`--rounds`): a Django child process creates one unit (two replicas) of a running job
   through the split's own service (`units_create`, which announces the work at its commit) and notes
   the commit time; the delay to the first lease answer an agent received is measured per round.

Prints a table, then, as the last line, one JSON object of the figures. Exit status 1 when a request
failed or a round's unit reached no agent.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from bench.dispatch import (  # noqa: E402
    DEFAULT_BROKER,
    DEFAULT_SERVER,
    BenchError,
    bench_database,
    child_env,
    cpu_by_role,
    database_urls,
    fixtures,
    process_cpu,
    run_django,
    table,
)
from demo.cluster import ClusterError, Process, free_port, wait_for_health  # noqa: E402

LEASE = "/api/v1/agent/lease"
# What every bench agent can run: the bench job's units need 128 MB (bench/fixtures.py NEEDS).
CAPABILITIES = {"memory_mb": 4096, "cores": 1, "device_type": "cpu", "gpu_memory_mb": 0, "kinds": ["inference"]}


def log(message: str) -> None:
    print(f"[idle] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000, help="idle agents, one device and owner each (default 1000)")
    parser.add_argument("--wait", type=int, default=25, help="wait_seconds each lease request asks for (default 25)")
    parser.add_argument("--seconds", type=float, default=60.0, help="the idle window measured (default 60)")
    parser.add_argument("--rounds", type=int, default=5, help="split rounds, one new unit each (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers under gunicorn (default 2, for 2 cores)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER,
                        help="PostgreSQL server to create the bench database on (default DATABASE_URL, else %(default)s)")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER, help="Redis database for the server's cache (default %(default)s; nothing is enqueued)")
    parser.add_argument("--quick", action="store_true", help="a check that it runs: 50 agents, 5 s waits and window, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.wait, args.seconds, args.rounds = 50, 5, 5.0, 2
    if not 1 <= args.agents <= 10_000:
        parser.error("--agents must be between 1 and 10000")
    if not 1 <= args.wait <= 25:
        parser.error("--wait must be between 1 and 25 (the protocol's MAX_LEASE_WAIT_SECONDS)")
    if not 0 < args.seconds <= 600:
        parser.error("--seconds must be in (0, 600]")
    if not 1 <= args.rounds <= 50 or args.rounds * 2 > args.agents:
        parser.error("--rounds must be between 1 and 50, and each round takes two agents")
    if not 1 <= args.workers <= 16:
        parser.error("--workers must be between 1 and 16")
    return args


# --- the server -----------------------------------------------------------------------------------

def server_args(kind: str, port: int, workers: int) -> list[str]:
    """gunicorn serving the marketplace: `asgi` as production does (uvicorn workers), `wsgi` with sync workers."""
    app, worker = {"asgi": ("marketplace.asgi:application", "marketplace.core.asgi_worker.AsgiWorker"),
                   "wsgi": ("marketplace.wsgi:application", "sync")}[kind]
    return [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--worker-class", worker, "--log-level", "warning", "--timeout", "60", "--graceful-timeout", "5"]


@contextmanager
def web_server(env: dict[str, str], *, kind: str, workers: int, work: Path) -> Iterator[tuple[Process, str]]:
    port = free_port()
    server = Process.spawn(f"web-{kind}", server_args(kind, port, workers), env=env, log_dir=work / "var" / "logs")
    try:
        wait_for_health(f"http://127.0.0.1:{port}", [server])
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def group_threads(pgid: int) -> int:
    """Threads of every process in a process group (gunicorn's master and workers)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
            if int(raw[raw.rindex(")") + 2:].split()[2]) != pgid:
                continue
            total += int(raw[raw.rindex(")") + 2:].split()[17])
        except (OSError, ValueError, IndexError):
            continue
    return total


def db_connections(maintenance_url: str, name: str) -> tuple[int, int]:
    """(connections to the bench database, of which LISTENing), the maintenance connection excluded."""
    with psycopg.connect(maintenance_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE application_name = 'idlegrid-listen') FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()
    return int(row[0]), int(row[1])


class Sampler(threading.Thread):
    """Samples database connections and server threads each second; keeps the maxima."""

    def __init__(self, maintenance_url: str, name: str, pgid: int) -> None:
        super().__init__(daemon=True)
        self.args = (maintenance_url, name)
        self.pgid = pgid
        self.stopped = threading.Event()
        self.connections = self.listening = self.threads = 0

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                connections, listening = db_connections(*self.args)
            except psycopg.Error:
                continue
            self.connections, self.listening = max(self.connections, connections), max(self.listening, listening)
            self.threads = max(self.threads, group_threads(self.pgid))


# --- the agents -----------------------------------------------------------------------------------

@dataclass
class Fleet:
    requests: int = 0
    empty: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    leased_at: list[tuple[float, int]] = field(default_factory=list)  # (time.time(), unit id) of each lease answered
    cpu_s: float = 0.0
    stopping: bool = False  # set before the agents are cancelled: one that missed its cancellation stops too

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Connection:
    """HTTP/1.1 over one kept-alive asyncio stream: an idle agent's whole client. httpx.AsyncClient spent
    ~25 ms of CPU per request here with 1,000 connections in its pool (53 s in a 60 s window), taking the
    cores the server is measured on; this costs well under a millisecond."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> tuple[int, Any]:
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that arrives as the
            # answer does, and the agent it was meant to stop went on polling (the bench hung once in CI).
            async with asyncio.timeout(timeout):
                return await self._post(path, json.dumps(body).encode(), headers)
        except BaseException:
            self.close()  # a half-read answer leaves the stream unusable
            raise

    async def _post(self, path: str, payload: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        reused = self.streams is not None
        try:
            return await self._exchange(path, payload, headers)
        except ConnectionError:
            if not reused:
                raise
            # The server closed the kept-alive connection while it was unused (its keep-alive timeout): again,
            # on a new one.
            return await self._exchange(path, payload, headers)

    async def _exchange(self, path: str, payload: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n{head}\r\n".encode() + payload)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            self.close()
            raise ConnectionError("the server closed the connection")
        length, closing = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "connection" and "close" in value.lower():
                closing = True
        content = await reader.readexactly(length)
        if closing:
            self.close()
        return int(status_line.split()[1]), json.loads(content) if content else None

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def idle_agent(base_url: str, device: dict[str, Any], wait: int, delay: float, fleet: Fleet) -> None:
    """Ask for one unit, waiting, until one comes; then stop (the lease is held, as a computing agent would)."""
    await asyncio.sleep(delay)
    host, port = base_url.removeprefix("http://").split(":")
    connection = Connection(host, int(port))
    headers = {"Authorization": f"Device {device['device_id']}:{device['secret']}"}
    body = {"max_units": 1, "capabilities": CAPABILITIES, "wait_seconds": wait}
    failures = 0
    try:
        while not fleet.stopping:
            try:
                status, answer = await connection.post(LEASE, body, headers, timeout=wait + 30)
            except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
                fleet.error(type(exc).__name__)
                failures += 1
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            fleet.requests += 1
            if status != 200:
                fleet.error(f"HTTP {status}")
                await asyncio.sleep(1.0)
                continue
            if answer["leases"]:
                fleet.leased_at.append((time.time(), answer["leases"][0]["unit_id"]))
                return
            fleet.empty += 1
            await asyncio.sleep(answer["retry_after"])
    finally:
        connection.close()


async def drive(base_url: str, devices: list[dict[str, Any]], args: argparse.Namespace, phases: Any) -> Fleet:
    fleet = Fleet()
    cpu = time.process_time()
    rng = random.Random(0)
    tasks = [asyncio.create_task(idle_agent(base_url, device, args.wait, rng.uniform(0, args.wait), fleet))
             for device in devices]
    try:
        await phases(fleet)
    finally:
        fleet.stopping = True
        for task in tasks:
            task.cancel()
        # Bounded: an agent past its cancellation ends its request within wait + 30 s and sees `stopping`.
        ended, stuck = await asyncio.wait(tasks, timeout=args.wait + 40)
        for task in ended:  # retrieved, so asyncio does not log them as never retrieved
            if not task.cancelled() and task.exception() is not None:
                fleet.error(type(task.exception()).__name__)
        if stuck:
            raise BenchError(f"{len(stuck)} agents did not stop")
    fleet.cpu_s = time.process_time() - cpu
    return fleet


# --- the split rounds, in a Django child process ------------------------------------------------

def split_rounds(*, setup_data: dict[str, Any], rounds: int, pause: float) -> dict[str, Any]:
    """One running job; each round, one unit of it made by `units_create` (as a split makes them), committed;
    returns each round's commit time (time.time() right after the commit)."""
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from bench import fixtures as bench_fixtures
    from marketplace.jobs.kinds.inference import UnitPlan
    from marketplace.jobs.models import Job
    from marketplace.workunits.creation import units_create

    submitter = get_user_model().objects.get(username=bench_fixtures.SUBMITTER)
    model = setup_data["model"]
    label = f"{time.time_ns()}"
    spec = bench_fixtures._spec(model, rounds, hashlib.sha256(f"idle-dataset-{label}".encode()).hexdigest())
    job = Job.objects.create(owner=submitter, kind="inference", state=Job.State.RUNNING, units_total=rounds, spec=spec,
                             started_at=timezone.now())
    committed, unit_ids = [], []
    for index in range(rounds):
        time.sleep(pause)
        x = f"idle-x-{label}-{index}".encode()
        plan = UnitPlan(index=index, payload=bench_fixtures._payload(model, hashlib.sha256(x).hexdigest()), inputs=[x])
        with transaction.atomic():
            (unit_id,) = units_create(job=job, plans=[plan])  # the new units' ids
        committed.append(time.time())
        unit_ids.append(unit_id)
    return {"job_id": job.pk, "committed_at": committed, "unit_ids": unit_ids}


def first_leases(committed: list[float], unit_ids: list[int], leased_at: list[tuple[float, int]]) -> list[float | None]:
    """Per round: seconds from its commit to the first lease of its unit that an agent received (None: none
    did). The commit time is taken in the child right after COMMIT returns; a child descheduled there
    makes a delay look shorter than it was (by as long as it waited for a core)."""
    return [min((t - at for t, unit in leased_at if unit == unit_id), default=None)
            for at, unit_id in zip(committed, unit_ids)]


# --- the run --------------------------------------------------------------------------------------

def bench(args: argparse.Namespace) -> dict[str, Any]:
    name = f"idlegrid_idle_{os.getpid()}"
    maintenance, database_url = database_urls(args.database_url, name)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.agents + 1024)), hard))
    figures: dict[str, Any] = {"bench": "idle", "agents": args.agents, "wait_seconds": args.wait, "workers": args.workers,
                               "idle_window_s": args.seconds, "cores": os.cpu_count(),
                               "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    with tempfile.TemporaryDirectory(prefix="idlegrid-idle-") as tmp, bench_database(maintenance, name):
        work = Path(tmp)
        env = child_env(database_url, args.broker_url, work / "var")
        run_django(env, "manage.py", "migrate", "--noinput", "-v", "0")
        started = time.perf_counter()
        setup = fixtures(env, work, "setup", "--devices", str(args.agents))
        figures["enrol_s"] = round(time.perf_counter() - started, 1)
        (work / "setup.json").write_text(json.dumps(setup))
        # Nothing here enqueues a task (no report is made), so the broker is left as it is.
        with web_server(env, kind="asgi", workers=args.workers, work=work) as (server, base_url):
            figures.update(measure(args, env, work, server, base_url, setup, maintenance, name))
    return figures


def measure(args: argparse.Namespace, env: dict[str, str], work: Path, server: Process, base_url: str,
            setup: dict[str, Any], maintenance: str, name: str) -> dict[str, Any]:
    sampler = Sampler(maintenance, name, server.popen.pid)
    out: dict[str, Any] = {}

    async def phases(fleet: Fleet) -> None:
        await asyncio.sleep(args.wait + 1.0)  # every agent has sent its first request: the steady state
        log(f"idle window: {args.seconds:.0f} s")
        requests, cpu, began = fleet.requests, process_cpu(), time.monotonic()
        sampler.start()
        await asyncio.sleep(args.seconds)
        spent = cpu_by_role(cpu, process_cpu(), {"web": server.popen.pid})
        out["idle"] = {"wall_s": time.monotonic() - began, "requests": fleet.requests - requests, "cpu_s": spent}
        log("split rounds")
        started = time.perf_counter()
        made = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bench.idle", "split", "--setup", str(work / "setup.json"),
                             "--rounds", str(args.rounds), "--out", str(work / "split.json")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if made.returncode != 0:
            raise BenchError(f"split rounds failed:\n{made.stderr[-3000:]}")
        await asyncio.sleep(1.5)  # the last round's lease answers
        out["split"] = {**json.loads((work / "split.json").read_text()), "wall_s": time.perf_counter() - started}
        sampler.stopped.set()

    fleet = asyncio.run(drive(base_url, setup["devices"], args, phases))
    idle = out["idle"]
    minutes = idle["wall_s"] / 60
    server_s = idle["cpu_s"]["web"] + idle["cpu_s"]["postgres"] + idle["cpu_s"]["redis"]
    delays = first_leases(out["split"]["committed_at"], out["split"]["unit_ids"], fleet.leased_at)
    found = [d for d in delays if d is not None]
    return {
        "idle_requests": idle["requests"],
        "idle_requests_per_s": round(idle["requests"] / idle["wall_s"], 2),
        "idle_cpu_s": {role: round(seconds, 3) for role, seconds in idle["cpu_s"].items()},
        "server_cpu_ms_per_agent_minute": round(1000 * server_s / args.agents / minutes, 3),
        "web_cpu_ms_per_agent_minute": round(1000 * idle["cpu_s"]["web"] / args.agents / minutes, 3),
        "server_cpu_ms_per_request": round(1000 * server_s / max(1, idle["requests"]), 3),
        "server_busy_pct_of_one_core": round(100 * server_s / idle["wall_s"], 1),
        "db_connections_max": sampler.connections,
        "db_listen_connections": sampler.listening,
        "server_threads_max": sampler.threads,
        "first_lease_ms": [round(1000 * d, 1) if d is not None else None for d in delays],
        "first_lease_ms_max": round(1000 * max(found), 1) if found else None,
        "rounds_missed": len(delays) - len(found),
        "leases_answered": len(fleet.leased_at),
        "requests": fleet.requests,
        "errors": fleet.errors,
        "load_generator_cpu_s": round(fleet.cpu_s, 2),
    }


def render(f: dict[str, Any]) -> str:
    title = (f"idle: {f['agents']} agents long-polling (wait {f['wait_seconds']} s), gunicorn + {f['workers']} uvicorn "
             f"workers, PostgreSQL; idle window {f['idle_window_s']:.0f} s")
    cpu = f["idle_cpu_s"]
    rows = [
        ["figure", "value"],
        ["requests/s while idle", f"{f['idle_requests_per_s']}"],
        ["server CPU per idle agent per minute", f"{f['server_cpu_ms_per_agent_minute']} ms"],
        ["  of which web workers", f"{f['web_cpu_ms_per_agent_minute']} ms"],
        ["server CPU per request", f"{f['server_cpu_ms_per_request']} ms"],
        ["server CPU while idle", f"{f['server_busy_pct_of_one_core']}% of a core (web {cpu['web']:.2f} s, "
                                  f"PostgreSQL {cpu['postgres']:.2f} s)"],
        ["database connections (most at once)", f"{f['db_connections_max']} ({f['db_listen_connections']} LISTEN)"],
        ["web server threads (most at once)", str(f["server_threads_max"])],
        ["commit -> first lease, per round", ", ".join("-" if d is None else f"{d:.0f} ms" for d in f["first_lease_ms"])],
        ["errors", str(sum(f["errors"].values()))],
    ]
    return "\n".join([title, "", table(rows)])


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: server stopped, database dropped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["split"]:
        return _split_main(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        figures = bench(args)
    except (BenchError, ClusterError, subprocess.TimeoutExpired) as exc:
        log(str(exc))
        print(json.dumps({"bench": "idle", "error": str(exc).splitlines()[0]}))
        return 2
    print(render(figures))
    print(json.dumps(figures, separators=(",", ":")))
    return 1 if figures["errors"] or figures["rounds_missed"] else 0


def _split_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle split")
    parser.add_argument("--setup", type=Path, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--pause", type=float, default=2.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    import django

    django.setup()
    result = split_rounds(setup_data=json.loads(args.setup.read_text()), rounds=args.rounds, pause=args.pause)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
