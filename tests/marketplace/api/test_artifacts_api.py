"""POST /api/v1/artifacts/ and GET /api/v1/artifacts/{sha256}/."""

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.artifacts.models import Artifact
from marketplace.jobs.models import Job
from marketplace.workunits.leasing import leases_expire, workunit_lease
from marketplace.workunits.models import Result
from tests.conftest import stored_bytes

UPLOAD = "/api/v1/artifacts/"
BLOB = b"idlegrid artifact bytes " * 100


def download_url(sha):
    return f"/api/v1/artifacts/{sha}/"


def body_of(response):
    return b"".join(response.streaming_content)


def stored_files(root):
    return sorted(path for path in root.rglob("*") if path.is_file())


def post_bytes(client, data, **headers):
    return client.post(UPLOAD, data=data, content_type="application/octet-stream", **headers)


def test_it_stores_an_upload_under_its_sha256(api, submitter):
    response = post_bytes(api(submitter), BLOB)

    sha = hashlib.sha256(BLOB).hexdigest()
    assert response.status_code == 201
    assert response.json() == {"sha256": sha, "size": len(BLOB)}
    assert stored_bytes(sha) == BLOB
    artifact = Artifact.objects.get()
    assert (artifact.sha256, artifact.size, artifact.uploaded_by) == (sha, len(BLOB), submitter)


def test_uploading_the_same_bytes_twice_stores_nothing_new(api, submitter, artifact_dir):
    client = api(submitter)

    first = post_bytes(client, BLOB)
    second = post_bytes(client, BLOB)

    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json() == second.json()
    assert Artifact.objects.count() == 1
    sha = first.json()["sha256"]
    assert stored_files(artifact_dir) == [artifact_dir / sha[:2] / sha[2:4] / sha]  # the layout on disk, unchanged


def test_it_accepts_a_matching_declared_sha256(api, submitter):
    response = post_bytes(api(submitter), BLOB, HTTP_X_CONTENT_SHA256=hashlib.sha256(BLOB).hexdigest())

    assert response.status_code == 201


def test_it_refuses_a_declared_sha256_that_differs_and_keeps_nothing(api, submitter, artifact_dir):
    response = post_bytes(api(submitter), BLOB, HTTP_X_CONTENT_SHA256=hashlib.sha256(b"other").hexdigest())

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"
    assert Artifact.objects.count() == 0
    assert stored_files(artifact_dir) == []


def test_it_refuses_a_declared_sha256_that_is_not_hex(api, submitter, artifact_dir):
    response = post_bytes(api(submitter), BLOB, HTTP_X_CONTENT_SHA256="not-a-hash")

    assert response.status_code == 400
    assert Artifact.objects.count() == 0
    assert stored_files(artifact_dir) == []


def test_it_refuses_an_upload_past_the_size_limit_and_keeps_nothing(api, submitter, settings, artifact_dir):
    settings.IDLEGRID_MAX_ARTIFACT_BYTES = 1024

    response = post_bytes(api(submitter), b"x" * 1025)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert Artifact.objects.count() == 0
    assert stored_files(artifact_dir) == []


def test_it_refuses_an_upload_without_a_body_and_keeps_nothing(api, submitter, artifact_dir):
    response = post_bytes(api(submitter), b"")

    assert response.status_code == 400
    assert "the body is empty" in response.json()["error"]["message"]
    assert Artifact.objects.count() == 0
    assert stored_files(artifact_dir) == []


def test_it_accepts_an_upload_of_exactly_the_size_limit(api, submitter, settings):
    settings.IDLEGRID_MAX_ARTIFACT_BYTES = 1024

    response = post_bytes(api(submitter), b"x" * 1024)

    assert response.status_code == 201


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "multipart/form-data; boundary=x"])
def test_it_refuses_an_upload_of_another_content_type(api, submitter, artifact_dir, content_type):
    response = api(submitter).post(UPLOAD, data=b"{}", content_type=content_type)

    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert Artifact.objects.count() == 0
    assert stored_files(artifact_dir) == []


def test_it_refuses_anonymous_uploads(api, artifact_dir):
    response = post_bytes(api(), BLOB)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert Artifact.objects.count() == 0


def test_a_device_upload_is_recorded_as_the_devices(make_device, contributor):
    device = make_device(contributor)

    response = post_bytes(device.client(), BLOB)

    assert response.status_code == 201
    artifact = Artifact.objects.get()
    assert artifact.uploaded_by is None
    assert artifact.uploaded_by_device == device.device


def test_the_uploader_downloads_their_artifact(api, submitter, upload):
    sha = upload(BLOB, submitter)

    response = api(submitter).get(download_url(sha))

    assert response.status_code == 200
    assert body_of(response) == BLOB
    assert response["X-Content-SHA256"] == sha


def test_another_submitter_cannot_see_that_an_artifact_exists(api, submitter, other_submitter, upload):
    sha = upload(BLOB, submitter)

    response = api(other_submitter).get(download_url(sha))

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_an_unknown_artifact_is_not_found(api, submitter):
    response = api(submitter).get(download_url("0" * 64))

    assert response.status_code == 404


def test_a_submitter_downloads_the_output_of_their_job(api, submitter, upload, make_device, contributor, submit_job):
    job = submit_job()
    device = make_device(contributor)
    output = upload(b"merged output", device=device.device)
    Job.objects.filter(pk=job.pk).update(output=output)  # as job_merge would

    assert api(submitter).get(download_url(output)).status_code == 200


def test_a_device_downloads_the_inputs_of_its_live_lease(submit_job, make_device, contributor):
    submit_job(rows=4, rows_per_unit=4)
    device = make_device(contributor)
    (lease,) = workunit_lease(device=device.device, max_units=1)
    client = device.client()

    for sha in (lease.payload["model"]["weights"], lease.payload["inputs"]["x"]):
        response = client.get(download_url(sha))
        assert response.status_code == 200
        assert hashlib.sha256(body_of(response)).hexdigest() == sha


def test_a_device_without_a_lease_cannot_download_inputs(submit_job, make_device, contributor):
    job = submit_job(rows=4, rows_per_unit=4)
    device = make_device(contributor)

    response = device.client().get(download_url(job.spec["model"]["weights"]))

    assert response.status_code == 404


def test_a_device_cannot_download_the_inputs_of_another_devices_lease(submit_job, make_device, contributor, cheater):
    submit_job(rows=4, rows_per_unit=4)
    (lease,) = workunit_lease(device=make_device(contributor).device, max_units=1)

    response = make_device(cheater).client().get(download_url(lease.payload["inputs"]["x"]))

    assert response.status_code == 404


def test_a_device_cannot_download_the_inputs_of_an_expired_lease(submit_job, make_device, contributor):
    submit_job(rows=4, rows_per_unit=4)
    device = make_device(contributor)
    (lease,) = workunit_lease(device=device.device, max_units=1)
    Result.objects.filter(pk=lease.result_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    client = device.client()

    before_sweep = client.get(download_url(lease.payload["inputs"]["x"]))
    leases_expire()
    after_sweep = client.get(download_url(lease.payload["inputs"]["x"]))

    assert (before_sweep.status_code, after_sweep.status_code) == (404, 404)


def test_a_device_cannot_download_a_submitters_other_uploads(upload, submitter, make_device, contributor):
    sha = upload(BLOB, submitter)

    response = make_device(contributor).client().get(download_url(sha))

    assert response.status_code == 404


def test_a_device_downloads_what_it_uploaded(make_device, contributor, upload):
    device = make_device(contributor)
    sha = upload(BLOB, device=device.device)

    assert device.client().get(download_url(sha)).status_code == 200


def test_a_second_person_uploading_the_same_bytes_may_download_them(api, submitter, other_submitter):
    post_bytes(api(submitter), BLOB)
    again = post_bytes(api(other_submitter), BLOB)

    response = api(other_submitter).get(download_url(again.json()["sha256"]))

    assert again.status_code == 200
    assert response.status_code == 200 and body_of(response) == BLOB
    assert Artifact.objects.count() == 1
