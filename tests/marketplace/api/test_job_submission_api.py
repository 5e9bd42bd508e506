"""POST /api/v1/jobs/: a job is validated completely before anything is created."""

import io
import pickle

import numpy as np
import pytest
import torch

from marketplace.jobs.models import Job
from marketplace.workunits.models import Result, WorkUnit
from tests.conftest import stored_bytes

URL = "/api/v1/jobs/"
MISSING = "ab" * 32


@pytest.fixture
def post_job(api, submitter):
    def post(spec, kind="inference"):
        return api(submitter).post(URL, {"kind": kind, "spec": spec}, format="json")

    return post


def assert_refused(response, field):
    assert response.status_code == 400, response.json()
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert field in error["fields"], error
    assert Job.objects.count() == 0
    assert WorkUnit.objects.count() == 0
    assert Result.objects.count() == 0
    return error["fields"][field]


def test_it_accepts_a_valid_job_and_enqueues_its_split(post_job, inference_spec, enqueued,
                                                        django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = post_job(inference_spec(rows=10, rows_per_unit=4))

    assert response.status_code == 201, response.json()
    body = response.json()
    job = Job.objects.get()
    assert body["id"] == job.pk
    assert body["state"] == "pending"
    assert body["spec"]["rows"] == 10
    assert body["spec"]["quorum"] == 2
    assert enqueued == [("jobs.split", (job.pk,))]


def test_it_accepts_a_cnn_job(post_job, inference_spec):
    response = post_job(inference_spec(architecture="cnn", rows=3))

    assert response.status_code == 201, response.json()
    assert Job.objects.get().spec["model"]["config"]["kernel_size"] == 3


def test_it_refuses_a_spec_that_is_not_an_object(post_job):
    assert_refused(post_job(["model", "dataset"]), "spec")


def test_it_refuses_a_spec_with_an_unknown_key(post_job, inference_spec):
    problem = assert_refused(post_job(inference_spec(colour="blue")), "spec")

    assert "colour" in problem


@pytest.mark.parametrize("rows_per_unit", [0, -4, "ten", 2.5, True, 10_000_000])
def test_it_refuses_a_bad_rows_per_unit(post_job, inference_spec, rows_per_unit):
    assert_refused(post_job(inference_spec(rows_per_unit=rows_per_unit)), "rows_per_unit")


def test_it_refuses_a_quorum_above_the_cap_of_results(post_job, inference_spec):
    assert_refused(post_job(inference_spec(quorum=4, max_results_per_unit=3)), "max_results_per_unit")


@pytest.mark.parametrize(("compare", "stored"), [
    ({}, {"method": "allclose", "rtol": 1e-5, "atol": 1e-6, "top1": True, "class_exact": True}),
    ({"rtol": 1e-4, "atol": 1e-5, "top1": False},
     {"method": "allclose", "rtol": 1e-4, "atol": 1e-5, "top1": False, "class_exact": True}),
    ({"method": "exact"}, {"method": "exact", "class_exact": True}),
    ({"method": "top1", "min_agreement": 0.99}, {"method": "top1", "min_agreement": 0.99, "class_exact": True}),
    ({"method": "metric", "epsilon": 1e-4, "class_exact": False},
     {"method": "metric", "metric": "mean", "epsilon": 1e-4, "class_exact": False}),
])
def test_it_accepts_each_compare_method_and_stores_it_with_its_defaults(post_job, inference_spec, compare, stored):
    response = post_job(inference_spec(compare=compare))

    assert response.status_code == 201, response.json()
    assert Job.objects.get().spec["compare"] == stored


@pytest.mark.parametrize(("compare", "field"), [
    ({"method": "fuzzy"}, "compare.method"),
    ({"method": "exact", "rtol": 1e-5}, "compare"),
    ({"method": "metric"}, "compare.epsilon"),
    ({"method": "metric", "epsilon": 1, "metric": "accuracy"}, "compare.metric"),
    ({"method": "top1", "min_agreement": 0}, "compare.min_agreement"),
    ({"rtol": -1}, "compare.rtol"),
    ({"top1": "yes"}, "compare.top1"),
    ({"class_exact": 1}, "compare.class_exact"),
    ("allclose", "compare"),
])
def test_it_refuses_a_bad_compare_with_a_field_error(post_job, inference_spec, compare, field):
    assert_refused(post_job(inference_spec(compare=compare)), field)


def test_it_refuses_an_unknown_architecture(post_job, inference_spec):
    spec = inference_spec()
    spec["model"]["architecture"] = "transformer"

    problem = assert_refused(post_job(spec), "model.architecture")

    assert "transformer" in problem


@pytest.mark.parametrize("config", [
    {"in_features": -1, "hidden": [8], "out_features": 3},
    {"in_features": 4, "hidden": [8], "out_features": 3, "dropout": 0.5},
    {"in_features": 4, "hidden": "eight", "out_features": 3},
    "not an object",
])
def test_it_refuses_a_bad_config(post_job, inference_spec, config):
    spec = inference_spec()
    spec["model"]["config"] = config

    assert_refused(post_job(spec), "model.config")


def test_it_refuses_a_model_without_weights(post_job, inference_spec):
    spec = inference_spec()
    del spec["model"]["weights"]

    assert_refused(post_job(spec), "model")


def test_it_refuses_weights_with_a_wrong_tensor_shape(post_job, inference_spec, upload, submitter, make_weights):
    spec = inference_spec()
    spec["model"]["weights"] = upload(make_weights("mlp", {"in_features": 5, "hidden": [8], "out_features": 3}), submitter)

    problem = assert_refused(post_job(spec), "model.weights")

    assert "net.0.weight" in problem


def test_it_refuses_weights_with_missing_tensors(post_job, inference_spec, upload, submitter, make_weights):
    spec = inference_spec()
    spec["model"]["weights"] = upload(make_weights("mlp", {"in_features": 4, "hidden": [], "out_features": 3}), submitter)

    problem = assert_refused(post_job(spec), "model.weights")

    assert "missing" in problem


def test_it_refuses_float64_weights(post_job, inference_spec, upload, submitter, make_weights):
    spec = inference_spec()
    spec["model"]["weights"] = upload(make_weights("mlp", dtype=torch.float64), submitter)

    problem = assert_refused(post_job(spec), "model.weights")

    assert "F64" in problem


def test_it_refuses_a_dataset_of_the_wrong_shape(post_job, inference_spec, upload, submitter, make_dataset):
    spec = inference_spec()
    spec["dataset"] = upload(make_dataset(10, (5,)), submitter)

    problem = assert_refused(post_job(spec), "dataset")

    assert "[10, 5]" in problem


def test_it_refuses_a_dataset_of_the_wrong_dtype(post_job, inference_spec, upload, submitter, make_dataset):
    spec = inference_spec()
    spec["dataset"] = upload(make_dataset(10, (4,), dtype=np.float64), submitter)

    problem = assert_refused(post_job(spec), "dataset")

    assert "F64" in problem


def test_it_refuses_a_dataset_whose_tensor_is_not_named_x(post_job, inference_spec, upload, submitter, make_output):
    spec = inference_spec()
    spec["dataset"] = upload(make_output(np.zeros((10, 4), dtype=np.float32), name="inputs"), submitter)

    assert_refused(post_job(spec), "dataset")


class Tripwire:
    """Unpickling this creates a folder: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return os.makedirs, (str(self.path),)


def test_it_refuses_a_pickle_offered_as_weights_without_unpickling_it(post_job, inference_spec, upload, submitter,
                                                                      tmp_path):
    tripwire = tmp_path / "unpickled"
    spec = inference_spec()
    spec["model"]["weights"] = upload(pickle.dumps({"net.0.weight": Tripwire(tripwire)}), submitter)

    problem = assert_refused(post_job(spec), "model.weights")

    assert "not a safetensors file" in problem
    assert not tripwire.exists()


def test_it_refuses_a_torch_save_checkpoint_offered_as_weights(post_job, inference_spec, upload, submitter):
    buffer = io.BytesIO()
    torch.save({"net.0.weight": torch.zeros(8, 4)}, buffer)
    spec = inference_spec()
    spec["model"]["weights"] = upload(buffer.getvalue(), submitter)

    problem = assert_refused(post_job(spec), "model.weights")

    assert "not a safetensors file" in problem


def test_it_refuses_weights_that_were_never_uploaded(post_job, inference_spec):
    spec = inference_spec()
    spec["model"]["weights"] = MISSING

    problem = assert_refused(post_job(spec), "model.weights")

    assert MISSING in problem


def test_it_refuses_a_dataset_that_was_never_uploaded(post_job, inference_spec):
    assert_refused(post_job(inference_spec(dataset=MISSING)), "dataset")


def test_it_refuses_an_artifact_reference_that_is_not_a_sha256(post_job, inference_spec):
    assert_refused(post_job(inference_spec(dataset="../../etc/passwd")), "dataset")


def test_it_refuses_an_unknown_kind(post_job, inference_spec):
    problem = assert_refused(post_job(inference_spec(), kind="training"), "kind")

    assert problem == "unknown"


def test_it_refuses_a_request_without_a_spec(api, submitter):
    response = api(submitter).post(URL, {"kind": "inference"}, format="json")

    assert_refused(response, "spec")


def test_it_refuses_anonymous_submissions(api, inference_spec):
    response = api().post(URL, {"kind": "inference", "spec": inference_spec()}, format="json")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert Job.objects.count() == 0


def test_it_refuses_submissions_from_a_device(make_device, contributor, inference_spec):
    device = make_device(contributor)

    response = device.client().post(URL, {"kind": "inference", "spec": inference_spec()}, format="json")

    assert response.status_code == 401
    assert Job.objects.count() == 0


def test_it_refuses_artifacts_that_someone_else_uploaded(post_job, inference_spec, other_submitter):
    spec = inference_spec(owner=other_submitter)

    assert "you have uploaded no artifact" in assert_refused(post_job(spec), "model.weights")


def test_it_accepts_the_same_bytes_once_the_submitter_uploaded_them_too(post_job, inference_spec, upload, submitter,
                                                                        other_submitter):
    spec = inference_spec(owner=other_submitter)
    for sha in (spec["model"]["weights"], spec["dataset"]):
        upload(stored_bytes(sha), submitter)

    assert post_job(spec).status_code == 201


def test_a_broker_that_is_down_after_commit_fails_no_submission_and_the_sweep_splits_the_job(
        post_job, inference_spec, monkeypatch, django_capture_on_commit_callbacks):
    # Before: the after-commit send raised into the request, which answered 500 with the job and its
    # escrow committed; a client retrying made a second job and took a second escrow.
    from datetime import timedelta

    from celery.app.task import Task
    from django.utils import timezone
    from kombu.exceptions import OperationalError

    from marketplace.workunits.sweep import sweep_run

    def broker_down(task, args=None, kwargs=None, **options):
        raise OperationalError("[Errno 111] Connection refused")

    monkeypatch.setattr(Task, "apply_async", broker_down)
    with django_capture_on_commit_callbacks(execute=True):
        response = post_job(inference_spec(rows=10, rows_per_unit=4))

    assert response.status_code == 201, response.json()
    job = Job.objects.get()
    assert job.state == Job.State.PENDING

    sent = []
    monkeypatch.setattr(Task, "apply_async", lambda task, args=None, kwargs=None, **o: sent.append((task.name, tuple(args))))
    Job.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(minutes=1))
    assert sweep_run()["split"] == 1  # the broker is back: the sweep sends the split the submission could not
    assert sent == [("jobs.split", (job.pk,))]
