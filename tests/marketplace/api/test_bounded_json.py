"""Every JSON body is parsed bounded (marketplace/api/parsers.py) and refused in the API's error shape;
what never reaches a DRF view answers that shape under /api/ too (marketplace/urls.py handlers)."""

from __future__ import annotations

import io
import json

import pytest
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.test import RequestFactory
from rest_framework.test import APIClient

from marketplace.api import exception_handler
from marketplace.api.parsers import BodyTooLarge, BoundedJSONParser
from marketplace.api.v1.accounts import DeviceListApi
from marketplace.jobs.models import Job
from marketplace.workers.models import Device

ENROLL = "/api/v1/agent/enroll"
JOBS = "/api/v1/jobs/"
DEPTH_BOMB = b"[" * 100_000 + b"]" * 100_000  # 200 KB: what killed a gunicorn worker


def assert_error_shape(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "fields"}
    assert body["error"]["code"] == code
    return body["error"]


def post_json(client: APIClient, path: str, raw: bytes, content_type: str = "application/json", **extra):
    return client.generic("POST", path, raw, content_type=content_type, **extra)


# --- bodies the parser refuses -----------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "message"), [
    (DEPTH_BOMB, "nested deeper than 32"),
    (b'{"hardware": ' * 50_000 + b"1" + b"}" * 50_000, "nested deeper than 32"),
    (b'{"hardware": [' + b"9" * 4301 + b"]}", "a number of more than 100 digits"),
    (b'{"hardware": {"cpus": NaN}}', "NaN/Infinity are not JSON"),
    (b'{"hardware": {"cpus": 1e999}}', "a number out of range"),
    (b'{"name": "\xff"}', "not UTF-8"),
    (b"[" + b"0," * 100_000 + b"0]", "more than 100000 items"),
    (b'{"name": "a\\u0000b"}', "U+0000"),
    (b'{"name": "\\ud800"}', "an unpaired surrogate"),
    (b'{"token": ', "not JSON"),
], ids=["depth bomb", "object bomb", "4301 digits", "NaN", "1e999", "invalid UTF-8", "items", "NUL", "lone surrogate",
        "truncated"])
def test_an_enrolment_body_past_a_limit_is_refused_and_enrols_nothing(db, raw: bytes, message: str) -> None:
    response = post_json(APIClient(), ENROLL, raw)

    error = assert_error_shape(response, 400, "invalid")
    assert message in error["message"]
    assert Device.objects.count() == 0


def test_a_job_body_nested_100000_deep_submits_nothing(api, submitter) -> None:
    response = post_json(api(submitter), JOBS, b'{"kind": "inference", "spec": ' + DEPTH_BOMB + b"}")

    assert "nested deeper than 32" in assert_error_shape(response, 400, "invalid")["message"]
    assert Job.objects.count() == 0


def test_a_body_over_the_limit_is_413_before_it_is_read(api, submitter, settings) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = b'{"kind": "inference", "spec": "' + b"a" * 1000 + b'"}'

    response = post_json(api(submitter), JOBS, body)

    assert assert_error_shape(response, 413, "too_large")["message"] == "the request body is larger than 1000 bytes"
    assert Job.objects.count() == 0


def test_a_body_whose_length_header_does_not_say_is_cut_at_the_limit(api, submitter, settings) -> None:
    # "+1034" is a length int() reads (so the body arrives whole) but the parser does not trust: it reads
    # one byte past the limit and stops there.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = b'{"kind": "inference", "spec": "' + b"a" * 1000 + b'"}'

    response = post_json(api(submitter), JOBS, body, CONTENT_LENGTH=f"+{len(body)}")

    assert_error_shape(response, 413, "too_large")


def test_the_parser_reads_at_most_one_byte_past_the_limit(settings) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    stream = io.BytesIO(b'"' + b"a" * 10_000 + b'"')

    with pytest.raises(BodyTooLarge):
        BoundedJSONParser().parse(stream, "application/json", {})

    assert stream.tell() == 1001


def test_a_body_at_the_limit_parses(settings) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = b'"' + b"a" * 998 + b'"'

    assert BoundedJSONParser().parse(io.BytesIO(body), "application/json", {}) == "a" * 998


def test_json_in_another_charset_is_an_unsupported_media_type(db) -> None:
    response = post_json(APIClient(), ENROLL, '{"name": "x"}'.encode("utf-16"), "application/json; charset=utf-16")

    assert "UTF-8" in assert_error_shape(response, 415, "unsupported_media_type")["message"]


def test_a_login_body_nested_100000_deep_is_refused(db) -> None:
    response = post_json(APIClient(), "/api/v1/auth/token/", DEPTH_BOMB)

    assert "nested deeper than 32" in assert_error_shape(response, 400, "invalid")["message"]


def test_a_well_formed_body_still_reaches_the_view(db) -> None:
    response = post_json(APIClient(), ENROLL, b'{"token": "nope", "name": "pc", "public_key": "x", "hardware": {},'
                                              b' "proof": "y"}')

    # The view ran: the token is unknown (a domain refusal), not a parse error.
    assert response.status_code in (400, 403)
    assert "refused" not in response.json()["error"]["message"]


# --- Django's error views under /api/ ----------------------------------------------------------------

def test_an_unknown_api_path_is_404_in_the_error_shape(db) -> None:
    assert_error_shape(APIClient().get("/api/v1/no-such-thing/"), 404, "not_found")
    assert_error_shape(APIClient().post("/api/v1/agent/enroll/", {}, format="json"), 404, "not_found")


def test_an_unknown_page_elsewhere_stays_html(db) -> None:
    response = APIClient().get("/no-such-page/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_an_uncaught_error_is_500_in_the_error_shape_without_a_traceback(api, contributor, monkeypatch) -> None:
    def explode(self, request):
        raise RuntimeError("secret internals: /srv/idlegrid/settings.py line 12")

    monkeypatch.setattr(DeviceListApi, "get", explode)
    client = api(contributor)
    client.raise_request_exception = False

    response = client.get("/api/v1/devices/")

    error = assert_error_shape(response, 500, "server_error")
    assert "secret internals" not in response.content.decode()
    assert "Traceback" not in response.content.decode()
    assert error["message"] == "the server failed on this request; the error was logged"


def test_a_disallowed_host_is_400_in_the_error_shape(db) -> None:
    # DisallowedHost is a SuspiciousOperation raised by middleware, before any view.
    response = APIClient().get("/api/v1/agent/keys", HTTP_HOST="evil.example")

    error = assert_error_shape(response, 400, "invalid")
    assert "ALLOWED_HOSTS" not in error["message"]


def test_a_disallowed_host_elsewhere_stays_html(db) -> None:
    response = APIClient().get("/healthz", HTTP_HOST="evil.example")

    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")


def test_django_refusing_a_body_as_too_big_answers_413_under_api() -> None:
    request = RequestFactory().post("/api/v1/jobs/")

    response = exception_handler.bad_request(request, RequestDataTooBig("too big"))

    assert response.status_code == 413
    assert json.loads(response.content)["error"]["code"] == "too_large"


def test_permission_denied_outside_drf_is_403_in_the_error_shape() -> None:
    request = RequestFactory().get("/api/schema/")

    response = exception_handler.permission_denied(request, PermissionDenied())

    assert response.status_code == 403
    assert json.loads(response.content) == {"error": {"code": "forbidden", "message": "you may not do this", "fields": {}}}


def test_permission_denied_elsewhere_stays_html() -> None:
    response = exception_handler.permission_denied(RequestFactory().get("/admin/"), PermissionDenied())

    assert response.status_code == 403
    assert response["Content-Type"].startswith("text/html")
