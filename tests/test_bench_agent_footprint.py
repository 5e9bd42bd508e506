"""bench/agent_footprint.py --quick: it runs a real agent against a live marketplace and reports every figure
(never how fast: the goals are the bench's to judge, on a machine of its own)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run(
        [sys.executable, "bench/agent_footprint.py", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "agent RSS, idle" in done.stdout and "overhead per unit" in done.stdout  # the table, before the JSON
    return json.loads(lines[-1])


def test_it_computes_its_units_and_measures_the_agent_process(report):
    assert report["quick"] is True and report["units_done"] == 4
    assert 1 < report["idle_rss_mb"] < 10_000 and 1 < report["busy_rss_mb"] < 10_000
    assert report["child_rss_mb"] > report["idle_rss_mb"]  # torch lives in the child
    assert report["idle_cpu_percent"] >= 0
    assert report["bare_unit_seconds"] > 0 and report["unit_cycle_seconds"] > 0
    assert report["overhead_percent"] == pytest.approx(100 * (report["unit_cycle_seconds"] / report["bare_unit_seconds"] - 1), abs=0.1)


def test_torch_is_never_mapped_into_the_agent_process(report):
    assert report["torch_in_agent_idle"] is False and report["torch_in_agent_busy"] is False


def test_the_policy_figures_are_measured_exactly_when_the_agent_has_the_flags(report):
    # `run --idle-source file:PATH` and `--cpu-percent` (the policy part): without them both figures are null.
    figures = (report["pause_latency_s"], report["capped_cpu_percent"])
    if report["policy_flags"]:
        assert all(isinstance(value, float) and value >= 0 for value in figures), figures
    else:
        assert figures == (None, None)
