"""What one report costs the server, in process: SQL statements and milliseconds per report, single and batched.

    .venv/bin/python bench/report_cost.py                    # 200 single reports, 10 batches of 50
    .venv/bin/python bench/report_cost.py --quick            # a check that it runs: 20 single, 2 batches of 10
    .venv/bin/python bench/report_cost.py --profile          # and the cProfile of the single reports (top 25)

No HTTP and no load generator: the real URLconf, middleware, authentication and throttles through Django's
test client, on PostgreSQL (a fresh database on the server `--database-url` names, dropped at the end, as
bench/dispatch.py does) and Redis (`--broker-url`: reports enqueue validation there; the queue is purged at the
end). Statements are counted with CaptureQueriesContext (Django's count: a connection's `SELECT 1` health
check is not among them). Each single report names its own output, uploaded through the upload endpoint
first (untimed); each batched item carries its output inline (`output`, base64), as an agent may send
outputs of at most 64 KiB. Prints a table, then, as the last line, one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.dispatch import (  # noqa: E402
    DEFAULT_BROKER,
    DEFAULT_SERVER,
    bench_database,
    child_env,
    database_urls,
    purge_broker,
    run_django,
)

ROWS, COLUMNS = 128, 10  # the dispatch bench's unit output: y float32 [128, 10], 5 KiB


def log(message: str) -> None:
    print(f"[report_cost] {message}", file=sys.stderr, flush=True)


# --- inside Django ------------------------------------------------------------------------------

def _outputs(count: int, seed: int) -> list[bytes]:
    import numpy as np

    from marketplace.core.tensors import array_file_bytes

    rng = np.random.default_rng(seed)
    return [array_file_bytes(rng.standard_normal((ROWS, COLUMNS)).astype(np.float32), name="y") for _ in range(count)]


def _sql(captured: Any) -> list[str]:
    return [" ".join(q["sql"].split())[:200] for q in captured.captured_queries]


def _profile_text(profiler: cProfile.Profile, function: str) -> str:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
    stats.print_callees(function)
    stats.sort_stats("tottime").print_stats(15)
    return text.getvalue()


class _Timer:
    """Wall and CPU time of what runs inside `with timer:`, summed; cProfiled as well when given a profiler."""

    def __init__(self, profiler: cProfile.Profile | None) -> None:
        self.wall = self.cpu = 0.0
        self.profiler = profiler

    def __enter__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        if self.profiler:
            self.profiler.enable()

    def __exit__(self, *exc: object) -> None:
        if self.profiler:
            self.profiler.disable()
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


class _Device:
    """The bench's one device, driving the real endpoints through the test client."""

    def __init__(self, device: dict[str, Any]) -> None:
        from django.test import Client

        from bench import fixtures

        self.device_id = device["device_id"]
        self.key = fixtures._key(device["seed"])
        self.client = Client(HTTP_AUTHORIZATION=f"Device {device['device_id']}:{device['secret']}")

    def post(self, path: str, body: Any) -> Any:
        return self.client.post(path, body, content_type="application/json")

    def lease(self, units: int) -> list[dict[str, Any]]:
        response = self.post("/api/v1/agent/lease", {"max_units": units})
        assert response.status_code == 200, response.content
        return response.json()["leases"]

    def upload(self, data: bytes) -> str:
        from worker_agent import protocol

        sha = protocol.sha256_hex(data)
        response = self.client.post("/api/v1/artifacts/", data, content_type="application/octet-stream",
                                    HTTP_X_CONTENT_SHA256=sha)
        assert response.status_code in (200, 201), response.content
        return sha

    def signed(self, lease: dict[str, Any], sha: str) -> str:
        from worker_agent import signing

        return signing.sign_result(self.key, result_id=lease["result_id"], unit_id=lease["unit_id"],
                                   device_id=self.device_id, output_sha256=sha)

    def report(self, lease: dict[str, Any], sha: str) -> None:
        response = self.post(f"/api/v1/agent/results/{lease['result_id']}/report",
                             {"output_sha256": sha, "signature": self.signed(lease, sha), "elapsed_seconds": 0.1})
        assert response.status_code == 200, response.content

    def batch_item(self, lease: dict[str, Any], data: bytes) -> dict[str, Any]:
        from worker_agent import protocol

        sha = protocol.sha256_hex(data)
        return {"result_id": lease["result_id"], "output_sha256": sha, "signature": self.signed(lease, sha),
                "elapsed_seconds": 0.1, "output": protocol.b64encode(data)}


def _singles(agent: _Device, outputs: Any, count: int, profile: bool) -> dict[str, Any]:
    """Single reports, each of an output uploaded first (untimed)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    agent.report(agent.lease(1)[0], agent.upload(next(outputs)))  # warm: imports, URL resolver, the broker
    (first,) = agent.lease(1)
    sha = agent.upload(next(outputs))
    with CaptureQueriesContext(connection) as captured:
        agent.report(first, sha)
    # Read now: the next request's request_started signal clears the connection's query log it slices.
    statements, sql = len(captured), _sql(captured)
    timer = _Timer(cProfile.Profile() if profile else None)
    for _ in range(count):
        (lease,) = agent.lease(1)
        sha = agent.upload(next(outputs))
        with timer:
            agent.report(lease, sha)
    figures = {"statements": statements, "sql": sql, "reports": count,
               "ms_per_report": round(1000 * timer.wall / count, 3), "cpu_ms_per_report": round(1000 * timer.cpu / count, 3)}
    if timer.profiler:
        figures["profile"] = _profile_text(timer.profiler, "result_report")
    return figures


def _batches(agent: _Device, outputs: Any, batches: int, batch: int, profile: bool) -> dict[str, Any]:
    """Batched reports, every output inline."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    if agent.post("/api/v1/agent/reports", {"reports": []}).status_code == 404:  # a commit without the endpoint
        return {"skipped": "POST /api/v1/agent/reports answers 404 here"}
    timer = _Timer(cProfile.Profile() if profile else None)
    counted: dict[str, Any] = {}
    for _ in range(batches):
        leases = agent.lease(batch)
        assert len(leases) == batch, len(leases)
        items = [agent.batch_item(lease, next(outputs)) for lease in leases]
        with timer, CaptureQueriesContext(connection) as captured:
            response = agent.post("/api/v1/agent/reports", {"reports": items})
        assert response.status_code == 200, response.content
        assert [item.get("state") for item in response.json()["results"]] == ["reported"] * batch, response.content[:2000]
        counted = counted or {"statements": len(captured), "sql": _sql(captured)}
    total = batches * batch
    figures = {**counted, "batch": batch, "batches": batches,
               "statements_per_item": round(counted["statements"] / batch, 3),
               "ms_per_batch": round(1000 * timer.wall / batches, 3), "ms_per_item": round(1000 * timer.wall / total, 3),
               "cpu_ms_per_item": round(1000 * timer.cpu / total, 3)}
    if timer.profiler:
        figures["profile"] = _profile_text(timer.profiler, "results_report_batch")
    return figures


def measure(*, singles: int, batches: int, batch: int, profile: bool) -> dict[str, Any]:
    from bench import fixtures

    setup_data = fixtures.setup(devices=1)
    fixtures.job(setup_data=setup_data, replicas=2 * (singles + batches * batch + 8) * fixtures.QUORUM)
    agent = _Device(setup_data["devices"][0])
    outputs = iter(_outputs(singles + 2 + batches * batch, seed=7))
    return {"single": _singles(agent, outputs, singles, profile),
            "batched": _batches(agent, outputs, batches, batch, profile)}


# --- the driver -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--singles", type=int, default=200, help="single reports timed (default 200)")
    parser.add_argument("--batches", type=int, default=10, help="batched requests timed (default 10)")
    parser.add_argument("--batch", type=int, default=50, help="items per batched request (default 50, at most 64)")
    parser.add_argument("--profile", action="store_true", help="cProfile the reports: callees of the service, top 15 by own time")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_SERVER,
                        help="PostgreSQL server to create the bench database on (default DATABASE_URL, else %(default)s)")
    parser.add_argument("--db-name", default=f"idlegrid_report_bench_{os.getpid()}",
                        help="the database created, and dropped at the end (default %(default)s)")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER, help="Redis database for the bench (purged at the end)")
    parser.add_argument("--quick", action="store_true", help="20 single reports, 2 batches of 10 (for tests)")
    parser.add_argument("--inner", type=Path, help=argparse.SUPPRESS)  # the Django subprocess writes its figures here
    args = parser.parse_args(argv)
    if args.quick:
        args.singles, args.batches, args.batch = 20, 2, 10
    if not 1 <= args.batch <= 64 or args.singles < 1 or args.batches < 1:
        parser.error("--batch must be in [1, 64]; --singles and --batches at least 1")
    return args


def render(figures: dict[str, Any]) -> str:
    single, batched = figures["single"], figures["batched"]
    lines = ["report cost in process (test client, PostgreSQL, Redis; no HTTP)", "",
             f"single : {single['statements']} SQL statements per report, {single['ms_per_report']} ms "
             f"({single['cpu_ms_per_report']} ms CPU in Django), mean of {single['reports']}"]
    if "skipped" in batched:
        lines.append(f"batched: skipped ({batched['skipped']})")
    else:
        lines.append(f"batched: {batched['statements']} SQL statements per batch of {batched['batch']} "
                     f"({batched['statements_per_item']} per item), {batched['ms_per_batch']} ms per batch, "
                     f"{batched['ms_per_item']} ms per item ({batched['cpu_ms_per_item']} ms CPU), inline outputs")
    for name in ("single", "batched"):
        for number, sql in enumerate(figures[name].get("sql", []), 1):
            lines.append(f"  {name} {number:2d}: {sql}")
    for name in ("single", "batched"):
        if figures[name].get("profile"):
            lines += ["", f"cProfile, {name}:", figures[name]["profile"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inner:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
        import django

        django.setup()
        figures = measure(singles=args.singles, batches=args.batches, batch=args.batch, profile=args.profile)
        args.inner.write_text(json.dumps(figures))
        return 0
    maintenance, database_url = database_urls(args.database_url, args.db_name)
    with tempfile.TemporaryDirectory(prefix="idlegrid-report-cost-") as tmp, bench_database(maintenance, args.db_name):
        work = Path(tmp)
        env = child_env(database_url, args.broker_url, work / "var")
        # The bench device is new, so on probation: one lease at a time unless the quota says more.
        env["IDLEGRID_PROBATION_LEASES"] = "64"
        try:
            run_django(env, "manage.py", "migrate", "--noinput", "-v", "0")
            out = work / "figures.json"
            inner = [sys.executable, str(Path(__file__).resolve()), "--inner", str(out), "--singles", str(args.singles),
                     "--batches", str(args.batches), "--batch", str(args.batch), *(["--profile"] if args.profile else [])]
            subprocess.run(inner, cwd=REPO, env=env, check=True, timeout=900)
            figures = json.loads(out.read_text())
        finally:
            purge_broker(args.broker_url)
    print(render(figures))
    summary = {"bench": "report_cost", "single": {k: v for k, v in figures["single"].items() if k not in ("sql", "profile")},
               "batched": {k: v for k, v in figures["batched"].items() if k not in ("sql", "profile")}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
