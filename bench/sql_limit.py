"""The database's own limit for the dispatch bench: the lease and report state moves as bare SQL, no HTTP.

Each simulated agent is a process with one psycopg connection that runs, as prepared statements:
the marketplace's own lease statement (marketplace/workunits/leasing.py, the text the server sends, taken
from `bench.fixtures sql`), committed; then one statement that moves its leases to reported and flags their
units for validation, committed; as many units per lease as the scenario's batch. What it leaves out is
what the marketplace adds on top of the database: HTTP, authentication, the lease policy's standing
query, signatures, the possession check and the validation queue. Its rate is the ceiling the
marketplace's figure is divided by (`ratio_to_sql_limit` in dispatch's JSON).
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.agents import Budget

# The smallest correct report of a batch: only live leases of this device move, and each unit is flagged.
REPORT_SQL = """
WITH moved AS (
    UPDATE workunits_result SET state = 'reported', output_id = %(output)s, signature = %(signature)s,
        reported_at = %(now)s, elapsed_seconds = 0.01, metrics = '{}'
    WHERE id = ANY(%(ids)s) AND device_id = %(device)s AND state = 'in_progress' AND lease_expires_at >= %(now)s
    RETURNING unit_id
)
UPDATE workunits_workunit SET need_validate = true
WHERE id IN (SELECT id FROM workunits_workunit WHERE id IN (SELECT unit_id FROM moved) ORDER BY id FOR UPDATE)
"""
# The units are locked in id order (as the server's report does): two agents reporting the two replicas of
# the same units in another order would otherwise deadlock.


@dataclass
class SqlRun:
    reported: int = 0
    empty: int = 0
    errors: int = 0
    ended_at: float = 0.0


def _agent(database_url: str, device: dict[str, Any], statements: dict[str, str], batch: int, output: str,
           deadline: float, budget: Budget, start: Any, results: Any) -> None:
    run = SqlRun()
    lease_sql = statements["lease_batch" if batch > 1 else "lease_single"]
    with psycopg.connect(database_url) as conn:
        owner, hardware_class = conn.execute(
            "SELECT owner_id, hardware_class FROM workers_device WHERE id = %s", (device["device_id"],)).fetchone()
        conn.commit()
        start.wait()
        while time.monotonic() < deadline:
            wanted = budget.take(batch)
            if not wanted:
                break
            now = datetime.now(UTC)
            params = {"owner": owner, "device": device["device_id"], "hardware_class": hardware_class, "now": now,
                      "expires": now + timedelta(seconds=300), "limit": wanted, "candidates": max(32, 4 * wanted),
                      "memory_mb": 2048, "gpu_mb": 0, "grace": 60.0, "kind_0": "fedavg", "kind_1": "inference"}
            rows = conn.execute(lease_sql, params, prepare=True).fetchall()
            conn.commit()
            if len(rows) < wanted:
                # What this device did not get goes back to the others: a device that has computed a replica
                # of every unit left can lease no more of them, and its share of the bound is theirs.
                budget.give_back(wanted - len(rows))
            if not rows:
                run.empty += 1
                break
            try:
                conn.execute(REPORT_SQL, {"output": output, "signature": b"\0" * 64, "now": datetime.now(UTC),
                                          "ids": [row[0] for row in rows], "device": device["device_id"]}, prepare=True)
                conn.commit()
            except psycopg.errors.OperationalError:  # a deadlock or serialization failure: counted, not fatal
                conn.rollback()
                run.errors += 1
                budget.give_back(len(rows))
                continue
            run.reported += len(rows)
    run.ended_at = time.monotonic()
    results.put(run)


def run_sql_limit(*, database_url: str, devices: list[dict[str, Any]], statements: dict[str, str], batch: int,
                  output: str, units: int, seconds: float) -> dict[str, Any]:
    """Units/s of bare lease + report on the bench database, one process and connection per device."""
    ctx = multiprocessing.get_context("fork")
    budget, start, results = Budget(ctx, units), ctx.Event(), ctx.Queue()
    deadline = time.monotonic() + 2.0 + seconds
    procs = [ctx.Process(target=_agent, args=(database_url, d, statements, batch, output, deadline, budget, start, results),
                         daemon=True) for d in devices]
    for proc in procs:
        proc.start()
    time.sleep(2.0)
    began = time.monotonic()
    start.set()
    runs = []
    try:
        for _ in procs:
            runs.append(results.get(timeout=seconds + 60))
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    reported = sum(r.reported for r in runs)
    wall = max((r.ended_at for r in runs), default=began) - began
    return {"batch": batch, "units": reported, "wall_s": round(wall, 2),
            "units_per_s": round(reported / wall, 1) if wall > 0 else 0.0, "agents": len(runs),
            "errors": sum(r.errors for r in runs)}
