"""The agent's endpoints: lease, heartbeat, report, fail (enrolment has its own module)."""

import base64
from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone

from marketplace.workunits.leasing import leases_expire, workunit_lease
from marketplace.workunits.models import Result, WorkUnit

LEASE = "/api/v1/agent/lease"
HEARTBEAT = "/api/v1/agent/heartbeat"


def report_url(result_id):
    return f"/api/v1/agent/results/{result_id}/report"


def fail_url(result_id):
    return f"/api/v1/agent/results/{result_id}/fail"


@pytest.fixture
def job(submit_job):
    return submit_job(rows=10, rows_per_unit=4)


@pytest.fixture
def device(make_device, contributor):
    return make_device(contributor)


@pytest.fixture
def leased(job, device):
    """The device's lease on the first unit."""
    (lease,) = workunit_lease(device=device.device, max_units=1)
    return Result.objects.select_related("unit").get(pk=lease.result_id)


@pytest.fixture
def honest(leased, upload, make_output, honest_output, device):
    """The sha256 of the honest output of the leased unit, uploaded by the device."""
    return upload(make_output(honest_output(leased.unit)), device=device.device)


def post_report(device, result, sha, signature=None, **extra):
    body = {"output_sha256": sha, "signature": signature or device.sign(result, sha), "elapsed_seconds": 1.5, **extra}
    return device.client().post(report_url(result.pk), body, format="json")


def assert_nothing_reported(result):
    result.refresh_from_db()
    assert result.state == Result.State.IN_PROGRESS
    assert result.output_id is None
    assert result.reported_at is None
    assert WorkUnit.objects.get(pk=result.unit_id).need_validate is False


# --- lease ----------------------------------------------------------------------------------------

def test_it_leases_units_with_their_payloads(job, device):
    response = device.client().post(LEASE, {"max_units": 2}, format="json")

    assert response.status_code == 200
    body = response.json()
    assert body["retry_after"] == 0
    assert len(body["leases"]) == 2
    lease = body["leases"][0]
    unit = WorkUnit.objects.get(pk=lease["unit_id"])
    assert "job_id" not in lease  # an audit or known-answer unit must look like any other
    assert lease["payload"] == unit.payload
    assert (lease["key_id"], lease["signature"]) == (unit.signing_key_id, base64.b64encode(unit.signature).decode())
    assert Result.objects.get(pk=lease["result_id"]).device == device.device


def test_it_tells_an_idle_agent_when_to_ask_again(device, settings):
    response = device.client().post(LEASE, {"max_units": 4}, format="json")

    assert response.json() == {"leases": [], "retry_after": settings.IDLEGRID_LEASE_RETRY_AFTER}


@pytest.mark.parametrize("max_units", [0, 65, "many"])
def test_it_refuses_a_batch_size_out_of_range(job, device, max_units):
    response = device.client().post(LEASE, {"max_units": max_units}, format="json")

    assert response.status_code == 400
    assert "max_units" in response.json()["error"]["fields"]
    assert Result.objects.filter(state=Result.State.IN_PROGRESS).count() == 0


def test_people_cannot_lease(job, api, contributor):
    response = api(contributor).post(LEASE, {"max_units": 1}, format="json")

    assert response.status_code == 401
    assert Result.objects.filter(state=Result.State.IN_PROGRESS).count() == 0


# --- heartbeat ------------------------------------------------------------------------------------

def test_a_heartbeat_renews_live_leases_and_names_the_lost_ones(job, device, make_device, other_contributor):
    mine = workunit_lease(device=device.device, max_units=3)
    (theirs, *_) = workunit_lease(device=make_device(other_contributor).device, max_units=1)
    live, expired = mine[0].result_id, mine[1].result_id
    Result.objects.filter(pk=expired).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    response = device.client().post(HEARTBEAT, {"result_ids": [live, expired, theirs.result_id, 999_999]},
                                    format="json")

    assert response.status_code == 200
    body = response.json()
    assert body["renewed"] == [live]
    assert body["lost"] == sorted([expired, theirs.result_id, 999_999])
    assert Result.objects.get(pk=live).lease_expires_at.isoformat().replace("+00:00", "Z") == body["expires_at"]


def test_a_heartbeat_stores_the_progress_of_the_devices_live_leases_only(
    job, device, make_device, other_contributor
):
    live, expired = (lease.result_id for lease in workunit_lease(device=device.device, max_units=2))
    Result.objects.filter(pk=expired).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    (theirs,) = workunit_lease(device=make_device(other_contributor).device, max_units=1)
    progress = {str(live): 0.25, str(expired): 0.5}
    client = device.client()

    response = client.post(HEARTBEAT, {"result_ids": [live, expired], "progress": progress}, format="json")
    refused = client.post(HEARTBEAT, {"result_ids": [live, theirs.result_id],
                                      "progress": {str(theirs.result_id): 0.9}}, format="json")

    assert response.status_code == 200 and response.json()["renewed"] == [live]
    assert Result.objects.get(pk=live).progress == 0.25
    assert Result.objects.get(pk=expired).progress is None  # no longer its lease: nothing stored
    assert refused.status_code == 200  # another device's lease is named lost, its progress left alone
    assert Result.objects.get(pk=theirs.result_id).progress is None


@pytest.mark.parametrize("progress", [
    {"1": 1.5}, {"1": -0.1}, {"1": True}, {"1": "0.5"}, {"999999": 0.5}, {"01": 0.5}, {"x": 0.5}, [0.5],
])
def test_a_heartbeat_with_malformed_progress_is_refused_and_renews_nothing(job, device, progress):
    (lease,) = workunit_lease(device=device.device, max_units=1)
    before = Result.objects.get(pk=lease.result_id).lease_expires_at
    body = {"result_ids": [lease.result_id],
            "progress": {key.replace("1", str(lease.result_id)) if key == "1" else key: value
                         for key, value in progress.items()} if isinstance(progress, dict) else progress}

    response = device.client().post(HEARTBEAT, body, format="json")

    assert response.status_code == 400, response.json()
    assert response.json()["error"]["fields"].keys() == {"progress"}
    assert Result.objects.get(pk=lease.result_id).lease_expires_at == before


# --- report ---------------------------------------------------------------------------------------

def test_it_accepts_a_signed_report_and_queues_the_unit_for_validation(
    leased, honest, device, enqueued, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = post_report(device, leased, honest, metrics={"rows_per_second": 100.0})

    assert response.status_code == 200, response.json()
    assert response.json() == {"state": "reported"}
    leased.refresh_from_db()
    assert leased.state == Result.State.REPORTED
    assert leased.output_id == honest
    assert leased.reported_at is not None
    assert leased.elapsed_seconds == 1.5
    assert leased.metrics == {"rows_per_second": 100.0}
    assert bytes(leased.signature) == base64.b64decode(device.sign(leased, honest))
    # The unit needs two answers and its other replica is still out: nothing to validate yet.
    assert WorkUnit.objects.get(pk=leased.unit_id).need_validate is False
    assert enqueued == []


def test_the_report_that_completes_a_quorum_queues_the_unit_for_validation(
    leased, honest, device, make_device, other_contributor, upload, make_output, honest_output, enqueued,
    django_capture_on_commit_callbacks,
):
    post_report(device, leased, honest)
    other = make_device(other_contributor)
    (lease,) = workunit_lease(device=other.device, max_units=1)
    second = Result.objects.select_related("unit").get(pk=lease.result_id)
    assert second.unit_id == leased.unit_id
    sha = upload(make_output(honest_output(second.unit)), device=other.device)

    with django_capture_on_commit_callbacks(execute=True):
        response = post_report(other, second, sha)

    assert response.status_code == 200, response.json()
    assert WorkUnit.objects.get(pk=leased.unit_id).need_validate is True
    assert enqueued == [("workunits.validate_waiting", ())]  # it validates every unit waiting, this one among them


def test_an_output_uploaded_through_the_api_can_be_reported(leased, device, make_output, honest_output):
    client = device.client()
    uploaded = client.post("/api/v1/artifacts/", data=make_output(honest_output(leased.unit)),
                           content_type="application/octet-stream")
    sha = uploaded.json()["sha256"]

    response = post_report(device, leased, sha)

    assert (uploaded.status_code, response.status_code) == (201, 200)
    leased.refresh_from_db()
    assert (leased.state, leased.output_id) == (Result.State.REPORTED, sha)


def test_it_refuses_a_signature_by_another_key(leased, honest, device, make_device, cheater):
    forged = make_device(cheater).sign(leased, honest)

    response = post_report(device, leased, honest, signature=forged)

    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"signature": "invalid"}
    assert_nothing_reported(leased)


def test_it_refuses_a_signature_that_is_not_base64(leased, honest, device):
    response = post_report(device, leased, honest, signature="not base64!")

    assert response.status_code == 400
    assert_nothing_reported(leased)


def test_it_refuses_a_signature_replayed_from_another_lease(job, device, upload, make_output, honest_output):
    # units #0 and #1 both have 4 rows, so the first unit's output is well-formed for the second
    first, second = (Result.objects.get(pk=lease.result_id) for lease in workunit_lease(device=device.device,
                                                                                          max_units=2))
    sha = upload(make_output(honest_output(first.unit)), device=device.device)

    response = post_report(device, second, sha, signature=device.sign(first, sha))

    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"signature": "invalid"}
    assert_nothing_reported(second)


def test_it_refuses_a_signature_made_for_another_output(leased, honest, device, upload, make_output, honest_output):
    other = upload(make_output(honest_output(leased.unit) + 1), device=device.device)

    response = post_report(device, leased, honest, signature=device.sign(leased, other))

    assert response.status_code == 400
    assert_nothing_reported(leased)


def test_it_refuses_a_report_for_a_unit_leased_to_another_device(leased, honest, make_device, other_contributor):
    intruder = make_device(other_contributor)

    response = post_report(intruder, leased, honest)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert_nothing_reported(leased)


def test_it_refuses_a_report_for_an_unknown_result(device, job):
    response = device.client().post(report_url(999_999), {"output_sha256": "0" * 64, "signature": "AA=="},
                                    format="json")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_it_refuses_a_report_after_the_lease_ran_out(leased, honest, device):
    Result.objects.filter(pk=leased.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    response = post_report(device, leased, honest)

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "lease_expired"
    assert_nothing_reported(leased)


def test_it_refuses_a_report_for_a_lease_the_sweep_expired(leased, honest, device):
    Result.objects.filter(pk=leased.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    leases_expire()

    response = post_report(device, leased, honest)

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "lease_expired"
    leased.refresh_from_db()
    assert (leased.state, leased.output_id) == (Result.State.EXPIRED, None)


def test_it_refuses_a_second_report(leased, honest, device):
    assert post_report(device, leased, honest).status_code == 200

    response = post_report(device, leased, honest)

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "already_reported"


def test_it_refuses_an_output_that_was_not_uploaded(leased, device):
    response = post_report(device, leased, "ab" * 32)

    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"output_sha256": "not uploaded by this device"}
    assert_nothing_reported(leased)


def test_attack_a_device_cannot_report_an_output_another_device_uploaded(
    leased, device, make_device, other_contributor, upload, make_output, honest_output
):
    # Before: naming the sha256 of an honest device's output, signed with its own key, was accepted as
    # valid and paid: a free ride on someone else's work. A report needs possession of the bytes.
    honest = make_device(other_contributor)
    sha = upload(make_output(honest_output(leased.unit)), device=honest.device)

    response = post_report(device, leased, sha)

    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"output_sha256": "not uploaded by this device"}
    assert_nothing_reported(leased)


def test_two_devices_that_uploaded_the_same_bytes_may_both_report_them(
    job, device, make_device, other_contributor, upload, make_output, honest_output
):
    # Honest devices of one hardware class compute the very same bytes: each uploads them, each holds them.
    (mine,) = workunit_lease(device=device.device, max_units=1)
    other = make_device(other_contributor)
    (theirs,) = workunit_lease(device=other.device, max_units=1)
    unit = WorkUnit.objects.get(pk=mine.unit_id)
    assert theirs.unit_id == unit.pk
    output = make_output(honest_output(unit))
    for enrolled, lease in ((device, mine), (other, theirs)):
        sha = upload(output, device=enrolled.device)
        result = Result.objects.get(pk=lease.result_id)
        assert post_report(enrolled, result, sha).status_code == 200


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_it_refuses_an_output_holding_nan_or_infinity(leased, device, upload, make_output, honest_output, value):
    y = honest_output(leased.unit)
    y[0, 0] = value
    sha = upload(make_output(y), device=device.device)

    response = post_report(device, leased, sha)

    assert response.status_code == 400
    assert "NaN or infinity" in response.json()["error"]["message"]
    assert_nothing_reported(leased)


def test_a_job_may_allow_nan_in_its_outputs(submit_job, make_device, contributor, upload, make_output, honest_output):
    submit_job(rows=4, rows_per_unit=4, allow_nonfinite=True)
    device = make_device(contributor)
    (lease,) = workunit_lease(device=device.device, max_units=1)
    result = Result.objects.select_related("unit").get(pk=lease.result_id)
    y = honest_output(result.unit)
    y[:] = np.nan
    sha = upload(make_output(y), device=device.device)

    assert post_report(device, result, sha).status_code == 200


@pytest.mark.parametrize("metrics, field", [
    ({"disputes_known_answer": 999999}, "metrics.disputes_known_answer"),
    ({"audit": True}, "metrics.audit"),
    ({"__train_loss__": 1.0}, "metrics.__train_loss__"),
    ({"loss": {"nested": 1}}, "metrics.loss"),
    ({"loss": [1, 2]}, "metrics.loss"),
    ({"note": "x" * 300}, "metrics.note"),
    ({"big": 2**70}, "metrics.big"),
], ids=["the old dispute marker", "reserved", "underscore", "nested", "a list", "long text", "huge int"])
def test_metrics_are_information_only(leased, honest, device, metrics, field):
    # Before: a device's free-form metrics could name the server's dispute marker: a bogus value stuck jobs
    # for good, and the id of a real unit got a wrong answer accepted into a completed job's output.
    response = post_report(device, leased, honest, metrics=metrics)

    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert_nothing_reported(leased)


def test_metrics_are_bounded_in_size(leased, honest, device):
    metrics = {f"m{i}": "x" * 200 for i in range(30)}  # 30 keys of 200 characters: ~6 KB

    response = post_report(device, leased, honest, metrics=metrics)

    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {"metrics": "too large"}
    assert_nothing_reported(leased)


def test_plain_metrics_are_stored_as_information(leased, honest, device):
    response = post_report(device, leased, honest, metrics={"loss": 0.25, "batches": 4, "device": "cpu", "ok": True})

    assert response.status_code == 200
    leased.refresh_from_db()
    assert leased.metrics == {"loss": 0.25, "batches": 4, "device": "cpu", "ok": True}
    assert leased.disputes_known_answer_id is None


@pytest.mark.parametrize("output", [
    np.zeros((4, 2), dtype=np.float32),
    np.zeros((3, 3), dtype=np.float32),
    np.zeros((4, 3), dtype=np.float64),
    np.zeros((4, 3), dtype=np.int64),
], ids=["too few columns", "too few rows", "float64", "int64"])
def test_it_refuses_an_output_of_the_wrong_shape_or_dtype(leased, device, upload, make_output, output):
    sha = upload(make_output(output), device=device.device)

    response = post_report(device, leased, sha)

    assert response.status_code == 400
    assert "output_sha256" in response.json()["error"]["fields"]
    assert_nothing_reported(leased)


def test_it_refuses_an_output_whose_tensor_has_another_name(leased, device, upload, make_output):
    sha = upload(make_output(np.zeros((4, 3), dtype=np.float32), name="logits"), device=device.device)

    response = post_report(device, leased, sha)

    assert response.status_code == 400
    assert_nothing_reported(leased)


def test_it_refuses_an_output_that_is_not_safetensors(leased, device, upload):
    sha = upload(b"\x80\x04not safetensors at all", device=device.device)

    response = post_report(device, leased, sha)

    assert response.status_code == 400
    assert_nothing_reported(leased)


def test_it_refuses_negative_elapsed_seconds(leased, honest, device):
    response = post_report(device, leased, honest, elapsed_seconds=-1)

    assert response.status_code == 400
    assert "elapsed_seconds" in response.json()["error"]["fields"]
    assert_nothing_reported(leased)


# --- fail -----------------------------------------------------------------------------------------

def test_giving_up_frees_the_unit_for_another_device(leased, device, make_device, other_contributor):
    response = device.client().post(fail_url(leased.pk), {"error": "out of memory"}, format="json")

    assert response.status_code == 200
    assert response.json() == {"state": "client_error"}
    leased.refresh_from_db()
    assert (leased.state, leased.error) == (Result.State.CLIENT_ERROR, "out of memory")
    unit = WorkUnit.objects.get(pk=leased.unit_id)
    assert unit.results_created == 2  # a give-up is no answer: the cap of results is untouched
    assert unit.results.filter(state=Result.State.UNSENT).count() == 2
    others = workunit_lease(device=make_device(other_contributor).device, max_units=64)
    assert unit.pk in [lease.unit_id for lease in others]


def test_a_device_cannot_give_up_another_devices_lease(leased, make_device, other_contributor):
    response = make_device(other_contributor).client().post(fail_url(leased.pk), {"error": "nope"}, format="json")

    assert response.status_code == 403
    assert_nothing_reported(leased)
    assert WorkUnit.objects.get(pk=leased.unit_id).results_created == 2


def test_giving_up_a_reported_result_is_refused(leased, honest, device):
    post_report(device, leased, honest)

    response = device.client().post(fail_url(leased.pk), {"error": "changed my mind"}, format="json")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "already_reported"
    leased.refresh_from_db()
    assert leased.state == Result.State.REPORTED
