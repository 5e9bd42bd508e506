"""Every error leaves the API as {"error": {"code", "message", "fields"}}, with the protocol's codes."""

from marketplace.jobs.models import Job


def assert_error_shape(response, status, code):
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    error = response.json()["error"]
    assert set(error) == {"code", "message", "fields"}
    assert error["code"] == code
    assert error["message"]
    return error


def test_malformed_json_is_invalid(api, submitter):
    response = api(submitter).post("/api/v1/jobs/", data=b'{"kind": ', content_type="application/json")

    assert_error_shape(response, 400, "invalid")
    assert Job.objects.count() == 0


def test_a_serializer_error_names_its_fields(api, submitter):
    response = api(submitter).post("/api/v1/jobs/", {}, format="json")

    error = assert_error_shape(response, 400, "invalid")
    assert set(error["fields"]) == {"kind", "spec"}


def test_a_domain_error_keeps_its_code_and_fields(api, submitter):
    response = api(submitter).post("/api/v1/jobs/", {"kind": "training", "spec": {}}, format="json")

    error = assert_error_shape(response, 400, "invalid")
    assert error["fields"] == {"kind": "unknown"}


def test_json_sent_as_text_is_an_unsupported_media_type(api, submitter):
    response = api(submitter).post("/api/v1/jobs/", data=b"{}", content_type="text/plain")

    assert_error_shape(response, 415, "unsupported_media_type")


def test_a_wrong_token_is_not_authenticated(api):
    response = api().get("/api/v1/devices/", HTTP_AUTHORIZATION="Token not-a-token")

    assert_error_shape(response, 401, "not_authenticated")


def test_a_job_you_cannot_see_is_not_found(api, submitter):
    response = api(submitter).get("/api/v1/jobs/1/")

    assert_error_shape(response, 404, "not_found")


def test_enrolment_is_throttled(api, settings):
    rates = settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {**rates, "enroll": "2/minute"}}
    client = api()

    statuses = [client.post("/api/v1/agent/enroll", {}, format="json").status_code for _ in range(3)]

    assert statuses == [400, 400, 429]
    assert_error_shape(client.post("/api/v1/agent/enroll", {}, format="json"), 429, "throttled")
