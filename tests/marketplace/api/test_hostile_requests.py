"""No request can make the API answer 500: hostile bodies sent to every endpoint that takes one, as each
kind of caller, and hostile numbers in query strings, headers and paths."""

from __future__ import annotations

import base64
import json
from urllib.parse import urlencode

import pytest
from django.conf import settings
from django.core.cache import cache
from django.urls import URLPattern, reverse
from rest_framework.test import APIClient

from marketplace.api import urls as api_urls

REFUSALS = {400, 401, 403, 404, 405, 413, 415}
BODY_METHODS = ("post", "put", "patch", "delete")
# Views that never read a body: a hostile one is ignored, never parsed, and the operation goes ahead.
BODY_IGNORED = {"enrollment-token-create", "logout", "logout-all", "token-revoke"}
# Path arguments by converter: an int no row has, a string of the right form.
PATH_ARGUMENTS = {"int": 1, "string": "0" * 64}


def body_operations() -> list[tuple[str, str]]:
    """(url name, method) of every API operation that may take a body, read from the URLconf itself, so a
    new endpoint is covered the day it is added."""
    operations = []
    for pattern in api_urls.urlpatterns:
        assert isinstance(pattern, URLPattern)
        view = pattern.callback.cls
        operations += [(pattern.name, method) for method in BODY_METHODS if hasattr(view, method)]
    return operations


def path_of(name: str) -> str:
    pattern = next(p for p in api_urls.urlpatterns if p.name == name)
    kwargs = {arg: PATH_ARGUMENTS[type(conv).__name__.removesuffix("Converter").lower()]
              for arg, conv in pattern.pattern.converters.items()}
    return reverse(f"api:{name}", kwargs=kwargs)


def hostile_bodies() -> dict[str, tuple[bytes, str]]:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return {
        "nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        "objects nested 50,000 deep": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json"),
        "one byte over the size limit": (b'"' + b"a" * (limit - 1) + b'"', "application/json"),
        "a 4,301-digit number": (b'{"max_units": ' + b"9" * 4301 + b', "result_ids": [' + b"9" * 4301 + b"]}",
                                 "application/json"),
        "NaN": (b'{"max_units": NaN, "elapsed_seconds": NaN, "spec": {"x": NaN}}', "application/json"),
        "1e999": (b'{"elapsed_seconds": 1e999, "hardware": {"cpus": 1e999}}', "application/json"),
        "invalid UTF-8": (b'{"name": "\xff\xfe"}', "application/json"),
        "U+0000": (b'{"name": "\\u0000", "hardware": {"os": "\\u0000"}, "spec": {"\\u0000": 1}}', "application/json"),
        "a lone surrogate": (b'{"name": "\\udc00", "hardware": {"os": "\\ud800"}}', "application/json"),
        "100,001 items": (b"[" + b"0," * 100_000 + b"0]", "application/json"),
        "UTF-16": ('{"max_units": 1}'.encode("utf-16"), "application/json; charset=utf-16"),
        "a bz2 charset": (b"{}", "application/json; charset=bz2_codec"),
    }


@pytest.fixture
def callers(api, contributor, make_device) -> dict[str, APIClient]:
    return {"anonymous": api(), "person": api(contributor), "device": make_device(contributor).client()}


@pytest.mark.parametrize(("name", "method"), body_operations(), ids=lambda value: str(value))
@pytest.mark.parametrize("caller", ["anonymous", "person", "device"])
def test_no_hostile_body_makes_any_endpoint_answer_500(callers, caller: str, name: str, method: str) -> None:
    client = callers[caller]
    client.raise_request_exception = False  # a crash must show as the 500 it would be, not as a test error
    path = path_of(name)
    answers = {}
    for label, (raw, content_type) in hostile_bodies().items():
        cache.clear()  # each body meets fresh throttle counters: a 429 would hide what the body does
        response = client.generic(method.upper(), path, raw, content_type=content_type)
        answers[label] = status = response.status_code
        if name in BODY_IGNORED:
            # It went ahead (or refused on its own terms: the tenth enrolment token in an hour is a 429).
            assert status < 300 or status in REFUSALS | {429}, (label, status, response.content[:300])
        else:
            assert status in REFUSALS, (label, status, response.content[:300])
        if status >= 400:
            error = json.loads(response.content)["error"]
            assert set(error) == {"code", "message", "fields"}, (label, error)

    assert len(answers) == len(hostile_bodies())


def test_the_table_covers_the_endpoints_that_take_json_bodies() -> None:
    names = {name for name, _ in body_operations()}

    assert {"token", "agent-enroll", "agent-lease", "agent-heartbeat", "agent-report", "agent-fail", "job-create",
            "wallet"} <= names


# --- numbers in query strings, headers and paths ----------------------------------------------------

ENTRIES = "/api/v1/ledger/entries/"


@pytest.mark.parametrize("query", [
    {"created_after": "²"}, {"created_after": "9" * 5000}, {"created_before": "2026-13-01"}, {"kind": "nonsense"},
    {"kind": "\x00"}, {"limit": "²"}, {"limit": "9" * 5000}, {"limit": "0"}, {"limit": "201"}, {"limit": "-1"},
    {"limit": ""},
], ids=["created_after superscript", "created_after 5000 digits", "created_before month 13", "kind unknown",
        "kind NUL", "limit superscript", "limit 5000 digits", "limit zero", "limit too many", "limit negative",
        "limit empty"])
def test_a_hostile_ledger_query_is_400_in_the_error_shape(api, contributor, query: dict) -> None:
    response = api(contributor).get(ENTRIES, query)

    assert response.status_code == 400
    assert json.loads(response.content)["error"]["code"] == "invalid"


@pytest.mark.parametrize("position", ["9" * 19, "9" * 5000, "-1", "abc", "\x00", "²"])
def test_a_forged_cursor_is_404_in_the_error_shape(api, contributor, position: str) -> None:
    # 19 digits pass a length bound but exceed 2**63 - 1; the others are no id at all (DRF sent them to the query).
    cursor = base64.b64encode(urlencode({"p": position}).encode()).decode()

    response = api(contributor).get(ENTRIES, {"cursor": cursor})

    assert response.status_code == 404
    assert json.loads(response.content)["error"] == {"code": "not_found", "message": "Invalid cursor", "fields": {}}


@pytest.mark.parametrize("device_id", ["9" * 5000, "9" * 20, "9" * 19, "0" * 30 + "1", "²"])
def test_a_hostile_device_id_is_401(make_device, contributor, device_id: str) -> None:
    device = make_device(contributor)
    client = APIClient()
    client.raise_request_exception = False

    response = client.post("/api/v1/agent/lease", {}, format="json",
                           HTTP_AUTHORIZATION=f"Device {device_id}:{device.secret}")

    assert response.status_code == 401
    assert json.loads(response.content)["error"]["code"] == "not_authenticated"


TOO_BIG = "99999999999999999999999"  # past a BigAutoField's range on SQLite and PostgreSQL alike


@pytest.mark.parametrize("path", [
    f"/api/v1/agent/results/{TOO_BIG}/report", f"/api/v1/agent/results/{TOO_BIG}/fail",
    f"/api/v1/agent/results/{'9' * 5000}/fail",
])
def test_a_result_id_past_any_row_is_404(make_device, contributor, path: str) -> None:
    client = make_device(contributor).client()
    client.raise_request_exception = False
    body = {"output_sha256": "0" * 64, "signature": "AA==", "error": "gave up"}

    response = client.post(path, body, format="json")

    assert response.status_code == 404
    assert json.loads(response.content)["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", [f"/api/v1/jobs/{TOO_BIG}/", f"/api/v1/jobs/{TOO_BIG}/output/",
                                  f"/api/v1/jobs/{'9' * 5000}/"])
def test_a_job_id_past_any_row_is_404(api, contributor, path: str) -> None:
    client = api(contributor)
    client.raise_request_exception = False

    response = client.get(path)

    assert response.status_code == 404
    assert json.loads(response.content)["error"]["code"] == "not_found"


# --- U+0000 in paths and query strings: PostgreSQL refuses a query on such text (a 500 there) --------

def test_an_artifact_name_holding_nul_is_404(api, contributor) -> None:
    response = api(contributor).get("/api/v1/artifacts/%00/")

    assert response.status_code == 404
    assert json.loads(response.content)["error"]["code"] == "not_found"


@pytest.mark.parametrize("address", ["\x00", "0x" + "0" * 39 + "\x00", "not an address"])
def test_a_payout_address_that_cannot_be_one_is_400(api, contributor, address: str) -> None:
    response = api(contributor).get("/api/v1/payouts/proof/", {"address": address})

    assert response.status_code == 400
    assert json.loads(response.content)["error"]["fields"] == {"address": "not an address"}
