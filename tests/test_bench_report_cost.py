"""bench/report_cost.py --quick: single and batched reports through the real URLconf on PostgreSQL, their
statements and milliseconds counted; how fast is the bench's to print, never a test's to judge."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER = os.environ.get("DATABASE_URL", "")
if not SERVER.startswith(("postgres://", "postgresql://")):
    SERVER = "postgres://postgres@127.0.0.1:5432/postgres"  # the bench makes and drops a database of its own there


@pytest.fixture(scope="module")
def report() -> dict:
    try:
        psycopg.connect(SERVER, connect_timeout=3).close()
    except psycopg.Error as exc:
        pytest.skip(f"bench/report_cost.py needs a PostgreSQL server: {exc}")
    done = subprocess.run([sys.executable, "bench/report_cost.py", "--quick", "--database-url", SERVER],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_it_counts_the_statements_and_time_of_each_single_report(report):
    single = report["single"]
    assert report["bench"] == "report_cost" and single["reports"] == 20
    assert single["statements"] >= 1 and single["ms_per_report"] > 0 and single["cpu_ms_per_report"] > 0


def test_a_batched_report_costs_fewer_statements_per_item_than_a_single_one(report):
    batched = report["batched"]
    assert (batched["batch"], batched["batches"]) == (10, 2)
    assert batched["ms_per_item"] > 0 and batched["cpu_ms_per_item"] > 0
    # Statements are counted, not timed: a batch that fell back to one statement set per item would fail here.
    assert batched["statements_per_item"] < report["single"]["statements"]
