"""POST /api/v1/jobs/quote/ (and dry_run on create): cost, time and feasibility, nothing created."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.ledger.models import Posting
from marketplace.workers.models import Device
from marketplace.workunits.models import Result

QUOTE = "/api/v1/jobs/quote/"
PRICE = 10**15


def _spec(inference_spec, **changes):
    return inference_spec(rows=10, **{"rows_per_unit": 4, "price_per_result": str(PRICE), "adaptive": False, **changes})


def test_a_quote_prices_the_job_and_creates_nothing(api, submitter, inference_spec):
    response = api(submitter).post(QUOTE, {"kind": "inference", "spec": _spec(inference_spec)}, format="json")

    assert response.status_code == 200, response.json()
    quote = response.json()
    assert (quote["units"], quote["quorum"]) == (3, 2)  # 10 rows by 4
    assert quote["cost_worst_case"] == str(PRICE * 3 * quote["spec"]["max_results_per_unit"])
    assert quote["results_per_unit_expected"] == 2.0 and "quorum" in quote["results_per_unit_source"]
    assert quote["cost_expected"] == str(PRICE * 3 * 2)
    assert quote["affordable"] is True
    assert Job.objects.count() == 0
    assert not Posting.objects.filter(kind=Posting.Kind.ESCROW).exists()


def test_without_devices_of_enough_owners_the_job_is_not_runnable_and_says_why(api, submitter, inference_spec):
    quote = api(submitter).post(QUOTE, {"kind": "inference", "spec": _spec(inference_spec)}, format="json").json()

    assert quote["runnable"] is False
    assert "2 different owners" in quote["not_runnable_reason"]
    assert quote["eta_seconds_p50"] is None and quote["eta_reason"] == quote["not_runnable_reason"]


def test_the_eta_comes_from_recent_compute_times_of_the_active_devices(
        api, submitter, inference_spec, submit_job, make_device, contributor, other_contributor, report):
    from marketplace.workunits.leasing import workunit_lease

    job = submit_job(rows=24, rows_per_unit=4)  # 6 units, 12 results
    for owner in (contributor, other_contributor):
        device = make_device(owner)
        for lease in workunit_lease(device=device.device, max_units=64):
            report(device, lease.result_id)
    Result.objects.filter(job=job, reported_at__isnull=False).update(elapsed_seconds=10.0)
    Device.objects.update(last_seen_at=timezone.now())

    quote = api(submitter).post(QUOTE, {"kind": "inference", "spec": _spec(inference_spec)}, format="json").json()

    assert quote["runnable"] is True and quote["owners_active"] == 2 and quote["devices_active"] == 2
    # 3 units x 2 results over 2 devices, one at a time: 3 results each, 10 s per result
    assert quote["eta_seconds_p50"] == quote["eta_seconds_p90"] == 30
    assert quote["eta_reason"] is None


def test_a_device_not_seen_for_an_hour_does_not_count(api, submitter, inference_spec, make_device, contributor,
                                                       other_contributor):
    for owner in (contributor, other_contributor):
        make_device(owner)
    Device.objects.update(last_seen_at=timezone.now() - timedelta(hours=2))

    quote = api(submitter).post(QUOTE, {"kind": "inference", "spec": _spec(inference_spec)}, format="json").json()

    assert (quote["devices_active"], quote["runnable"]) == (0, False)


def test_a_quote_refuses_a_bad_spec_as_a_submission_would(api, submitter, inference_spec):
    response = api(submitter).post(QUOTE, {"kind": "inference", "spec": _spec(inference_spec, rows_per_unit=0)},
                                   format="json")

    assert response.status_code == 400
    assert "rows_per_unit" in response.json()["error"]["fields"]


def test_dry_run_on_create_answers_the_quote_and_creates_nothing(api, submitter, inference_spec):
    body = {"kind": "inference", "spec": _spec(inference_spec), "dry_run": True}
    response = api(submitter).post("/api/v1/jobs/", body, format="json")

    assert response.status_code == 200
    assert response.json()["units"] == 3
    assert Job.objects.count() == 0


def test_the_eta_counts_the_wall_time_between_a_busy_devices_reports_not_only_its_compute_time(
        api, submitter, inference_spec, submit_job, make_device, contributor, other_contributor, report):
    from datetime import timedelta

    from marketplace.workunits.leasing import workunit_lease

    submit_job(rows=24, rows_per_unit=4)  # 6 units: 6 reports per device, 4 s apart
    start = timezone.now() - timedelta(minutes=10)
    for owner in (contributor, other_contributor):
        device = make_device(owner)
        for n, lease in enumerate(workunit_lease(device=device.device, max_units=64)):
            report(device, lease.result_id)
            # 0.1 s of compute, but a report every 4 s: the round trips are most of a small unit's cost
            Result.objects.filter(pk=lease.result_id).update(elapsed_seconds=0.1,
                                                              reported_at=start + timedelta(seconds=4 * n))
    Device.objects.update(last_seen_at=timezone.now())

    quote = api(submitter).post(QUOTE, {"kind": "inference", "spec": _spec(inference_spec)}, format="json").json()

    # the quoted job: 3 units x 2 results over 2 devices, 3 results each, at the 4 s p50 and p90 per result
    # (the first report of each device counts only its 0.1 s of compute)
    assert quote["eta_seconds_p50"] == quote["eta_seconds_p90"] == 12


def test_the_quoted_worst_case_is_what_the_submission_then_escrows(api, submitter, inference_spec):
    from marketplace.ledger.selectors import balances_for

    body = {"kind": "inference", "spec": _spec(inference_spec)}
    before = balances_for(user=submitter)
    quote = api(submitter).post(QUOTE, body, format="json").json()
    created = api(submitter).post("/api/v1/jobs/", body, format="json")
    after = balances_for(user=submitter)

    assert created.status_code == 201, created.json()
    assert int(after["escrowed"]) - int(before["escrowed"]) == int(quote["cost_worst_case"]) > 0
    assert int(before["available"]) - int(after["available"]) == int(quote["cost_worst_case"])
    assert quote["spec"] == created.json()["spec"]  # the spec the quote priced is the one stored
