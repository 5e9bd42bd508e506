"""job_merge: the canonical outputs, concatenated in unit order, become the job's one output."""

import numpy as np
import pytest
from safetensors.numpy import load

from marketplace.artifacts.models import Artifact
from marketplace.jobs.lifecycle import job_merge_if_done
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_merge
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import WorkUnit
from marketplace.workunits.verification import unit_validate
from tests.conftest import stored_bytes


@pytest.fixture
def computed_job(submit_job, make_device, report, contributor, other_contributor):
    """A 10-row job in 3 units, each reported honestly by two owners and validated: the job is merging."""
    job = submit_job(rows=10, rows_per_unit=4, batch_size=3)
    for owner in (contributor, other_contributor):
        device = make_device(owner)
        for lease in workunit_lease(device=device.device, max_units=64):
            report(device, lease.result_id)
    for unit in WorkUnit.objects.filter(job=job):
        unit_validate(unit_id=unit.pk)
    job.refresh_from_db()
    return job


def canonical_outputs(job):
    return [
        load(stored_bytes(unit.canonical_result.output_id))["y"]
        for unit in WorkUnit.objects.filter(job=job).select_related("canonical_result").order_by("index")
    ]


def test_a_job_whose_units_are_all_done_is_merging(computed_job):
    assert computed_job.state == Job.State.MERGING


def test_the_merged_output_is_the_canonical_outputs_in_unit_order(computed_job):
    job = job_merge(job_id=computed_job.pk)

    assert job.state == Job.State.COMPLETED
    assert job.finished_at is not None
    merged = load(stored_bytes(job.output_id))
    assert list(merged) == ["y"]
    assert merged["y"].dtype == np.float32
    assert merged["y"].shape == (10, 3)
    np.testing.assert_array_equal(merged["y"], np.concatenate(canonical_outputs(job)))


def test_the_merged_output_is_the_model_applied_to_the_dataset_in_order(computed_job):
    import torch
    from safetensors.torch import load as load_tensors

    from worker_agent.architectures import resolve

    job = job_merge(job_id=computed_job.pk)

    arch, config = resolve(job.spec["model"]["architecture"], job.spec["model"]["config"])
    model = arch.build(config)
    model.load_state_dict(load_tensors(stored_bytes(job.spec["model"]["weights"])))
    with torch.no_grad():
        expected = model(torch.from_numpy(load(stored_bytes(job.spec["dataset"]))["x"])).numpy()
    merged = load(stored_bytes(job.output_id))["y"]
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)


def test_merging_twice_gives_one_output(computed_job):
    first = job_merge(job_id=computed_job.pk)
    artifacts = Artifact.objects.count()

    second = job_merge(job_id=computed_job.pk)

    assert (second.state, second.output_id, second.finished_at) == (first.state, first.output_id, first.finished_at)
    assert Artifact.objects.count() == artifacts


def test_it_does_not_merge_a_running_job(submit_job):
    job = submit_job(rows=10, rows_per_unit=4)

    job_merge_if_done(job_id=job.pk)
    merged = job_merge(job_id=job.pk)

    assert merged.state == Job.State.RUNNING
    assert merged.output_id is None


def test_the_output_endpoint_answers_409_until_the_job_completed_then_the_bytes(computed_job, api, submitter):
    client = api(submitter)
    url = f"/api/v1/jobs/{computed_job.pk}/output/"

    before = client.get(url)
    job = job_merge(job_id=computed_job.pk)
    after = client.get(url)

    assert before.status_code == 409
    assert before.json()["error"]["code"] == "conflict"
    assert after.status_code == 200
    assert b"".join(after.streaming_content) == stored_bytes(job.output_id)
    assert f"job-{job.pk}-output.safetensors" in after["Content-Disposition"]


def test_another_submitter_cannot_fetch_the_output(computed_job, api, other_submitter):
    job_merge(job_id=computed_job.pk)

    response = api(other_submitter).get(f"/api/v1/jobs/{computed_job.pk}/output/")

    assert response.status_code == 404


def test_the_job_reports_its_progress_and_output(computed_job, api, submitter):
    job = job_merge(job_id=computed_job.pk)

    body = api(submitter).get(f"/api/v1/jobs/{job.pk}/").json()

    assert body["state"] == "completed"
    assert body["output_sha256"] == job.output_id
    assert (body["units_total"], body["units_done"], body["units_error"]) == (3, 3, 0)
    assert (body["results_valid"], body["results_invalid"], body["results_per_unit"]) == (6, 0, 2.0)
