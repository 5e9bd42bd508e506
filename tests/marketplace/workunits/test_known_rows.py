"""The submitter's own known answers, hidden among the rows of every unit: ground truth on a cold network.

Before a single device is trusted, two colluding owners who return the same wrong bytes decide a unit.
A job that brings a few rows it computed itself makes that answer refusable: the rows hide at random
positions in every unit, an answer that disagrees with them never decides, and whoever gave it loses,
while its owner's other answers are checked again."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors
from safetensors.torch import load as load_torch_safetensors

from marketplace.artifacts.storage import get_storage
from marketplace.core.tensors import read_array, read_header
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_merge
from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit
from marketplace.workunits.verification import unit_validate
from tests.conftest import stored_bytes
from worker_agent.architectures import resolve

KNOWN = 6



def model_of(spec):
    arch, config = resolve(spec["model"]["architecture"], spec["model"]["config"])
    model = arch.build(config)
    weights = stored_bytes(spec["model"]["weights"])
    model.load_state_dict(load_torch_safetensors(weights))
    return model.eval()


@pytest.fixture
def known_job(inference_spec, upload, submitter, make_dataset):
    """known_job(rows, rows_per_unit, per_unit, lie=False): an inference job with KNOWN known answers the
    submitter computed with the real model (with `lie`, deliberately wrong ones)."""
    from marketplace.jobs.services import job_split, job_submit

    def make(*, rows=8, rows_per_unit=4, per_unit=1, lie=False):
        spec = inference_spec(rows=rows, rows_per_unit=rows_per_unit, adaptive=False)
        x = load_safetensors(make_dataset(KNOWN, seed=7))["x"]
        with torch.no_grad():
            y = model_of(spec)(torch.from_numpy(x)).numpy()
        if lie:
            y = y + 5.0
        from safetensors.numpy import save

        spec["known_answers"] = upload(save({"x": x, "y": np.ascontiguousarray(y)}), submitter)
        spec["known_answers_per_unit"] = per_unit
        job = job_submit(owner=submitter, kind="inference", spec=spec)
        job_split(job_id=job.pk)
        job.refresh_from_db()
        return job

    return make


def lease_unit(enrolled, unit):
    (lease,) = workunit_lease(device=enrolled.device, max_units=1)
    assert lease.unit_id == unit.pk
    return lease


def test_known_rows_hide_in_every_unit_and_nothing_on_the_wire_names_them(known_job):
    job = known_job(rows=12, rows_per_unit=4, per_unit=2)

    units = list(WorkUnit.objects.filter(job=job).order_by("index"))
    assert len(units) == 3
    for unit in units:
        assert len(unit.hidden_rows) == 2
        assert unit.payload["rows"] == 6 and unit.payload["output"]["shape"] == [6, 3]
        assert "hidden_rows" not in str(unit.payload) and "known" not in str(unit.payload)
        with get_storage().local_path(unit.payload["inputs"]["x"]) as path:
            x = read_array(path, read_header(path)["x"])
        with get_storage().local_path(job.spec["known_answers"]) as known_path:
            known_x = read_array(known_path, read_header(known_path)["x"])
        for position, pick in unit.hidden_rows:
            np.testing.assert_array_equal(x[position], known_x[pick])
    assert job.spec["known_rows"] == KNOWN and job.spec["known_answers_per_unit"] == 2


def test_honest_answers_pass_the_known_rows_and_the_merged_output_leaves_them_out(
    known_job, make_device, people, report, honest_output, django_capture_on_commit_callbacks
):
    job = known_job(rows=8, rows_per_unit=4)
    for unit in WorkUnit.objects.filter(job=job).order_by("index"):
        for person in people[:2]:
            device = make_device(person, name=f"d{unit.pk}")
            report(device, lease_unit(device, unit).result_id)
        assert unit_validate(unit_id=unit.pk) == "done"

    with django_capture_on_commit_callbacks(execute=True):
        assert job_merge(job_id=job.pk).state == Job.State.COMPLETED

    job.refresh_from_db()
    merged = load_safetensors(stored_bytes(job.output_id))["y"]
    with get_storage().local_path(job.spec["dataset"]) as dataset:
        x = read_array(dataset, read_header(dataset)["x"]).copy()
    with torch.no_grad():
        expected = model_of(job.spec)(torch.from_numpy(x)).numpy()
    assert merged.shape == (8, 3)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
    assert not Result.objects.filter(job=job, failed_known_rows=True).exists()


def test_attack_two_colluding_owners_no_longer_decide_a_unit_on_a_cold_network(
    known_job, make_device, people, report, honest_output
):
    # Before: nobody trusted yet, two accounts returning the same wrong bytes decided the unit, delivered
    # wrong rows and were paid. With known rows, their answer cannot decide it; honest devices do.
    job = known_job(rows=4, rows_per_unit=4)
    unit = WorkUnit.objects.get(job=job)
    wrong = honest_output(unit) + 1.0
    colluders = [make_device(people[0]), make_device(people[1])]
    for device in colluders:
        report(device, lease_unit(device, unit).result_id, wrong)

    assert unit_validate(unit_id=unit.pk) == "pending"
    assert WorkUnit.objects.get(pk=unit.pk).state == WorkUnit.State.PENDING

    honest = [make_device(people[2]), make_device(people[3])]
    for device in honest:
        report(device, lease_unit(device, unit).result_id)
    assert unit_validate(unit_id=unit.pk) == "done"

    unit.refresh_from_db()
    assert unit.canonical_result.device_id in {d.pk for d in honest}
    for device in colluders:
        result = Result.objects.get(unit=unit, device=device.device)
        assert (result.state, result.failed_known_rows) == (Result.State.INVALID, True)
        assert device.refresh().valid_results == 0


def test_a_device_that_fails_known_rows_has_its_owners_other_answers_checked_again(
    known_job, make_device, people, report, honest_output
):
    # The colluders decided an earlier job's unit together (no known rows there), then one of them is
    # caught on a unit with known rows: every unit its owner vouched for is re-decided by other owners,
    # and the wrong one is overturned.
    first = known_job(rows=4, rows_per_unit=4)
    fooled = WorkUnit.objects.get(job=first)
    WorkUnit.objects.filter(pk=fooled.pk).update(hidden_rows=[])  # as if it had no known rows
    fooled.refresh_from_db()
    mallory, trudy = make_device(people[0]), make_device(people[1])
    for device in (mallory, trudy):
        report(device, lease_unit(device, fooled).result_id, honest_output(fooled) + 1.0)
    assert unit_validate(unit_id=fooled.pk) == "done"  # the attack worked, for now

    second = known_job(rows=4, rows_per_unit=4)
    trap = WorkUnit.objects.get(job=second)
    report(mallory, lease_unit(mallory, trap).result_id, honest_output(trap) + 1.0)
    honest = [make_device(people[2]), make_device(people[3])]
    report(honest[0], lease_unit(honest[0], trap).result_id)
    assert unit_validate(unit_id=trap.pk) == "pending"  # one answer each: one more replica
    report(honest[1], lease_unit(honest[1], trap).result_id)
    assert unit_validate(unit_id=trap.pk) == "done"

    fooled.refresh_from_db()
    assert fooled.state == WorkUnit.State.PENDING  # re-decided: one owner more than vouched for it
    assert fooled.quorum == 3
    for device in honest:
        report(device, lease_unit(device, fooled).result_id)
    carol = make_device(people[4])
    for _ in range(3):
        if unit_validate(unit_id=fooled.pk) == "done":
            break
        report(carol, lease_unit(carol, fooled).result_id)
    fooled.refresh_from_db()
    assert fooled.state == WorkUnit.State.DONE
    assert fooled.canonical_result.device_id in {d.pk for d in (*honest, carol)}
    assert Result.objects.filter(unit=fooled, device__in=[mallory.device, trudy.device],
                                 state=Result.State.VALID).count() == 0
    assert Job.objects.get(pk=first.pk).corrections == 1


def test_a_lying_submitter_fails_only_its_own_job_and_the_devices_are_paid_and_keep_their_trust(
    known_job, make_device, people, report, django_capture_on_commit_callbacks
):
    from marketplace.ledger.models import Earning
    from marketplace.workers.models import DeviceTrust

    job = known_job(rows=4, rows_per_unit=4, lie=True)
    unit = WorkUnit.objects.get(job=job)
    WorkUnit.objects.filter(pk=unit.pk).update(max_results=2)
    devices = [make_device(people[0]), make_device(people[1])]
    for device in devices:
        DeviceTrust.objects.create(device=device.device, kind="inference", hardware_class=device.device.hardware_class,
                                   consecutive_valid=5)
        report(device, lease_unit(device, unit).result_id)

    with django_capture_on_commit_callbacks(execute=True):
        assert unit_validate(unit_id=unit.pk) == "error"

    job.refresh_from_db()
    assert job.state == Job.State.FAILED
    assert "your known answers refuse" in job.error
    assert set(Result.objects.filter(unit=unit).values_list("state", flat=True)) == {Result.State.VALID}
    assert Earning.objects.filter(result__unit=unit, source=Earning.Source.ESCROW).count() == 2
    assert set(DeviceTrust.objects.values_list("consecutive_valid", flat=True)) == {5}  # no trust lost


@pytest.mark.parametrize("change, field", [
    ({"known_answers_per_unit": 2}, "known_answers_per_unit"),
    ({"known_answers": "00" * 32}, "known_answers"),
], ids=["per unit without answers", "an artifact never uploaded"])
def test_known_answers_are_checked_at_submission(inference_spec, api, submitter, change, field):
    spec = {**inference_spec(rows=4, rows_per_unit=4), **change}

    response = api(submitter).post("/api/v1/jobs/", {"kind": "inference", "spec": spec}, format="json")

    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


def test_known_answers_must_match_the_model(inference_spec, api, submitter, upload):
    from safetensors.numpy import save

    spec = inference_spec(rows=4, rows_per_unit=4)
    spec["known_answers"] = upload(save({"x": np.zeros((3, 4), np.float32), "y": np.zeros((3, 7), np.float32)}), submitter)

    response = api(submitter).post("/api/v1/jobs/", {"kind": "inference", "spec": spec}, format="json")

    assert response.status_code == 400
    assert "F32[3, 3]" in response.json()["error"]["fields"]["known_answers"]
