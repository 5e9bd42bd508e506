"""bench/idle.py --quick: it runs against the real server (gunicorn, uvicorn workers, PostgreSQL) and reports
every figure it promises; how fast is the bench's to print, never a test's to judge."""

import pytest

from tests.bench_run import run_quick_on_postgres


@pytest.fixture(scope="module")
def report() -> dict:
    return run_quick_on_postgres("idle.py", timeout=900)


def test_it_reports_the_idle_cost_per_agent_and_per_request(report):
    assert report["bench"] == "idle" and report["agents"] == 50 and report["wait_seconds"] == 5
    assert report["idle_requests"] > 0 and report["idle_requests_per_s"] > 0
    for figure in ("server_cpu_ms_per_agent_minute", "web_cpu_ms_per_agent_minute", "server_cpu_ms_per_request"):
        assert report[figure] >= 0, figure
    assert set(report["idle_cpu_s"]) >= {"web", "postgres"}


def test_it_reports_the_connections_and_threads_the_waiting_held(report):
    assert report["db_listen_connections"] >= 1  # the notifier of at least one worker listened
    assert report["db_connections_max"] >= report["db_listen_connections"]
    assert report["server_threads_max"] > 0


def test_every_split_round_reached_an_agent_and_says_how_soon(report):
    assert report["rounds_missed"] == 0 and len(report["first_lease_ms"]) == 2
    assert all(delay is not None and delay >= 0 for delay in report["first_lease_ms"])
    assert report["leases_answered"] >= 2 and report["errors"] == {}
