"""bench/sabotage.py --quick: every scenario runs to its end on the real services, and the properties that
hold at any size hold at the tiny one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = {"honest", "always_wrong", "intermittent_10", "intermittent_1", "colluding_10", "lazy"}


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run(
        [sys.executable, "bench/sabotage.py", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_scenario_runs_to_its_end(report):
    assert set(report["scenarios"]) == SCENARIOS and report["headline"] == "colluding_10"
    for name, figures in report["scenarios"].items():
        assert not figures["stalled"], name
        assert figures["jobs_completed"] + figures["jobs_failed"] == figures["jobs"] > 0, name
        assert figures["units"] == report["scenarios"]["honest"]["units"] > 0, name
        assert 0 <= figures["accepted_wrong_units"] <= figures["units_delivered"] <= figures["units"], name
        assert figures["honest_results_judged"] > 0, name


def test_it_echoes_the_trust_settings_it_ran_with(report):
    assert set(report["settings"]) == {
        "IDLEGRID_TRUST_THRESHOLD", "IDLEGRID_AUDIT_RATE", "IDLEGRID_KNOWN_ANSWER_RATE", "IDLEGRID_AUDIT_WINDOW_SECONDS",
    }


def test_no_honest_device_is_ever_banned(report):
    assert {name: f["bans_honest"] for name, f in report["scenarios"].items()} == dict.fromkeys(SCENARIOS, 0)


def test_every_unit_costs_at_least_one_result(report):
    for name, figures in report["scenarios"].items():
        assert figures["results_per_unit"] >= 1, name


def test_devices_that_are_always_wrong_never_get_a_wrong_result_accepted(report):
    for name in ("always_wrong", "lazy"):  # wrong in ways no other device shares: never a quorum, never trusted
        figures = report["scenarios"][name]
        assert figures["accepted_wrong_units"] == 0 and figures["cheated_results_valid"] == 0, name
        assert figures["cheated_results"] > 0, name


def test_honest_devices_of_different_hardware_classes_agree(report):
    honest = report["scenarios"]["honest"]
    assert honest["honest_results_invalid"] == 0 and honest["accepted_wrong_units"] == 0
    assert honest["units_delivered"] == honest["units"]
