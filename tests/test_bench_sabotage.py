"""bench/sabotage.py --quick: every scenario runs to its end on the real services, and the properties that
hold at any size hold at the tiny one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEADY = {"honest", "always_wrong", "intermittent_10", "intermittent_1", "colluding_10", "lazy"}
COLD = {"cold_colluding_pair", "cold_colluding_pair_known", "cold_subtle_pair", "cold_subtle_pair_known"}
SCENARIOS = STEADY | COLD


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run(
        [sys.executable, "bench/sabotage.py", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_scenario_runs_to_its_end(report):
    assert set(report["scenarios"]) == SCENARIOS and report["headline"] == "colluding_10"
    assert set(report["cold"]) == COLD
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


def test_no_device_holds_a_lease_between_turns(report):
    # A device leases, computes and reports within its turn: the per-device lease quota never starves it.
    assert {name: f["leases_held_after_a_round_max"] for name, f in report["scenarios"].items()} == dict.fromkeys(SCENARIOS, 0)


def test_the_funded_verification_budget_pays_for_known_answer_copies(report):
    # Without a budget no copy is ever made; at the quick size a scenario makes about 7 to 20.
    assert sum(f["known_answer_results"] for f in report["scenarios"].values()) > 0


def test_a_cold_network_is_every_honest_device_and_a_pair_all_on_probation(report):
    for name in COLD:
        figures = report["scenarios"][name]
        assert figures["saboteur"]["pair"] and figures["saboteur"]["devices"] == 2, name
        assert figures["devices"] == figures["honest_devices"] + 2, name
        assert figures["trusted_at_end"] == {"honest": 0, "saboteur": 0}, name  # too few results to earn trust
        assert figures["bans_honest"] == figures["bans_saboteur"] == 0, name  # no ban without a trusted device's word


def test_without_known_answers_a_cold_pair_decides_units_it_shares(report):
    figures = report["scenarios"]["cold_colluding_pair"]
    assert figures["known_rows_per_unit"] == 0 and figures["rows_per_unit"] == 4
    assert figures["saboteur_units_shared"] > 0 and figures["wrong_at_first_delivery_rows"] > 0
    assert figures["cheated_results_valid"] > 0
    # It corrupts whole units: every row of a wrong unit is wrong.
    assert figures["accepted_wrong_rows"] == 4 * figures["accepted_wrong_units"]


def test_with_known_answers_a_pair_corrupting_whole_units_gets_nothing_wrong_delivered(report):
    figures = report["scenarios"]["cold_colluding_pair_known"]
    assert figures["known_rows_per_unit"] == 1 and figures["saboteur_units_shared"] > 0
    assert figures["accepted_wrong_rows"] == figures["wrong_at_first_delivery_rows"] == 0
    assert figures["cheated_results"] > 0
    assert figures["cheated_results_valid"] == 0 and figures["cheated_results_invalid"] == figures["cheated_results"]
    assert figures["known_rows_failed"]["saboteur"] > 0


def test_a_pair_corrupting_one_row_delivers_at_most_one_wrong_row_per_unit(report):
    for name in ("cold_subtle_pair", "cold_subtle_pair_known"):
        figures = report["scenarios"][name]
        assert figures["accepted_wrong_rows"] == figures["accepted_wrong_units"], name
        assert figures["wrong_at_first_delivery_rows"] == figures["wrong_at_first_delivery_units"], name
    assert report["scenarios"]["cold_subtle_pair"]["wrong_at_first_delivery_rows"] > 0


def test_no_honest_answer_ever_fails_the_submitters_known_rows(report):
    for name in ("cold_colluding_pair_known", "cold_subtle_pair_known"):
        assert report["scenarios"][name]["known_rows_failed"]["honest"] == 0, name


def test_hidden_known_rows_are_computed_by_every_result(report):
    for name in COLD:
        figures = report["scenarios"][name]
        n, k = figures["rows_per_unit"], figures["known_rows_per_unit"]
        assert figures["rows_delivered"] == n * figures["units_delivered"], name  # the merge leaves them out
        assert figures["rows_computed_per_row_delivered"] == pytest.approx(figures["results_per_unit"] * (n + k) / n, abs=1e-3), name
