"""Whole flows with the settings switched to S3 (moto's server on loopback): the API's upload and download,
an inference job from submission to its downloaded output, a fedavg job's rounds, a split that cannot
read its dataset. Every blob must end up in the bucket and none under the artifact folder."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.numpy import load, save
from safetensors.torch import load as load_torch

from marketplace.artifacts.models import Artifact
from marketplace.jobs.models import FedRound, Job
from marketplace.jobs.services import job_merge, job_split, job_submit
from marketplace.jobs.tasks import job_split_task
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import WorkUnit
from marketplace.workunits.verification import unit_validate
from tests.conftest import dataset_array, stored_bytes
from tests.marketplace.jobs.fedavg_helpers import spec_for
from tests.marketplace.jobs.test_fedavg_rounds import compute, expected_round
from worker_agent.architectures import resolve

BLOB = b"idlegrid artifact bytes on s3 " * 1000
# A device of another hardware class than conftest.HARDWARE: its output is compared by tolerance, which
# reads both outputs (identical digests agree without reading anything).
ANOTHER_CLASS = {"os": "linux", "machine": "x86_64", "cpu_capability": "DEFAULT"}


def blob_files(artifact_dir):
    return [path for path in artifact_dir.rglob("*") if path.is_file()]


def post_bytes(client, data):
    return client.post("/api/v1/artifacts/", data=data, content_type="application/octet-stream")


def model_of(spec):
    arch, config = resolve(spec["model"]["architecture"], spec["model"]["config"])
    model = arch.build(config)
    model.load_state_dict(load_torch(stored_bytes(spec["model"]["weights"])))
    return model.eval()


def test_an_upload_through_the_api_lands_in_the_bucket_and_downloads_back(s3, artifact_dir, api, submitter):
    client = api(submitter)
    sha = hashlib.sha256(BLOB).hexdigest()

    first, again = post_bytes(client, BLOB), post_bytes(client, BLOB)
    download = client.get(f"/api/v1/artifacts/{sha}/")

    assert (first.status_code, again.status_code) == (201, 200)
    assert s3.keys() == [s3.key_of(sha)]
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == BLOB
    assert (download["Content-Length"], download["X-Content-SHA256"]) == (str(len(BLOB)), sha)
    assert blob_files(artifact_dir) == []


def test_an_upload_past_the_limit_leaves_the_bucket_empty(s3, settings, api, submitter):
    settings.IDLEGRID_MAX_ARTIFACT_BYTES = 1024

    response = post_bytes(api(submitter), b"x" * 1025)

    assert response.status_code == 413
    assert s3.keys() == []
    assert list(settings.IDLEGRID_STORAGE_TMP_DIR.iterdir()) == []
    assert Artifact.objects.count() == 0


def test_an_inference_job_with_known_answers_runs_from_submission_to_download(
    s3, artifact_dir, api, inference_spec, upload, submitter, make_device, report, honest_output, contributor,
    other_contributor,
):
    spec = inference_spec(rows=8, rows_per_unit=4, adaptive=False)
    model = model_of(spec)
    known_x = dataset_array(5, seed=7)
    with torch.no_grad():
        known_y = model(torch.from_numpy(known_x)).numpy()
    spec |= {"known_answers": upload(save({"x": known_x, "y": np.ascontiguousarray(known_y)}), submitter),
             "known_answers_per_unit": 1}
    job = job_submit(owner=submitter, kind="inference", spec=spec)  # reads the artifacts' headers from S3
    job_split(job_id=job.pk)  # reads the dataset and known answers from S3, stores the slices there

    units = list(WorkUnit.objects.filter(job=job).order_by("index"))
    assert len(units) == 2 and all(len(unit.hidden_rows) == 1 for unit in units)
    for unit in units:
        for owner, hardware, nudge in ((contributor, None, 0.0), (other_contributor, ANOTHER_CLASS, 1e-7)):
            device = make_device(owner, name=f"{owner.username}-{unit.pk}", hardware=hardware)
            (lease,) = workunit_lease(device=device.device, max_units=1)
            assert lease.unit_id == unit.pk
            report(device, lease.result_id, honest_output(unit) + nudge)  # checked as read back from S3
        assert unit_validate(unit_id=unit.pk) == "done"  # compared, and against the known rows, from S3
    job = job_merge(job_id=job.pk)
    response = api(submitter).get(f"/api/v1/jobs/{job.pk}/output/")

    assert job.state == Job.State.COMPLETED and response.status_code == 200
    merged = load(b"".join(response.streaming_content))["y"]
    with torch.no_grad():
        expected = model(torch.from_numpy(load(stored_bytes(spec["dataset"]))["x"])).numpy()
    assert merged.shape == (8, 3)  # the known rows left out
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
    assert s3.key_of(job.output_id) in s3.keys()
    assert len(s3.keys()) == Artifact.objects.count()
    assert blob_files(artifact_dir) == []


def test_a_fedavg_job_aggregates_its_rounds_from_the_bucket(s3, artifact_dir, upload, submitter, make_device,
                                                            contributor, other_contributor, tmp_path):
    devices = [make_device(contributor, name="alice-box"), make_device(other_contributor, name="bob-box")]
    job = job_submit(owner=submitter, kind="fedavg", spec=spec_for(upload, submitter, rounds=2))
    job_split(job_id=job.pk)

    compute(devices, upload, tmp_path)
    job = job_merge(job_id=job.pk)
    first = FedRound.objects.get(job=job, index=0)
    new, (eval_loss, eval_accuracy) = expected_round(job, 0)
    compute(devices, upload, tmp_path)
    job = job_merge(job_id=job.pk)

    stored = load(stored_bytes(first.weights_out_id))
    assert set(stored) == set(new) and all(np.array_equal(stored[k], new[k]) for k in new)
    assert (first.eval_loss, first.eval_accuracy) == pytest.approx((eval_loss, eval_accuracy))
    assert job.state == Job.State.COMPLETED
    assert job.output_id == FedRound.objects.get(job=job, index=1).weights_out_id
    assert s3.key_of(job.output_id) in s3.keys()
    assert blob_files(artifact_dir) == []


def test_a_split_whose_dataset_is_gone_from_the_bucket_fails_the_job(s3, submit_job):
    job = submit_job(split=False)
    s3.client.delete_object(Bucket=s3.name, Key=s3.key_of(job.spec["dataset"]))

    with pytest.raises(FileNotFoundError):
        job_split_task(job.pk)

    job.refresh_from_db()
    assert job.state == Job.State.FAILED
    assert WorkUnit.objects.filter(job=job).count() == 0
