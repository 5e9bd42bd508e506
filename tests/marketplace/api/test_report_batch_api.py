"""POST /api/v1/agent/reports: many reports in one request, each signed and answered on its own, small outputs
inline (docs/protocol.md, "Batched reports")."""

import base64
from datetime import timedelta

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from marketplace.api.v1.agent import REPORTS_MAX_BODY
from marketplace.artifacts.models import Artifact, TensorHeader
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from tests.conftest import stored_bytes
from worker_agent import protocol, wire

REPORTS = "/api/v1/agent/reports"


@pytest.fixture
def device(make_device, contributor):
    return make_device(contributor)


@pytest.fixture
def leases(submit_job, device):
    """The device's leases on the six units of a job (one replica of each: quorum 2, so none is due alone)."""
    submit_job(rows=24, rows_per_unit=4)
    leased = workunit_lease(device=device.device, max_units=64)
    assert len(leased) == 6
    return [Result.objects.select_related("unit").get(pk=lease.result_id) for lease in leased]


def item(device, result, output: bytes, *, inline=True, **extra):
    sha = protocol.sha256_hex(output)
    body = {"result_id": result.pk, "output_sha256": sha, "signature": device.sign(result, sha), "elapsed_seconds": 0.5}
    if inline:
        body["output"] = base64.b64encode(output).decode()
    return {**body, **extra}


def post(device, reports):
    return device.client().post(REPORTS, {"reports": reports}, format="json")


def honest(make_output, honest_output, result):
    return make_output(honest_output(result.unit))


def states(*results):
    return [Result.objects.get(pk=result.pk).state for result in results]


def test_a_batch_reports_every_good_item_and_stores_the_inline_outputs(leases, device, make_output, honest_output):
    outputs = [honest(make_output, honest_output, result) for result in leases]

    response = post(device, [item(device, result, out) for result, out in zip(leases, outputs)])

    assert response.status_code == 200
    assert response.json() == {"results": [{"result_id": r.pk, "state": "reported"} for r in leases]}
    assert states(*leases) == [Result.State.REPORTED] * 6
    for result, out in zip(leases, outputs):
        result.refresh_from_db()
        sha = protocol.sha256_hex(out)
        assert (result.output_id, result.elapsed_seconds) == (sha, 0.5)
        assert stored_bytes(sha) == out  # stored content-addressed, as an upload would
        assert Artifact.devices.through.objects.filter(artifact_id=sha, device_id=device.pk).exists()
        assert TensorHeader.objects.filter(pk=sha).exists()


def test_the_answer_reads_as_the_agent_reads_it(leases, device, make_output, honest_output):
    response = post(device, [item(device, leases[0], honest(make_output, honest_output, leases[0]))])

    answer = wire.ReportBatchAnswer.from_wire(response.json())
    assert [(o.result_id, o.state, o.error) for o in answer.results] == [(leases[0].pk, "reported", None)]


def test_one_bad_item_fails_only_itself(leases, device, make_device, other_contributor, make_output, honest_output,
                                         make_dataset):
    good, forged, expired, reported, mismatched, not_tensor = leases
    Result.objects.filter(pk=expired.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert post(device, [item(device, reported, honest(make_output, honest_output, reported))]).json()[
        "results"][0]["state"] == "reported"
    other = make_device(other_contributor)
    (theirs,) = workunit_lease(device=other.device, max_units=1)
    junk = b"\x80\x04not safetensors at all"
    bad_hash = item(device, mismatched, honest(make_output, honest_output, mismatched))
    bad_hash["output"] = base64.b64encode(b"other bytes").decode()
    reports = [
        item(device, good, honest(make_output, honest_output, good)),
        item(device, forged, honest(make_output, honest_output, forged), signature=other.sign(forged, "ab" * 32)),
        item(device, Result.objects.get(pk=theirs.result_id), honest(make_output, honest_output, good)),
        item(device, expired, honest(make_output, honest_output, expired)),
        item(device, reported, honest(make_output, honest_output, reported)),
        bad_hash,
        item(device, not_tensor, junk),
        {**item(device, not_tensor, junk), "result_id": 999_999},
    ]

    response = post(device, reports)

    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["result_id"] for r in results] == [r["result_id"] for r in reports]  # in request order
    assert results[0] == {"result_id": good.pk, "state": "reported"}
    codes = [r.get("error", {}).get("code") for r in results[1:]]
    assert codes == ["invalid", "forbidden", "lease_expired", "already_reported", "invalid", "invalid", "not_found"]
    assert results[1]["error"]["fields"] == {"signature": "invalid"}
    assert results[5]["error"]["fields"] == {"output": "does not match output_sha256"}
    assert "not a safetensors file" in results[6]["error"]["message"]
    assert states(good, forged, expired, mismatched, not_tensor) == [
        Result.State.REPORTED, Result.State.IN_PROGRESS, Result.State.IN_PROGRESS, Result.State.IN_PROGRESS,
        Result.State.IN_PROGRESS]
    assert Result.objects.get(pk=theirs.result_id).state == Result.State.IN_PROGRESS
    # Refused items store nothing: not the junk, not the bytes that did not match their hash.
    assert not Artifact.objects.filter(pk__in=[protocol.sha256_hex(junk), protocol.sha256_hex(b"other bytes")]).exists()


@pytest.mark.parametrize("y, problem", [
    (np.full((4, 3), np.nan, dtype=np.float32), "NaN or infinity"),
    (np.zeros((4, 2), dtype=np.float32), "expected F32[4, 3]"),
], ids=["nan", "wrong shape"])
def test_an_inline_output_passes_the_checks_an_upload_passes(leases, device, make_output, y, problem):
    response = post(device, [item(device, leases[0], make_output(y))])

    (outcome,) = response.json()["results"]
    assert outcome["error"]["code"] == "invalid"
    assert problem in outcome["error"]["message"]
    assert states(leases[0]) == [Result.State.IN_PROGRESS]


def test_an_oversized_inline_output_is_refused_alone(leases, device, make_output, honest_output):
    big = b"\0" * (protocol.MAX_INLINE_OUTPUT_BYTES + 1)
    oversized = {**item(device, leases[1], big)}

    response = post(device, [item(device, leases[0], honest(make_output, honest_output, leases[0])), oversized])

    first, second = response.json()["results"]
    assert first["state"] == "reported"
    assert second["error"]["code"] == "invalid"
    assert "output" in second["error"]["fields"]
    assert states(leases[1]) == [Result.State.IN_PROGRESS]


def test_uploaded_outputs_are_reported_in_the_same_batch(leases, device, upload, make_output, honest_output,
                                                         make_device, other_contributor):
    mine = honest(make_output, honest_output, leases[0])
    upload(mine, device=device.device)
    theirs = honest(make_output, honest_output, leases[1])
    upload(theirs, device=make_device(other_contributor).device)  # possession is the device's own

    response = post(device, [item(device, leases[0], mine, inline=False), item(device, leases[1], theirs, inline=False),
                             item(device, leases[2], honest(make_output, honest_output, leases[2]))])

    results = response.json()["results"]
    assert [r.get("state") for r in results] == ["reported", None, "reported"]
    assert results[1]["error"]["fields"] == {"output_sha256": "not uploaded by this device"}


@pytest.mark.parametrize("body", [
    {"reports": {}},
    {"reports": []},
    {"reports": ["not an object"]},
    {"reports": [{"output_sha256": "ab" * 32}]},
    {"reports": [{"result_id": True}]},
    {"reports": [{"result_id": 1}] * 2},
    {"reports": [{"result_id": i} for i in range(1, protocol.MAX_REPORT_BATCH + 2)]},
    {"reports": [], "extra": 1},
], ids=["not a list", "empty", "an item not an object", "no result_id", "a bool id", "a duplicate", "too many",
        "an unknown member"])
def test_a_malformed_envelope_is_refused_whole_and_changes_nothing(leases, device, body):
    if body["reports"] == [{"result_id": 1}] * 2:
        body = {"reports": [{"result_id": leases[0].pk}] * 2}

    response = device.client().post(REPORTS, body, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"
    assert states(*leases) == [Result.State.IN_PROGRESS] * 6


def test_a_good_item_in_a_malformed_envelope_is_not_reported(leases, device, make_output, honest_output):
    good = item(device, leases[0], honest(make_output, honest_output, leases[0]))

    response = post(device, [good, good])

    assert response.status_code == 400
    assert states(leases[0]) == [Result.State.IN_PROGRESS]
    assert not Artifact.objects.filter(pk=good["output_sha256"]).exists()


def test_the_body_limit_admits_a_full_batch_of_the_largest_outputs_and_no_more(device, settings):
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE is None or settings.DATA_UPLOAD_MAX_MEMORY_SIZE < REPORTS_MAX_BODY
    largest = "A" * wire.MAX_INLINE_OUTPUT_BASE64
    full = [{"result_id": i, "output_sha256": "ab" * 32, "signature": "A" * 88, "elapsed_seconds": 1.0,
             "metrics": {f"m{k}": "x" * 100 for k in range(32)}, "output": largest}
            for i in range(1, protocol.MAX_REPORT_BATCH + 1)]

    admitted = post(device, full)  # parsed and judged (unknown results), not refused for its size
    too_large = device.client().post(REPORTS, b"[" + b" " * REPORTS_MAX_BODY + b"]", content_type="application/json")

    assert admitted.status_code == 200
    assert {r["error"]["code"] for r in admitted.json()["results"]} == {"not_found"}
    assert too_large.status_code == 413


def test_the_units_whose_quorum_the_batch_completes_wait_for_validation_with_one_message(
    submit_job, make_device, contributor, other_contributor, make_output, honest_output, enqueued,
    django_capture_on_commit_callbacks,
):
    submit_job(rows=12, rows_per_unit=4)  # three units, two replicas each
    first, second = make_device(contributor), make_device(other_contributor)
    mine = workunit_lease(device=first.device, max_units=64)
    theirs = workunit_lease(device=second.device, max_units=64)
    assert len(mine) == len(theirs) == 3

    def report_all(enrolled, leased):
        results = [Result.objects.select_related("unit").get(pk=lease.result_id) for lease in leased]
        return post(enrolled, [item(enrolled, r, honest(make_output, honest_output, r)) for r in results])

    with django_capture_on_commit_callbacks(execute=True):
        report_all(first, mine)
    assert enqueued == []  # each unit waits for its quorum
    assert WorkUnit.objects.filter(need_validate=True).count() == 0
    with django_capture_on_commit_callbacks(execute=True):
        report_all(second, theirs)

    # Before: one workunits.validate message per unit. One message validates every unit waiting.
    assert enqueued == [("workunits.validate_waiting", ())]
    assert set(WorkUnit.objects.filter(need_validate=True).values_list("pk", flat=True)) == {lease.unit_id for lease in mine}


def test_resending_a_batch_changes_nothing_and_says_each_was_reported(
    leases, device, make_output, honest_output, enqueued, django_capture_on_commit_callbacks
):
    reports = [item(device, result, honest(make_output, honest_output, result)) for result in leases[:3]]
    assert [r["state"] for r in post(device, reports).json()["results"]] == ["reported"] * 3
    reported_at = [Result.objects.get(pk=r.pk).reported_at for r in leases[:3]]
    queued = len(enqueued)

    with django_capture_on_commit_callbacks(execute=True):
        again = post(device, reports)

    assert [r["error"]["code"] for r in again.json()["results"]] == ["already_reported"] * 3
    assert [Result.objects.get(pk=r.pk).reported_at for r in leases[:3]] == reported_at
    assert len(enqueued) == queued


def test_statements_per_batch_do_not_grow_with_its_size(leases, device, make_output, honest_output):
    def statements(results):
        reports = [item(device, r, honest(make_output, honest_output, r)) for r in results]
        with CaptureQueriesContext(connection) as captured:
            assert {r.get("state") for r in post(device, reports).json()["results"]} == {"reported"}
        return len(captured)

    assert statements(leases[:1]) == statements(leases[1:])  # one item, or five
