"""bench/dispatch.py --quick: both scenarios lease and report through the real server, the bare-SQL limit runs
beside them, and the figures come out as a table and a last-line JSON object (never how fast)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ)
    if not env.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")):
        env.pop("DATABASE_URL", None)  # the bench's default: the machine's PostgreSQL server
    env.pop("CELERY_BROKER_URL", None)  # its own Redis database (15), purged at the end
    done = subprocess.run([sys.executable, "bench/dispatch.py", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("dispatch:") and any("bare SQL/s" in line for line in lines)
    return json.loads(lines[-1])


def test_both_scenarios_report_every_unit_without_errors(report):
    assert set(report["scenarios"]) == {"single", "batched"}
    for name, figures in report["scenarios"].items():
        assert figures["units"] == report["units"] == 200, name
        assert figures["errors"] == {}, name
        assert figures["lease"]["n"] > 0 and figures["report"]["n"] > 0, name
        assert figures["server_cpu_ms_per_unit"] > 0, name
    # The batched scenario reports a lease's units in one request each: fewer report requests than units.
    assert report["scenarios"]["batched"]["reports"] == "batched, outputs inline"
    assert report["scenarios"]["batched"]["report"]["n"] < report["scenarios"]["batched"]["units"]
    assert report["scenarios"]["single"]["report"]["n"] == report["scenarios"]["single"]["units"]


def test_the_bare_sql_limit_ran_on_the_same_units(report):
    for name, figures in report["scenarios"].items():
        assert figures["sql_limit"]["units"] == 200, name
        assert figures["ratio_to_sql_limit"] > 0, name


def test_it_counts_the_statements_of_each_request(report):
    queries = report["queries"]
    assert "error" not in queries, queries
    assert queries["lease_1"]["leased"] == 1 and queries["lease_1"]["queries"] > 0
    assert queries["report"]["queries"] > 0
