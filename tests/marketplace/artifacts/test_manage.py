"""Managing artifacts: deleting one (refused while a live job uses it), the per-person storage quota (413
during the upload, nothing stored), and the collection of what nothing references."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from marketplace.artifacts.models import Artifact
from marketplace.artifacts.selectors import artifacts_quota_used
from marketplace.artifacts.services import artifact_store
from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import QuotaExceeded
from marketplace.jobs.artifacts import ROW_REFERENCES, artifacts_collect
from marketplace.jobs.models import Job
from marketplace.workunits.models import Result, WorkUnit

ARTIFACTS = "/api/v1/artifacts/"


def aged(sha256: str, *, days: float = 2) -> None:
    """As if the bytes were last stored `days` ago (past the collection's grace of a day)."""
    Artifact.objects.filter(pk=sha256).update(stored_at=timezone.now() - timedelta(days=days))


def kept(sha256: str) -> bool:
    row, stored = Artifact.objects.filter(pk=sha256).exists(), get_storage().exists(sha256)
    assert row == stored, f"row {row} but bytes {stored}"  # never one without the other
    return row


def job_using(owner, sha256: str, state=Job.State.RUNNING) -> Job:
    return Job.objects.create(owner=owner, kind="inference", spec={"dataset": sha256}, state=state)


def listed(api, person) -> list[str]:
    return [row["sha256"] for row in api(person).get(ARTIFACTS).json()["results"]]


# --- delete --------------------------------------------------------------------------------------

def test_deleting_the_only_holders_artifact_removes_its_row_and_bytes(api, submitter, upload):
    sha = upload(b"mine alone", submitter)

    response = api(submitter).delete(f"{ARTIFACTS}{sha}/")

    assert response.status_code == 204
    assert not kept(sha) and listed(api, submitter) == []


def test_deleting_shared_bytes_only_stops_you_holding_them(api, submitter, other_submitter, upload):
    sha = upload(b"shared", submitter)
    upload(b"shared", other_submitter)

    assert api(submitter).delete(f"{ARTIFACTS}{sha}/").status_code == 204

    assert kept(sha)
    assert listed(api, submitter) == [] and listed(api, other_submitter) == [sha]
    assert api(submitter).get(f"{ARTIFACTS}{sha}/").status_code == 404


@pytest.mark.parametrize("which", ["someone else's", "unknown", "not a sha256"])
def test_deleting_what_you_do_not_hold_is_404_and_changes_nothing(api, submitter, other_submitter, upload, which):
    theirs = upload(b"theirs", other_submitter)
    sha = {"someone else's": theirs, "unknown": hashlib.sha256(b"nothing").hexdigest(), "not a sha256": "x" * 10}[which]

    response = api(submitter).delete(f"{ARTIFACTS}{sha}/")

    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert kept(theirs) and listed(api, other_submitter) == [theirs]


def test_deleting_is_refused_while_a_live_job_of_yours_uses_it_and_allowed_once_it_ended(api, submitter, upload):
    sha = upload(b"a dataset", submitter)
    job = job_using(submitter, sha)

    refused = api(submitter).delete(f"{ARTIFACTS}{sha}/")

    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "artifact_in_use"
    assert refused.json()["error"]["fields"] == {"jobs": [job.pk]} and str(job.pk) in refused.json()["error"]["message"]
    assert listed(api, submitter) == [sha]

    Job.objects.filter(pk=job.pk).update(state=Job.State.COMPLETED, finished_at=timezone.now())
    assert api(submitter).delete(f"{ARTIFACTS}{sha}/").status_code == 204
    # A ban inside the audit window may reopen the ended job, which reads its spec again: kept until then.
    assert kept(sha) and listed(api, submitter) == []


def test_the_unit_inputs_of_a_live_job_are_in_use_too(api, submitter, submit_job, upload):
    job = submit_job(rows=4, rows_per_unit=4)
    weights = job.spec["model"]["weights"]
    Job.objects.filter(pk=job.pk).update(spec={})  # only the unit's inputs name the weights now

    assert api(submitter).delete(f"{ARTIFACTS}{weights}/").json()["error"]["fields"] == {"jobs": [job.pk]}


def test_a_jobs_output_deleted_from_your_list_stays_downloadable_from_the_job(api, submitter, upload):
    sha = upload(b"merged output", submitter)
    job = Job.objects.create(owner=submitter, kind="inference", spec={}, state=Job.State.COMPLETED, output_id=sha)

    assert api(submitter).delete(f"{ARTIFACTS}{sha}/").status_code == 204

    assert kept(sha) and artifacts_quota_used(owner=submitter) == 0
    assert api(submitter).get(f"/api/v1/jobs/{job.pk}/output/").status_code == 200


def test_a_device_cannot_delete(contributor, make_device, upload):
    device = make_device(contributor)
    sha = upload(b"output", device=device.device)

    assert device.client().delete(f"{ARTIFACTS}{sha}/").status_code == 403
    assert kept(sha)


# --- quota ---------------------------------------------------------------------------------------

def test_an_upload_past_the_quota_is_refused_while_it_streams_and_stores_nothing(submitter, settings, backend):
    settings.IDLEGRID_ARTIFACT_QUOTA_BYTES = 10_000
    kept_sha = artifact_store(chunks=[b"a" * 4000], uploaded_by=submitter, quota_of=submitter)[0].sha256
    sent = []

    def chunks():
        for index in range(10):  # 10 000 bytes; 6 000 are left
            sent.append(index)
            yield bytes([index]) * 1000

    with pytest.raises(QuotaExceeded) as refused:
        artifact_store(chunks=chunks(), uploaded_by=submitter, quota_of=submitter)

    assert len(sent) == 7  # refused at the chunk that passed the quota, not after reading everything
    assert "4,000 of 10,000 bytes" in refused.value.message
    assert Artifact.objects.count() == 1 and artifacts_quota_used(owner=submitter) == 4000
    assert backend.leftovers() == []  # the staging file is gone
    assert [name.rsplit("/", 1)[-1] for name in backend.stored()] == [kept_sha]


def test_deleting_removes_the_object_from_the_bucket_too(api, submitter, s3):
    sha = api(submitter).post(ARTIFACTS, b"in a bucket", content_type="application/octet-stream").json()["sha256"]
    assert s3.keys() == [s3.key_of(sha)]

    assert api(submitter).delete(f"{ARTIFACTS}{sha}/").status_code == 204

    assert s3.keys() == [] and not Artifact.objects.filter(pk=sha).exists()


def test_the_api_answers_413_quota_exceeded_with_used_and_quota(api, submitter, settings):
    settings.IDLEGRID_ARTIFACT_QUOTA_BYTES = 3 * 1024 * 1024
    client = api(submitter)
    assert client.post(ARTIFACTS, b"x" * 2 * 1024 * 1024, content_type="application/octet-stream").status_code == 201

    response = client.post(ARTIFACTS, b"y" * 2 * 1024 * 1024, content_type="application/octet-stream")

    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded" and "2,097,152 of 3,145,728 bytes" in error["message"]
    assert error["fields"] == {"used": 2 * 1024 * 1024, "quota": 3 * 1024 * 1024}
    assert Artifact.objects.count() == 1


def test_deleting_frees_quota(api, submitter, settings):
    settings.IDLEGRID_ARTIFACT_QUOTA_BYTES = 2048
    client = api(submitter)
    first = client.post(ARTIFACTS, b"1" * 1500, content_type="application/octet-stream").json()["sha256"]
    assert client.post(ARTIFACTS, b"2" * 1500, content_type="application/octet-stream").status_code == 413

    client.delete(f"{ARTIFACTS}{first}/")

    assert client.post(ARTIFACTS, b"2" * 1500, content_type="application/octet-stream").status_code == 201


def test_bytes_you_hold_already_upload_again_at_full_quota_when_declared(api, submitter, settings):
    settings.IDLEGRID_ARTIFACT_QUOTA_BYTES = 1500
    client = api(submitter)
    data = b"z" * 1500
    assert client.post(ARTIFACTS, data, content_type="application/octet-stream").status_code == 201

    again = client.post(ARTIFACTS, data, content_type="application/octet-stream",
                        HTTP_X_CONTENT_SHA256=hashlib.sha256(data).hexdigest())

    assert again.status_code == 200


def test_devices_outputs_and_the_marketplaces_own_files_count_against_no_quota(
        contributor, make_device, submitter, submit_job, settings):
    settings.IDLEGRID_ARTIFACT_QUOTA_BYTES = 1024
    device = make_device(contributor)
    job = submit_job(rows=8, rows_per_unit=4)  # the fixture's uploads bypass the API (and its quota)

    output = device.client().post(ARTIFACTS, b"o" * 4096, content_type="application/octet-stream")

    assert output.status_code == 201 and artifacts_quota_used(owner=contributor) == 0
    uploaded = Artifact.objects.filter(pk__in=[job.spec["model"]["weights"], job.spec["dataset"]])
    assert artifacts_quota_used(owner=submitter) == sum(a.size for a in uploaded)  # the split's files are not theirs
    assert WorkUnit.inputs.through.objects.filter(workunit__job=job).count() == 4  # weights + input, two units


# --- collection ----------------------------------------------------------------------------------

def test_the_collection_removes_old_orphaned_device_outputs_and_keeps_young_ones(contributor, make_device, upload):
    device = make_device(contributor).device
    orphan, young = upload(b"never reported", device=device), upload(b"waiting for its report", device=device)
    aged(orphan)

    assert artifacts_collect() == {"removed": 1, "temp_files": 0}

    assert not kept(orphan) and kept(young)


def test_the_collection_keeps_everything_a_row_or_a_person_references(submitter, contributor, make_device,
                                                                        submit_job, upload):
    job = submit_job(rows=4, rows_per_unit=4)
    device = make_device(contributor).device
    reported = upload(b"a reported output", device=device)
    Result.objects.filter(pk=Result.objects.filter(job=job).first().pk).update(output_id=reported)
    output = upload(b"a job's output", submitter)
    Job.objects.filter(pk=job.pk).update(output_id=output, state=Job.State.COMPLETED,
                                         finished_at=timezone.now() - timedelta(days=400))
    Artifact.owners.through.objects.filter(artifact_id=output).delete()  # disowned: only Job.output keeps it
    inputs = list(WorkUnit.inputs.through.objects.filter(workunit__job=job).values_list("artifact_id", flat=True))
    held = upload(b"held by a person", submitter)
    everything = [reported, output, held, *inputs]
    for sha in everything:
        aged(sha, days=500)

    assert artifacts_collect()["removed"] == 0

    assert all(kept(sha) for sha in everything)


def test_the_collection_keeps_what_a_live_or_recently_ended_jobs_spec_names(submitter, upload, settings):
    live, recent, old = (upload(data, submitter) for data in (b"live", b"recent", b"old"))
    job_using(submitter, live)
    Job.objects.filter(pk=job_using(submitter, recent).pk).update(state=Job.State.FAILED, finished_at=timezone.now())
    past_window = timezone.now() - timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS + 60)
    Job.objects.filter(pk=job_using(submitter, old).pk).update(state=Job.State.COMPLETED, finished_at=past_window)
    Artifact.owners.through.objects.all().delete()  # every holder deleted them
    for sha in (live, recent, old):
        aged(sha)

    assert artifacts_collect()["removed"] == 1

    assert kept(live) and kept(recent) and not kept(old)


def test_a_deleted_artifact_is_collected_once_its_job_left_the_audit_window(api, submitter, upload, settings):
    sha = upload(b"a dataset", submitter)
    job = job_using(submitter, sha, state=Job.State.COMPLETED)
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now())
    api(submitter).delete(f"{ARTIFACTS}{sha}/")
    aged(sha)
    assert artifacts_collect()["removed"] == 0

    Job.objects.filter(pk=job.pk).update(
        finished_at=timezone.now() - timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS + 60))

    assert artifacts_collect()["removed"] == 1 and not kept(sha)


def test_a_re_upload_of_old_bytes_restarts_their_grace(submitter, contributor, make_device, upload):
    device = make_device(contributor).device
    sha = upload(b"the same output", device=device)
    aged(sha)

    upload(b"the same output", device=device)

    assert artifacts_collect()["removed"] == 0 and kept(sha)


def test_the_collection_removes_staging_files_of_killed_uploads(db, artifact_dir):
    tmp = artifact_dir / "tmp"
    get_storage()  # the backend makes its staging folder
    dead, alive = tmp / "tmp-killed", tmp / "tmp-in-progress"
    dead.write_bytes(b"half an upload")
    alive.write_bytes(b"an upload still streaming")
    two_hours_ago = time.time() - 7200
    os.utime(dead, (two_hours_ago, two_hours_ago))

    assert artifacts_collect() == {"removed": 0, "temp_files": 1}

    assert sorted(p.name for p in tmp.iterdir()) == ["tmp-in-progress"]


def test_every_relation_that_names_an_artifact_is_a_reference_the_collection_checks():
    relations = {
        (field.related_model._meta.label, field.field.name)
        for field in Artifact._meta.get_fields(include_hidden=True)
        if field.is_relation and field.auto_created and not field.concrete and field.one_to_many
    }
    listed_refs = {(model._meta.label, name) for model, name in ROW_REFERENCES}

    # Artifact.devices is the one relation that is not a reference (a device's upload waits only the grace).
    assert relations - listed_refs == {("artifacts.Artifact_devices", "artifact")}
    assert listed_refs <= relations


def test_the_collection_runs_hourly_and_expires_like_the_other_periodic_tasks():
    entry = django_settings.CELERY_BEAT_SCHEDULE["collect-artifacts"]

    assert entry["task"] == "jobs.collect_artifacts"
    assert entry["schedule"] == timedelta(hours=1) and entry["options"]["expires"] == 3600


def test_a_store_whose_bytes_a_collection_removed_meanwhile_asks_for_the_upload_again(submitter, monkeypatch,
                                                                                        artifact_dir):
    from marketplace.artifacts.storage import FileSystemStorage
    from marketplace.core.exceptions import Conflict

    # The collection deleted the row and then the bytes between this store's save and its row: as if so.
    monkeypatch.setattr(FileSystemStorage, "exists", lambda self, sha256: False)

    with pytest.raises(Conflict, match="upload it again"):
        artifact_store(chunks=[b"collected under it"], uploaded_by=submitter)

    assert not Artifact.objects.exists()  # no row that names bytes storage does not hold
