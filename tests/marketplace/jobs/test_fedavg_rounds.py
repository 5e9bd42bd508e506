"""Rounds of a fedavg job: a round's validated updates are aggregated once into the next global weights,
the next round trains those, the last round (or the target metric) completes the job."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load as load_tensors

from marketplace.artifacts.storage import get_storage
from marketplace.jobs import fedavg_math, rounds
from marketplace.jobs.kinds import fedavg
from marketplace.jobs.models import FedRound, Job
from marketplace.jobs.services import job_merge, job_split, job_submit
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.results import result_report
from marketplace.workunits.verification import unit_validate
from tests.conftest import stored_bytes
from tests.marketplace.jobs.fedavg_helpers import honest_update, spec_for


@pytest.fixture
def devices(make_device, contributor, other_contributor):
    return [make_device(contributor, name="alice-box"), make_device(other_contributor, name="bob-box")]


@pytest.fixture
def submit(upload, submitter):
    def make(**spec):
        job = job_submit(owner=submitter, kind="fedavg", spec=spec_for(upload, submitter, **spec))
        job_split(job_id=job.pk)
        return job

    return make


def compute(devices, upload, tmp_path, *, fault_for=None):
    """Every device leases what it can and reports what an agent would (fault_for: device -> fault mode)."""
    for enrolled in devices:
        for lease in workunit_lease(device=enrolled.device, max_units=64):
            result = Result.objects.get(pk=lease.result_id)
            unit = WorkUnit.objects.get(pk=lease.unit_id)
            fault = (fault_for or {}).get(enrolled.device.name)
            sha = upload(honest_update(unit, tmp_path, fault=fault, fault_seed=result.pk), device=enrolled.device)
            result_report(device=enrolled.device, result_id=result.pk, output_sha256=sha,
                          signature_b64=enrolled.sign(result, sha))
    for unit_id in WorkUnit.objects.filter(need_validate=True).values_list("pk", flat=True):
        unit_validate(unit_id=unit_id)


def expected_round(job, index):
    """The aggregate recomputed from the round's canonical updates, and its evaluation."""
    storage, shards = get_storage(), job.spec["shards"]
    units = WorkUnit.objects.filter(job=job, index__gte=index * shards, index__lt=(index + 1) * shards).order_by("index")
    start = load_tensors(stored_bytes(units[0].payload["model"]["weights"]))
    updates = []
    for unit in units:
        with storage.local_path(unit.canonical_result.output_id) as path:
            updates.append(fedavg.read_update(path)[0])
    new = fedavg_math.aggregate(start, updates, [u.payload["samples"] for u in units], method="mean")
    held_out = load_tensors(stored_bytes(job.spec["eval_dataset"]))
    return new, fedavg_math.evaluate("mlp", job.spec["model"]["config"], new, held_out["x"], held_out["y"])


def test_a_round_whose_units_are_decided_is_aggregated_into_the_next_rounds_weights(submit, devices, upload, tmp_path):
    job = submit()
    compute(devices, upload, tmp_path)
    assert Job.objects.get(pk=job.pk).state == Job.State.MERGING

    job = job_merge(job_id=job.pk)

    done = FedRound.objects.get(job=job, index=0)
    new, (eval_loss, eval_accuracy) = expected_round(job, 0)
    stored = load_tensors(stored_bytes(done.weights_out_id))
    assert set(stored) == set(new) and all(np.array_equal(stored[k], new[k]) for k in new)
    assert (done.eval_loss, done.eval_accuracy) == pytest.approx((eval_loss, eval_accuracy))
    assert done.samples == 60 and len(done.updates) == 3
    next_units = WorkUnit.objects.filter(job=job, index__gte=3).order_by("index")
    assert [u.payload["round"] for u in next_units] == [1, 1, 1]
    assert all(u.payload["model"]["weights"] == done.weights_out_id for u in next_units)
    assert (job.state, job.units_total) == (Job.State.RUNNING, 6)


def test_the_last_round_completes_the_job_with_the_final_weights_as_its_output(submit, devices, upload, tmp_path):
    job = submit(rounds=2)
    for _ in range(2):
        compute(devices, upload, tmp_path)
        job = job_merge(job_id=job.pk)

    assert job.state == Job.State.COMPLETED
    last = FedRound.objects.get(job=job, index=1)
    assert job.output_id == last.weights_out_id
    assert FedRound.objects.filter(job=job).count() == 2 and WorkUnit.objects.filter(job=job).count() == 6
    assert last.eval_accuracy > FedRound.objects.get(job=job, index=0).eval_accuracy - 0.2  # it trains, not diverges


def test_reaching_the_target_metric_stops_the_job_early(submit, devices, upload, tmp_path):
    job = submit(rounds=5, target={"metric": "loss", "value": 100.0})
    compute(devices, upload, tmp_path)

    job = job_merge(job_id=job.pk)

    assert job.state == Job.State.COMPLETED
    assert FedRound.objects.filter(job=job).count() == 1 and WorkUnit.objects.filter(job=job).count() == 3


def test_aggregating_a_round_twice_yields_one_set_of_global_weights(submit, devices, upload, tmp_path):
    job = submit(rounds=3)
    compute(devices, upload, tmp_path)

    first = job_merge(job_id=job.pk)
    again = job_merge(job_id=job.pk)  # a redelivered task
    rounds.round_aggregate(job_id=job.pk)

    assert first.state == again.state == Job.State.RUNNING
    assert FedRound.objects.filter(job=job).count() == 1
    assert WorkUnit.objects.filter(job=job).count() == 6


def test_two_aggregations_racing_on_a_round_commit_one_and_the_next_round_trains_it(
    submit, devices, upload, tmp_path, monkeypatch
):
    # With DP noise from the OS the two runs compute different weights: only one may ever be used.
    job = submit(rounds=3, dp={"clip_norm": 1.0, "noise_multiplier": 0.5})
    compute(devices, upload, tmp_path)
    real_compute, raced = rounds._compute, []

    def compute_then_lose_the_race(job, index):
        aggregated = real_compute(job, index)
        if not raced:
            raced.append(aggregated.weights_out.sha256)
            rounds.round_aggregate(job_id=job.pk)  # the other worker commits while this one computed
        return aggregated

    monkeypatch.setattr(rounds, "_compute", compute_then_lose_the_race)

    rounds.round_aggregate(job_id=job.pk)

    recorded = FedRound.objects.get(job=job, index=0)
    assert FedRound.objects.filter(job=job).count() == 1
    assert recorded.weights_out_id != raced[0]  # the loser's weights were computed, never recorded
    next_units = WorkUnit.objects.filter(job=job, index__gte=3)
    assert next_units.count() == 3
    assert {u.payload["model"]["weights"] for u in next_units} == {recorded.weights_out_id}


def test_a_poisoned_update_is_caught_by_the_quorum_and_never_aggregated(
    submit, make_device, contributor, other_contributor, cheater, upload, tmp_path
):
    job = submit(rounds=2)
    mallory = make_device(cheater, name="mallory-box")
    honest = [make_device(contributor, name="alice-box"), make_device(other_contributor, name="bob-box")]
    compute([mallory, honest[0]], upload, tmp_path, fault_for={"mallory-box": "poison"})
    compute([honest[1]], upload, tmp_path)

    job = job_merge(job_id=job.pk)

    poisoned = Result.objects.filter(device=mallory.device)
    assert poisoned.count() == 3 and set(poisoned.values_list("state", flat=True)) == {Result.State.INVALID}
    aggregated = FedRound.objects.get(job=job, index=0).updates
    assert not set(aggregated) & set(poisoned.values_list("pk", flat=True))
    assert set(Result.objects.filter(pk__in=aggregated).values_list("device__name", flat=True)) <= {"alice-box", "bob-box"}


def test_the_rounds_api_shows_per_round_metrics_to_the_submitter_only(
    submit, devices, upload, tmp_path, api, submitter, other_submitter
):
    job = submit(rounds=2, dp={"clip_norm": 5.0, "noise_multiplier": 1.0})
    compute(devices, upload, tmp_path)
    job_merge(job_id=job.pk)

    body = api(submitter).get(f"/api/v1/jobs/{job.pk}/rounds/").json()

    assert body["rounds_planned"] == 2 and len(body["rounds"]) == 1
    first = body["rounds"][0]
    assert first["round"] == 0 and first["updates"] == 3 and 0 <= first["eval_accuracy"] <= 1
    assert body["training"] == {"round": 1, "units_done": 0, "units_total": 3}
    assert body["privacy"]["epsilon"] > 0 and body["privacy"]["noise_multiplier"] == 1.0
    assert api(other_submitter).get(f"/api/v1/jobs/{job.pk}/rounds/").status_code == 404
    weights = api(submitter).get(f"/api/v1/artifacts/{first['weights_sha256']}/")
    assert weights.status_code == 200 and set(load_tensors(b"".join(weights.streaming_content)))


def test_each_validated_update_is_paid_through_the_ledger_and_a_poisoned_one_is_not(
    submit, make_device, contributor, other_contributor, cheater, upload, tmp_path, django_capture_on_commit_callbacks
):
    from marketplace.ledger.selectors import balances_for

    submit(rounds=2)
    mallory = make_device(cheater, name="mallory-box")
    honest = [make_device(contributor, name="alice-box"), make_device(other_contributor, name="bob-box")]
    with django_capture_on_commit_callbacks(execute=True):
        compute([mallory, honest[0]], upload, tmp_path, fault_for={"mallory-box": "poison"})
        compute([honest[1]], upload, tmp_path)

    assert int(balances_for(user=contributor)["earnings_held"]) > 0
    assert int(balances_for(user=other_contributor)["earnings_held"]) == int(balances_for(user=contributor)["earnings_held"])
    assert int(balances_for(user=cheater)["earnings_held"]) == 0
