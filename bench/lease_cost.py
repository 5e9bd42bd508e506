"""The lease statement's cost as finished results pile up, with and without the archive (issue 14, part 4).

    .venv/bin/python bench/lease_cost.py                    # 0, 1M and 3M finished results (~15 min)
    .venv/bin/python bench/lease_cost.py --steps 0,20000    # a quick look
    .venv/bin/python bench/lease_cost.py --quick            # ~1 min: 0 and 30,000 (a check that it runs)

On a fresh PostgreSQL database (created on the server DATABASE_URL names, dropped at the end): a queue of
unsent replicas (bench/fixtures.py `job`, as the dispatch bench makes it) behind a history of finished
results. The history is made as the hot path makes it: rows inserted unsent, then updated to in progress,
then to valid (each update leaves a dead version and new index entries), in jobs that ended long ago, with
older ids than the queue. At each step the lease is measured
- "dead": right after the history was written, before any vacuum (what the default autovacuum scale
  factor, 20% of the table, lets accumulate on a large table);
- "vacuumed": after VACUUM ANALYZE (what the tuned autovacuum of workunits/migrations/0006 keeps close to);
and after the last step the archiver (workunits/archive.py, `manage.py results_archive`) moves the history
out and the table is vacuumed again ("archived"). Autovacuum is off on the two tables during the run so
that each state is the one named.

Measured: EXPLAIN (ANALYZE, BUFFERS) of the real lease statement (leasing._lease_sql, imported read-only,
with the parameters workunit_lease gives it), median of --samples runs, each rolled back so the queue stays
the same; and workunit_lease itself in process (rolled back too). Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import dispatch  # noqa: E402

QUEUE = 20_000  # unsent replicas in front of every measurement
CHUNK = 250_000  # finished results written per statement


def log(message: str) -> None:
    print(f"[lease_cost] {message}", file=sys.stderr, flush=True)


# --- inside Django (a subprocess on the bench database) ---------------------------------------------

def _sql(statement: str, params: Any = None) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.rowcount


def _scalar(statement: str, params: Any = None) -> Any:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0]


def _history_write(*, results: int, owners: list[int], devices: list[int], model: dict[str, Any]) -> float:
    """`results` finished results (3 replicas per unit, by three owners) in one completed job that ended
    400 days ago, made as the hot path makes them: inserted unsent, leased, then judged valid."""
    from datetime import timedelta

    from django.utils import timezone

    from bench import fixtures
    from marketplace.jobs.models import Job

    started = time.perf_counter()
    long_ago = timezone.now() - timedelta(days=400)
    units = results // 3
    submitter_id = _scalar("SELECT id FROM auth_user WHERE username = %s", [fixtures.SUBMITTER])
    job = Job.objects.create(owner_id=submitter_id, kind="inference", state=Job.State.COMPLETED, units_total=units,
                             spec=fixtures._spec(model, units, "0" * 64), started_at=long_ago, finished_at=long_ago)
    payload = json.dumps(fixtures._payload(model, "0" * 64))
    needs = fixtures.NEEDS
    written = 0
    while written < units:
        count = min(CHUNK // 3, units - written)
        _sql("""INSERT INTO workunits_workunit (job_id, index, payload, state, quorum, max_results, results_created,
                    need_validate, error, signing_key_id, known_answer_copies, hidden_rows, audit, replication_decided,
                    need_memory_mb, need_device, need_gpu_mb, kind, created_at, finished_at)
                SELECT %(job)s, %(base)s + g, %(payload)s::jsonb, 'done', 3, 6, 3, false, '', '', 0, '[]'::jsonb, false,
                       true, %(memory)s, 'cpu', 0, %(kind)s, %(at)s, %(at)s
                FROM generate_series(0, %(count)s - 1) g""",
             {"job": job.pk, "base": written, "payload": payload, "memory": needs["need_memory_mb"],
              "kind": needs["kind"], "at": long_ago, "count": count})
        low = _scalar("SELECT min(id) FROM workunits_workunit WHERE job_id = %s AND index >= %s", [job.pk, written])
        _sql("""INSERT INTO workunits_result (unit_id, job_id, state, metrics, error, hardware_class, accepted_alone,
                    failed_known_rows, need_memory_mb, need_device, need_gpu_mb, kind, created_at)
                SELECT u.id, u.job_id, 'unsent', '{}'::jsonb, '', '', false, false, u.need_memory_mb, 'cpu', 0, u.kind,
                       %(at)s
                FROM workunits_workunit u CROSS JOIN generate_series(0, 2) k
                WHERE u.job_id = %(job)s AND u.id >= %(low)s ORDER BY u.id, k""",
             {"job": job.pk, "low": low, "at": long_ago})
        _sql("""UPDATE workunits_result r SET state = 'in_progress', owner_id = (%(owners)s::bigint[])[1 + r.id %% 3],
                    device_id = (%(devices)s::bigint[])[1 + r.id %% 3], leased_at = %(at)s, lease_expires_at = %(at)s
                WHERE r.job_id = %(job)s AND r.state = 'unsent'""",
             {"owners": owners[:3], "devices": devices[:3], "at": long_ago, "job": job.pk})
        _sql("""UPDATE workunits_result SET state = 'valid', reported_at = %(at)s
                WHERE job_id = %(job)s AND state = 'in_progress'""", {"at": long_ago, "job": job.pk})
        written += count
    return time.perf_counter() - started


def _queue(setup_data: dict[str, Any]) -> None:
    """A fresh queue of QUEUE unsent replicas, newer (higher ids) than every finished row, as in production;
    the previous step's queue is cancelled by bench/fixtures.py, as between two dispatch scenarios."""
    from bench import fixtures

    fixtures.job(setup_data=setup_data, replicas=QUEUE)


def _lease_params(device: Any) -> tuple[str, dict[str, Any]]:
    """The lease statement and its parameters exactly as workunit_lease builds them for this device."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from marketplace.workunits.leasing import _lease_sql
    from marketplace.workunits.requirements import capacity_of

    capacity, now, room = capacity_of(None), timezone.now(), 1
    window = settings.IDLEGRID_LEASE_DRAW_WINDOW
    params = {"owner": device.owner_id, "device": device.pk, "hardware_class": device.hardware_class, "now": now,
              "expires": now + timedelta(seconds=settings.IDLEGRID_LEASE_SECONDS), "limit": room,
              "candidates": max(window, 4 * room), "memory_mb": capacity.memory_mb, "gpu_mb": capacity.gpu_mb,
              **{f"kind_{i}": kind for i, kind in enumerate(capacity.kinds)}}
    return _lease_sql(draw=window > 1, kinds=len(capacity.kinds), gpu=capacity.gpu_mb > 0), params


def _measure(device: Any, samples: int) -> dict[str, Any]:
    from django.db import connection, transaction

    from marketplace.workunits.leasing import workunit_lease

    sql, params = _lease_params(device)
    execution, planning, buffers, in_process = [], [], [], []
    for _ in range(samples):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
            plan = cursor.fetchone()[0]
            transaction.set_rollback(True)
        plan = (json.loads(plan) if isinstance(plan, str) else plan)[0]
        execution.append(plan["Execution Time"])
        planning.append(plan["Planning Time"])
        buffers.append(plan["Plan"].get("Shared Hit Blocks", 0) + plan["Plan"].get("Shared Read Blocks", 0))
        with transaction.atomic():
            started = time.perf_counter()
            leased = workunit_lease(device=device, max_units=1)
            in_process.append(1000 * (time.perf_counter() - started))
            transaction.set_rollback(True)
        if len(leased) != 1:
            raise RuntimeError(f"the lease leased {len(leased)} units, not 1: the measurement measures nothing")
    return {"execution_ms": round(statistics.median(execution), 3), "planning_ms": round(statistics.median(planning), 3),
            "buffers": int(statistics.median(buffers)), "workunit_lease_ms": round(statistics.median(in_process), 3)}


def _sizes() -> dict[str, Any]:
    rows = _scalar("SELECT count(*) FROM workunits_result")
    dead = _scalar("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'workunits_result'")
    return {"rows": rows, "dead_rows": dead,
            "heap_mb": round(_scalar("SELECT pg_relation_size('workunits_result')") / 2**20, 1),
            "indexes_mb": round(_scalar("SELECT pg_indexes_size('workunits_result')") / 2**20, 1),
            "unsent_index_kb": _scalar("SELECT pg_relation_size('result_unsent_cpu')") // 1024,
            "archived": _scalar("SELECT count(*) FROM workunits_resultarchive")}


def _vacuum() -> float:
    from django.db import connection

    started = time.perf_counter()
    with connection.cursor() as cursor:
        for table in ("workunits_result", "workunits_workunit"):
            cursor.execute(f"VACUUM (ANALYZE) {table}")
    return time.perf_counter() - started


def inside(*, steps: list[int], samples: int, out: Path) -> None:
    from bench import fixtures

    fixtures._django()
    from django.core.management import call_command

    from marketplace.workers.models import Device

    for table in ("workunits_result", "workunits_workunit"):
        _sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    setup_data = fixtures.setup(devices=4)
    devices = list(Device.objects.filter(pk__in=[d["device_id"] for d in setup_data["devices"]]).order_by("pk"))
    owners, device_ids = [d.owner_id for d in devices], [d.pk for d in devices]
    measured_by = devices[3]  # owner of none of the history: its NOT EXISTS probes find nothing, like a new device
    rows: list[dict[str, Any]] = []
    history = 0
    for step in steps:
        if step > history:
            seconds = _history_write(results=step - history, owners=owners, devices=device_ids, model=setup_data["model"])
            log(f"{step - history} finished results written in {seconds:.0f} s")
            history = step
        _queue(setup_data)
        if step:
            rows.append({"finished": history, "state": "dead", **_sizes(), **_measure(measured_by, samples)})
        log(f"vacuumed in {_vacuum():.1f} s")
        rows.append({"finished": history, "state": "vacuumed", **_sizes(), **_measure(measured_by, samples)})
        log(f"{history}: {rows[-1]}")
    if history:
        started = time.perf_counter()
        call_command("results_archive", "--batch", "10000", "--batches", "100", stdout=open(os.devnull, "w"))
        moved = time.perf_counter() - started
        log(f"archived in {moved:.0f} s; vacuumed in {_vacuum():.1f} s")
        rows.append({"finished": history, "state": "archived", "archive_s": round(moved, 1), **_sizes(),
                     **_measure(measured_by, samples)})
    out.write_text(json.dumps(rows))


# --- outside: the database, the table -----------------------------------------------------------------

def render(rows: list[dict[str, Any]]) -> str:
    head = ["finished results", "state", "hot rows", "dead rows", "heap MB", "indexes MB", "unsent idx KB",
            "lease exec ms", "plan ms", "buffers", "workunit_lease ms"]
    table = [head] + [[f"{r['finished']:,}", r["state"], f"{r['rows']:,}", f"{r['dead_rows']:,}", f"{r['heap_mb']}",
                       f"{r['indexes_mb']}", str(r["unsent_index_kb"]), f"{r['execution_ms']:.3f}",
                       f"{r['planning_ms']:.3f}", str(r["buffers"]), f"{r['workunit_lease_ms']:.2f}"] for r in rows]
    return "lease cost (EXPLAIN ANALYZE of the lease statement, median; a queue of 20,000 unsent replicas)\n\n" + \
        dispatch.table(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="0,1000000,3000000", help="finished results at each step (default %(default)s)")
    parser.add_argument("--samples", type=int, default=15, help="measurements per state, median taken (default 15)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or dispatch.DEFAULT_SERVER)
    parser.add_argument("--quick", action="store_true", help="0 and 30,000 finished results, 5 samples")
    parser.add_argument("--inside", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.samples = "0,30000", 5
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        parser.error("--steps must be comma-separated integers")
    if not steps or steps[0] < 0 or steps[-1] > 20_000_000 or not 1 <= args.samples <= 1000:
        parser.error("--steps in [0, 20000000], --samples in [1, 1000]")
    if args.inside:
        inside(steps=steps, samples=args.samples, out=args.inside)
        return 0
    name = f"idlegrid_lease_cost_{os.getpid()}"
    try:
        maintenance, database_url = dispatch.database_urls(args.database_url, name)
        with tempfile.TemporaryDirectory(prefix="idlegrid-lease-cost-") as tmp, dispatch.bench_database(maintenance, name):
            work = Path(tmp)
            env = dispatch.child_env(database_url, "filesystem://", work / "var")
            # The in-process lease measures the lease: no known-answer copy drawn into it at random.
            env["IDLEGRID_KNOWN_ANSWER_RATE"] = "0"
            dispatch.run_django(env, "manage.py", "migrate", "--noinput", "-v", "0")
            out = work / "rows.json"
            dispatch.run_django(env, "bench/lease_cost.py", "--inside", str(out), "--steps", ",".join(map(str, steps)),
                                "--samples", str(args.samples), timeout=6 * 3600)
            rows = json.loads(out.read_text())
    except dispatch.BenchError as exc:
        log(str(exc))
        print(json.dumps({"bench": "lease_cost", "error": str(exc).splitlines()[0]}))
        return 2
    print(render(rows))
    print(json.dumps({"bench": "lease_cost", "queue": QUEUE, "samples": args.samples, "rows": rows},
                     separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
