"""bench/gas.py --quick: real receipts at 10 and 1,000 leaves, the operator's cost flat whatever the number
paid, and the last line one JSON object with the transfer baseline beside it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run([sys.executable, "bench/gas.py", "--quick", "--claims", "2", "--transfers", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_it_measures_every_quick_size_with_proofs_as_deep_as_the_tree(report):
    assert set(report["sizes"]) == {"10", "1000"}
    assert report["sizes"]["10"]["proof_depth"] == 4 and report["sizes"]["1000"]["proof_depth"] == 10
    assert report["sizes"]["1000"]["claims_measured"] == 2


def test_publishing_a_root_costs_the_same_whatever_the_number_paid_and_stays_under_target(report):
    steady = {row["publish_root_steady"] for row in report["sizes"].values()}
    assert max(steady) - min(steady) <= 100
    assert report["publish_root_steady_max"] <= 50_000 and report["publish_target_met"] is True
    assert report["publish_root_first_epoch_max"] > report["publish_root_steady_max"]


def test_a_claim_grows_with_the_depth_and_a_repeat_claim_is_cheaper(report):
    small, large = report["sizes"]["10"], report["sizes"]["1000"]
    assert small["claim_first_max"] < large["claim_first_max"] <= 100_000
    assert large["claim_repeat_max"] < large["claim_first_max"]
    assert report["claim_target_met"] is None  # only judged at a million leaves


def test_the_transfer_baseline_is_measured_and_extrapolated_per_person(report):
    baseline = report["baseline"]
    assert baseline["transfers_measured"] == 6
    assert 21_000 < baseline["transfer_to_existing_holder_mean"] < baseline["transfer_to_new_holder_mean"] < 80_000
    assert report["sizes"]["1000"]["transfers_total_extrapolated"] == 1000 * baseline["transfer_to_new_holder_mean"]
