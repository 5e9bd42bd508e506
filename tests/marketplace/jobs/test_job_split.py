import hashlib

import numpy as np
from safetensors.numpy import load_file

from marketplace.artifacts.storage import get_storage
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_split
from marketplace.workunits.models import Result, WorkUnit


def test_it_splits_a_job_into_units_of_rows_per_unit_rows(submit_job):
    job = submit_job(rows=10, rows_per_unit=4)

    units = list(WorkUnit.objects.filter(job=job).order_by("index"))
    assert [unit.index for unit in units] == [0, 1, 2]
    assert [unit.payload["rows"] for unit in units] == [4, 4, 2]
    assert [unit.payload["output"] for unit in units] == [
        {"name": "y", "dtype": "float32", "shape": [4, 3]},
        {"name": "y", "dtype": "float32", "shape": [4, 3]},
        {"name": "y", "dtype": "float32", "shape": [2, 3]},
    ]
    job.refresh_from_db()
    assert job.state == Job.State.RUNNING
    assert job.units_total == 3
    assert job.started_at is not None


def test_it_gives_each_unit_the_model_batch_size_and_limits_of_the_spec(submit_job):
    job = submit_job(rows=6, rows_per_unit=3, batch_size=2, unit_timeout_seconds=30, unit_memory_mb=512)

    payload = WorkUnit.objects.filter(job=job).order_by("index").first().payload
    assert payload["kind"] == "inference"
    assert payload["model"] == job.spec["model"]
    assert payload["batch_size"] == 2
    assert payload["limits"] == {"seconds": 30, "memory_mb": 512}


def test_it_issues_two_unsent_replicas_of_each_unit(submit_job):
    job = submit_job(rows=10, rows_per_unit=4)

    for unit in WorkUnit.objects.filter(job=job):
        assert list(unit.results.values_list("state", flat=True)) == [Result.State.UNSENT] * 2
        assert unit.results_created == 2
        assert unit.quorum == 2
        assert unit.max_results == 6


def test_it_stores_each_slice_as_a_content_addressed_input(submit_job):
    job = submit_job(rows=10, rows_per_unit=4)
    with get_storage().local_path(job.spec["dataset"]) as path:
        dataset = load_file(str(path))["x"]

    for unit in WorkUnit.objects.filter(job=job).order_by("index"):
        sha = unit.payload["inputs"]["x"]
        with get_storage().local_path(sha) as path:
            assert path.name == sha
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
            start = unit.index * 4
            np.testing.assert_array_equal(load_file(str(path))["x"], dataset[start:start + unit.payload["rows"]])
        assert set(unit.inputs.values_list("sha256", flat=True)) == {job.spec["model"]["weights"], sha}


def test_splitting_twice_creates_nothing_more(submit_job):
    job = submit_job(rows=10, rows_per_unit=4)

    assert job_split(job_id=job.pk) == 0

    assert WorkUnit.objects.filter(job=job).count() == 3
    assert Result.objects.filter(job=job).count() == 6
