"""bench/report_cost.py --quick: single and batched reports through the real URLconf on PostgreSQL, their
statements and milliseconds counted; how fast is the bench's to print, never a test's to judge."""

import pytest

from tests.bench_run import run_quick_on_postgres


@pytest.fixture(scope="module")
def report() -> dict:
    return run_quick_on_postgres("report_cost.py", timeout=600)


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
