"""What serving the sync DRF views under ASGI costs: gunicorn sync workers (marketplace.wsgi) against gunicorn
with uvicorn workers (marketplace.asgi), the same number of workers, on the same fresh PostgreSQL database.

    .venv/bin/python bench/asgi_cost.py                  # 3 workers each, 15 s per measurement
    .venv/bin/python bench/asgi_cost.py --quick          # 5 s per measurement (a check that it runs)

Three measurements per server, each with `--clients` load processes (stdlib http.client, a connection per
request, as bench/agents.py's cheap client): GET /healthz (a plain Django view), GET /api/v1/agent/keys (a
DRF view with device authentication), and the dispatch bench's lease + report cycle (bench/agents.py, one
unit per lease). Printed per measurement: requests (or units) per second and the server's CPU (web
workers + PostgreSQL) per request. Then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import agents  # noqa: E402
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
    purge_broker,
    run_django,
    table,
)
from bench.idle import web_server  # noqa: E402
from demo.cluster import ClusterError  # noqa: E402


def _get_loop(url: str, path: str, headers: dict[str, str], deadline: float, out: Any) -> None:
    host, port = url.removeprefix("http://").split(":")
    done = failed = 0
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            done, failed = (done + 1, failed) if response.status == 200 else (done, failed + 1)
        except (OSError, http.client.HTTPException):
            failed += 1
        finally:
            conn.close()
    out.put((done, failed))


def get_load(url: str, path: str, headers: dict[str, str], *, clients: int, seconds: float) -> tuple[int, int, float]:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    workers = [ctx.Process(target=_get_loop, args=(url, path, headers, deadline, out)) for _ in range(clients)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=seconds + 60) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(r[0] for r in results), sum(r[1] for r in results), time.monotonic() - started


def measured(server_pgid: int, run: Any) -> dict[str, Any]:
    before = process_cpu()
    count, failed, wall = run()
    cpu = cpu_by_role(before, process_cpu(), {"web": server_pgid})
    server_s = cpu["web"] + cpu["postgres"] + cpu["redis"]
    return {"count": count, "failed": failed, "per_s": round(count / wall, 1),
            "web_cpu_ms": round(1000 * cpu["web"] / max(count, 1), 3),
            "server_cpu_ms": round(1000 * server_s / max(count, 1), 3)}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    name = f"idlegrid_asgicost_{os.getpid()}"
    maintenance, database_url = database_urls(args.database_url, name)
    figures: dict[str, Any] = {"bench": "asgi_cost", "workers": args.workers, "clients": args.clients,
                               "seconds": args.seconds, "cores": os.cpu_count(),
                               "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "servers": {}}
    with tempfile.TemporaryDirectory(prefix="idlegrid-asgicost-") as tmp, bench_database(maintenance, name):
        work = Path(tmp)
        env = child_env(database_url, args.broker_url, work / "var")
        run_django(env, "manage.py", "migrate", "--noinput", "-v", "0")
        setup = fixtures(env, work, "setup", "--devices", str(args.clients))
        (work / "setup.json").write_text(json.dumps(setup))
        device = setup["devices"][0]
        auth = {"Authorization": f"Device {device['device_id']}:{device['secret']}"}
        try:
            for kind in ("wsgi", "asgi"):
                fixtures(env, work, "job", "--setup", str(work / "setup.json"), "--replicas", str(args.units + 64))
                with web_server(env, kind=kind, workers=args.workers, work=work) as (server, url):
                    pgid = server.popen.pid
                    get_load(url, "/healthz", {}, clients=args.clients, seconds=1.0)  # warm every worker
                    row = {
                        "healthz": measured(pgid, lambda url=url: get_load(url, "/healthz", {}, clients=args.clients,
                                                                           seconds=args.seconds)),
                        "agent_keys": measured(pgid, lambda url=url: get_load(url, "/api/v1/agent/keys", auth,
                                                                              clients=args.clients, seconds=args.seconds)),
                        "lease_report": measured(pgid, lambda url=url: _cycles(url, setup, args)),
                    }
                figures["servers"][kind] = row
        finally:
            purge_broker(args.broker_url)
    return figures


def _cycles(url: str, setup: dict[str, Any], args: argparse.Namespace) -> tuple[int, int, float]:
    result = agents.run_agents(load="processes", devices=setup["devices"], units=args.units, seconds=args.seconds,
                               plan_args={"base_url": url, "batch": 1, "output_sha256": setup["output_sha256"],
                                          "client": "stdlib"})
    units = sum(run.reported for run in result.runs)
    errors: dict[str, int] = {}
    for run in result.runs:
        for key, count in run.errors.items():
            errors[key] = errors.get(key, 0) + count
    if errors:
        print(f"[asgi_cost] lease_report errors: {errors}", file=sys.stderr, flush=True)
    return units, sum(errors.values()), result.wall_s


def render(figures: dict[str, Any]) -> str:
    rows = [["measurement", "server", "per s", "web CPU ms", "server CPU ms", "failed"]]
    for what in ("healthz", "agent_keys", "lease_report"):
        for kind, row in figures["servers"].items():
            m = row[what]
            rows.append([what, kind, f"{m['per_s']:.0f}", f"{m['web_cpu_ms']:.2f}", f"{m['server_cpu_ms']:.2f}",
                         str(m["failed"])])
    title = (f"asgi_cost: gunicorn {figures['workers']} sync workers (wsgi) vs {figures['workers']} uvicorn workers "
             f"(asgi), {figures['clients']} load processes, {figures['seconds']:.0f} s each; per request (lease_report: per unit)")
    return "\n".join([title, "", table(rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3, help="web workers of each server (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="load processes, one device each (default 8)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement (default 15)")
    parser.add_argument("--units", type=int, default=20_000, help="lease + report cycles at most (default 20000)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER)
    parser.add_argument("--quick", action="store_true", help="5 s per measurement, 2 workers, 4 clients")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.workers, args.clients = 5.0, 2, 4
    if not (1 <= args.workers <= 16 and 1 <= args.clients <= 64 and 0 < args.seconds <= 300 and args.units >= 1):
        parser.error("--workers 1..16, --clients 1..64, --seconds (0, 300], --units >= 1")
    try:
        figures = bench(args)
    except (BenchError, ClusterError) as exc:
        print(json.dumps({"bench": "asgi_cost", "error": str(exc).splitlines()[0]}))
        return 2
    print(render(figures))
    print(json.dumps(figures, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
