"""bench/soak.py --quick: the sustained run goes end to end on the real processes (gunicorn, a Celery worker,
beat, the feeder) and reports its figures: throughput per window, the hot table over time, the archive.
Never how fast: that is the bench's to print."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER = os.environ.get("DATABASE_URL", "")
SERVER = SERVER if SERVER.startswith(("postgres://", "postgresql://")) else "postgres://postgres@127.0.0.1:5432/postgres"
BROKER = os.environ.get("CELERY_BROKER_URL", "")
BROKER = BROKER if BROKER.startswith("redis://") else "redis://127.0.0.1:6379/15"


def _reachable(url: str, port: int) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def report() -> dict:
    if not (_reachable(SERVER, 5432) and _reachable(BROKER, 6379)):
        pytest.skip("the soak needs a PostgreSQL server and a Redis (DATABASE_URL, CELERY_BROKER_URL)")
    done = subprocess.run(
        [sys.executable, "bench/soak.py", "--quick", "--database-url", SERVER, "--broker-url", BROKER],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_it_reports_throughput_per_window_and_the_ratio_of_the_last_to_the_first(report):
    assert report["bench"] == "soak" and report["reports"] > 0 and report["errors"] == {}
    assert len(report["windows"]) >= 2
    assert all(window["reports_per_s"] >= 0 for window in report["windows"])
    assert report["ratio"] is not None and report["goal"] == 0.9


def test_it_samples_the_hot_table_over_time(report):
    assert len(report["samples"]) >= 2
    assert all(sample["hot_rows"] > 0 and sample["heap_bytes"] > 0 for sample in report["samples"])
    assert report["hot_rows_max"] >= report["hot_rows_last"] > 0


def test_finished_jobs_are_merged_and_their_results_archived_during_the_run(report):
    assert report["jobs_completed"] >= 1
    assert report["archived"] > 0
