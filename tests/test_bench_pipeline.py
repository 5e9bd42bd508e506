"""bench/pipeline.py --quick: the split, validation (in process and by a real Celery worker) and merge stages
run on the embedded defaults and report every figure they promise; how fast is the bench's to print, never
a test's to judge."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run([sys.executable, "bench/pipeline.py", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_waiting_unit_is_validated_half_in_process_half_by_the_worker(report):
    validate = report["validate"]
    assert validate["units_waiting"] == validate["units"] == 200
    assert validate["in_process"]["units"] + validate["worker"]["units"] == 200
    assert validate["still_waiting"] == 0
    for stage in ("in_process", "worker"):
        assert validate[stage]["seconds"] > 0 and validate[stage]["units_per_second"] > 0, stage
    assert validate["worker"]["messages"] >= 1  # a handful per burst of reports, not one per unit
    assert validate["in_process"]["queries_per_unit"] > 0
    # The bench's population decides most units and leaves those with a disagreement waiting for a replica.
    assert validate["unit_states"]["done"] > 0
    assert sum(validate["unit_states"].values()) == 200


def test_the_split_and_the_merge_report_their_figures(report):
    split, merge = report["split"], report["merge"]
    assert split["units"] == merge["units"] == 2000
    assert split["seconds"] > 0 and split["transactions"] >= 1
    assert 0 < split["longest_transaction_seconds"] <= split["seconds"]
    assert merge["output_bytes"] > 0 and merge["peak_python_mb"] > 0
