"""The Celery tasks are thin; the sweep is the safety net that redoes whatever a lost message left undone."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.jobs.tasks import job_split_task
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.tasks import sweep_run_task, unit_validate_task

# A device of another hardware class than conftest.HARDWARE: results are compared by the job's tolerance.
ANOTHER_CLASS = {"os": "linux", "machine": "x86_64", "cpu_capability": "DEFAULT"}


def test_the_sweep_validates_units_whose_validation_message_was_lost(
    submit_job, make_device, report, contributor, other_contributor
):
    unit = WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4))
    for owner in (contributor, other_contributor):
        device = make_device(owner)
        report(device, workunit_lease(device=device.device, max_units=1)[0].result_id)

    assert sweep_run_task()["validated"] == 1

    unit.refresh_from_db()
    assert (unit.state, unit.need_validate) == (WorkUnit.State.DONE, False)
    assert Job.objects.get(pk=unit.job_id).state == Job.State.MERGING


def test_the_sweep_splits_jobs_left_pending(submit_job, enqueued):
    stale = submit_job(split=False)
    fresh = submit_job(split=False)
    Job.objects.filter(pk=stale.pk).update(created_at=timezone.now() - timedelta(minutes=1))

    assert sweep_run_task()["split"] == 1

    assert ("jobs.split", (stale.pk,)) in enqueued
    assert ("jobs.split", (fresh.pk,)) not in enqueued


def test_the_sweep_merges_jobs_left_merging(submit_job, enqueued):
    job = submit_job()
    Job.objects.filter(pk=job.pk).update(state=Job.State.MERGING)

    sweep_run_task()

    assert enqueued == [("jobs.merge", (job.pk,))]


def test_the_validate_task_runs_the_validation(submit_job):
    unit = WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4))

    assert unit_validate_task(unit.pk) == "pending"


def test_a_split_that_cannot_succeed_fails_the_job(submit_job, artifact_dir):
    job = submit_job(split=False)
    sha = job.spec["dataset"]
    (artifact_dir / sha[:2] / sha[2:4] / sha).unlink()  # the filesystem backend's file, gone

    with pytest.raises(FileNotFoundError):
        job_split_task(job.pk)

    job.refresh_from_db()
    assert job.state == Job.State.FAILED
    assert job.error.startswith("splitting failed")
    assert WorkUnit.objects.filter(job=job).count() == 0


def test_one_unit_that_cannot_be_validated_does_not_stop_the_sweep(
    submit_job, make_device, report, honest_output, contributor, other_contributor, artifact_dir
):
    # Before: the sweep validated every waiting unit in one loop and stopped at the first that raised
    # (a hostile value had made one raise), leaving every other unit and job unattended. Now units are
    # validated in batches: the one whose output cannot be read is left waiting, the batch goes on.
    units = [WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4)) for _ in range(3)]
    broken = units[0]
    first, second = make_device(contributor), make_device(other_contributor, hardware=ANOTHER_CLASS)
    outputs = {}
    for device, nudge in ((first, 0.0), (second, 1e-7)):
        for lease in workunit_lease(device=device.device, max_units=8):
            unit = WorkUnit.objects.get(pk=lease.unit_id)
            y = honest_output(unit)
            y[0, 0] += nudge * (1 + units.index(unit))  # the units' rows are alike: their outputs must be distinct files
            report(device, lease.result_id, y)
            outputs[device.pk, unit.pk] = Result.objects.get(pk=lease.result_id).output_id
    # Two hardware classes, so their outputs are compared by tolerance: the tensors are read.
    sha = outputs[second.pk, broken.pk]
    (artifact_dir / sha[:2] / sha[2:4] / sha).unlink()

    done = sweep_run_task()

    assert (done["validated"], done["failed"]) == (2, 1)
    assert done["failures"] == [f"unit {broken.pk}"]
    states = {u.pk: u.state for u in WorkUnit.objects.filter(pk__in=[u.pk for u in units])}
    assert states == {broken.pk: WorkUnit.State.PENDING, units[1].pk: WorkUnit.State.DONE, units[2].pk: WorkUnit.State.DONE}
    assert WorkUnit.objects.get(pk=broken.pk).need_validate is True  # tried again next time
