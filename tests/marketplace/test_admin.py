"""The admin shows every part of the domain: jobs, units with their replicas, devices, artifacts, tokens."""

import pytest

from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import Result, WorkUnit


@pytest.fixture
def staff_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("admin", "admin@example.org", "pw")
    client.force_login(admin)
    return client


@pytest.mark.parametrize("model", [
    "jobs/job", "workunits/workunit", "workunits/result", "workers/device", "artifacts/artifact",
    "accounts/enrollmenttoken",
])
def test_every_model_has_an_admin_list_that_renders(staff_client, submit_job, make_device, contributor, model):
    device = make_device(contributor)
    submit_job(rows=8, rows_per_unit=4)
    workunit_lease(device=device.device, max_units=1)

    response = staff_client.get(f"/admin/{model}/")

    assert response.status_code == 200
    assert response.context["cl"].result_count >= 1


def test_a_unit_page_shows_its_replicas_and_their_devices(staff_client, submit_job, make_device, contributor):
    device = make_device(contributor, name="contributor-laptop")
    job = submit_job(rows=4, rows_per_unit=4)
    workunit_lease(device=device.device, max_units=1)
    unit = WorkUnit.objects.get(job=job)

    response = staff_client.get(f"/admin/workunits/workunit/{unit.pk}/change/")

    assert response.status_code == 200
    assert Result.objects.filter(unit=unit).count() == 2
    assert b"contributor-laptop" in response.content
    assert b"in_progress" in response.content or b"In progress" in response.content


def test_a_job_page_shows_its_progress(staff_client, submit_job):
    job = submit_job(rows=8, rows_per_unit=4)

    response = staff_client.get(f"/admin/jobs/job/{job.pk}/change/")

    assert response.status_code == 200
    assert b"units_total=2" in response.content
