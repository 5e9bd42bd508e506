"""GET /api/v1/jobs/{id}/: a submitter follows their own jobs only."""

import pytest
from knox.models import AuthToken

from marketplace.workunits.leasing import workunit_lease
from marketplace.workunits.models import WorkUnit
from marketplace.workunits.verification import unit_validate


def test_a_submitter_follows_the_progress_of_their_job(submit_job, api, submitter, make_device, report, contributor,
                                                       cheater, honest_output):
    job = submit_job(rows=10, rows_per_unit=4)
    first_unit = WorkUnit.objects.filter(job=job).order_by("index").first()
    honest_device, cheater_device = make_device(contributor), make_device(cheater)
    report(honest_device, workunit_lease(device=honest_device.device, max_units=1)[0].result_id)
    report(cheater_device, workunit_lease(device=cheater_device.device, max_units=1)[0].result_id,
           honest_output(first_unit) + 1)
    unit_validate(unit_id=first_unit.pk)

    response = api(submitter).get(f"/api/v1/jobs/{job.pk}/")

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["kind"], body["state"]) == (job.pk, "inference", "running")
    assert body["spec"] == job.spec
    assert (body["units_total"], body["units_done"], body["units_error"]) == (3, 0, 0)
    assert (body["results_valid"], body["results_invalid"], body["results_per_unit"]) == (0, 0, None)
    assert body["output_sha256"] is None
    assert body["finished_at"] is None


def test_another_submitter_does_not_see_the_job(submit_job, api, other_submitter):
    job = submit_job()

    response = api(other_submitter).get(f"/api/v1/jobs/{job.pk}/")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_an_unknown_job_is_not_found(api, submitter):
    assert api(submitter).get("/api/v1/jobs/999999/").status_code == 404


def test_a_token_is_issued_for_a_username_and_password(api, submitter):
    response = api().post("/api/v1/auth/token/", {"username": "submitter", "password": "submitter-password"},
                          format="json")

    assert response.status_code == 201
    token = response.json()["token"]
    assert api().get("/api/v1/devices/", HTTP_AUTHORIZATION=f"Token {token}").json()["results"] == []
    assert AuthToken.objects.get(user=submitter).token_key == response.json()["token_key"] == token[:15]


@pytest.mark.usefixtures("submitter")
def test_a_wrong_password_gets_no_token(api):
    response = api().post("/api/v1/auth/token/", {"username": "submitter", "password": "guess"}, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"
    assert "token" not in response.json()
