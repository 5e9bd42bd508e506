"""The API's lists: jobs, artifacts, devices and ledger entries. Each shows only the caller's rows, newest
first, a page at a time by an opaque cursor that inserts never shift; `limit` is 1..200; filters are
django-filter FilterSets whose bad values answer 400 in the error shape; a forged cursor answers 404."""

from __future__ import annotations

import base64
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.utils import timezone

from marketplace.jobs.models import Job
from marketplace.ledger.grants import balance_grant
from marketplace.workers.models import Device

JOBS, ARTIFACTS, DEVICES, ENTRIES = "/api/v1/jobs/", "/api/v1/artifacts/", "/api/v1/devices/", "/api/v1/ledger/entries/"


def make_jobs(owner, count: int, **fields) -> list[Job]:
    """Job rows as a list sees them (a list reads rows; submission has its own tests)."""
    return [Job.objects.create(owner=owner, kind=fields.get("kind", "inference"), spec={},
                               state=fields.get("state", Job.State.RUNNING)) for _ in range(count)]


def ids(response) -> list[int]:
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def forged(position: str) -> str:
    return base64.b64encode(urlencode({"p": position}).encode()).decode()


# --- jobs ----------------------------------------------------------------------------------------

def test_the_job_list_shows_only_your_jobs_newest_first(api, submitter, other_submitter):
    mine = make_jobs(submitter, 3)
    make_jobs(other_submitter, 2)

    response = api(submitter).get(JOBS)

    assert ids(response) == [job.pk for job in reversed(mine)]
    assert response.json()["next"] is None and response.json()["previous"] is None


def test_a_listed_job_says_what_its_detail_says(api, submitter, submit_job):
    job = submit_job(rows=10, rows_per_unit=4)

    (listed,) = api(submitter).get(JOBS).json()["results"]
    detail = api(submitter).get(f"{JOBS}{job.pk}/").json()

    # Whether any device can run the job costs two queries: the detail says, a list leaves it null.
    runnable = ("runnable_devices", "not_runnable_reason")
    assert {key: listed.pop(key) for key in runnable} == dict.fromkeys(runnable)
    assert detail["runnable_devices"] == 0 and "inference" in detail["not_runnable_reason"]  # no device enrolled
    assert listed == {key: value for key, value in detail.items() if key not in runnable}
    assert listed["units_total"] == 3 and listed["units_done"] == 0


def test_pages_follow_next_and_rows_created_meanwhile_shift_nothing(api, submitter):
    older = make_jobs(submitter, 5)
    client = api(submitter)

    first = client.get(JOBS, {"limit": 2})
    newer = make_jobs(submitter, 3)  # inserted between two pages: they belong before page 1, not in page 2
    second = client.get(first.json()["next"])
    third = client.get(second.json()["next"])

    assert ids(first) + ids(second) + ids(third) == [job.pk for job in reversed(older)]
    assert third.json()["next"] is None
    assert ids(client.get(second.json()["previous"])) == ids(first)
    assert ids(client.get(JOBS, {"limit": 2}))[:2] == [newer[2].pk, newer[1].pk]


@pytest.mark.parametrize("limit, status", [("1", 200), ("200", 200), ("0", 400), ("201", 400), ("-1", 400),
                                           ("abc", 400), ("", 400), ("9" * 5000, 400)])
def test_limit_is_1_to_200_and_anything_else_is_refused(api, submitter, limit, status):
    make_jobs(submitter, 2)

    response = api(submitter).get(JOBS, {"limit": limit})

    assert response.status_code == status
    if status == 400:
        assert response.json()["error"]["code"] == "invalid"
        assert "1..200" in response.json()["error"]["message"]
    else:
        assert len(response.json()["results"]) == min(int(limit), 2)


def test_a_page_holds_50_by_default(api, submitter):
    make_jobs(submitter, 51)

    response = api(submitter).get(JOBS)

    assert len(ids(response)) == 50 and response.json()["next"] is not None


def test_jobs_filter_by_one_or_more_states_and_by_kind(api, submitter):
    running = make_jobs(submitter, 1, state=Job.State.RUNNING)
    failed = make_jobs(submitter, 1, state=Job.State.FAILED)
    pending = make_jobs(submitter, 1, state=Job.State.PENDING)
    fedavg = make_jobs(submitter, 1, kind="fedavg", state=Job.State.COMPLETED)
    client = api(submitter)

    assert ids(client.get(JOBS, {"state": "running"})) == [running[0].pk]
    assert ids(client.get(f"{JOBS}?state=pending&state=failed")) == [pending[0].pk, failed[0].pk]
    assert ids(client.get(JOBS, {"kind": "fedavg"})) == [fedavg[0].pk]
    assert ids(client.get(JOBS, {"kind": "inference", "state": "completed"})) == []


def test_jobs_filter_by_creation_time(api, submitter):
    old, middle, new = make_jobs(submitter, 3)
    now = timezone.now()
    Job.objects.filter(pk=old.pk).update(created_at=now - timedelta(days=10))
    Job.objects.filter(pk=middle.pk).update(created_at=now - timedelta(days=5))
    client = api(submitter)
    since, until = (now - timedelta(days=6)).isoformat(), (now - timedelta(days=1)).isoformat()

    assert ids(client.get(JOBS, {"created_after": since})) == [new.pk, middle.pk]
    assert ids(client.get(JOBS, {"created_before": until})) == [middle.pk, old.pk]
    assert ids(client.get(JOBS, {"created_after": since, "created_before": until})) == [middle.pk]


@pytest.mark.parametrize("query, field", [
    ({"state": "exploded"}, "state"), ({"kind": "mining"}, "kind"), ({"created_after": "yesterday"}, "created_after"),
    ({"created_before": "2026-13-01T00:00:00Z"}, "created_before"), ({"kind": "\x00"}, "kind"),
    ({"created_before": "9999-12-31T23:00:00-23:00"}, "created_before"),  # past what UTC can say
])
def test_a_bad_filter_value_is_400_in_the_error_shape_and_names_the_parameter(api, submitter, query, field):
    response = api(submitter).get(JOBS, query)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid" and error["message"] == "the request is invalid"
    assert list(error["fields"]) == [field]


@pytest.mark.parametrize("cursor", [forged("abc"), forged("9" * 19), forged("1' OR 1=1"), "not base64 at all",
                                    base64.b64encode(b"r=x").decode(), base64.b64encode(b"o=-5").decode()])
def test_a_forged_cursor_is_404_never_a_500(api, submitter, cursor):
    make_jobs(submitter, 2)
    client = api(submitter)
    client.raise_request_exception = False

    response = client.get(JOBS, {"cursor": cursor})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_cursor_given_out_for_one_person_shows_another_only_their_own_rows(api, submitter, other_submitter):
    make_jobs(submitter, 3)
    theirs = make_jobs(other_submitter, 2)
    cursor = api(submitter).get(JOBS, {"limit": 1}).json()["next"]

    assert set(ids(api(other_submitter).get(cursor))) <= {job.pk for job in theirs}


def test_listing_jobs_spends_nothing_of_the_job_create_budget(api, submitter, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"],
                                                          "job_create": "1/minute"}}
    client = api(submitter)

    assert [client.get(JOBS).status_code for _ in range(3)] == [200, 200, 200]


# --- artifacts -----------------------------------------------------------------------------------

def test_the_artifact_list_shows_what_you_hold_newest_first_with_the_jobs_that_use_it(
        api, submitter, other_submitter, upload):
    first, second = upload(b"first", submitter), upload(b"second bytes", submitter)
    upload(b"someone else's", other_submitter)
    live = Job.objects.create(owner=submitter, kind="inference", spec={"dataset": first}, state=Job.State.RUNNING)
    Job.objects.create(owner=submitter, kind="inference", spec={"dataset": second}, state=Job.State.COMPLETED)

    rows = api(submitter).get(ARTIFACTS).json()["results"]

    assert [(r["sha256"], r["size"], r["in_use_by"]) for r in rows] == [(second, 12, []), (first, 5, [live.pk])]
    assert all(r["created_at"] for r in rows)


def test_shared_bytes_are_listed_for_each_holder_in_the_order_each_came_to_hold_them(api, submitter, other_submitter,
                                                                                      upload):
    shared = upload(b"shared", other_submitter)
    mine = upload(b"mine", submitter)
    upload(b"shared", submitter)  # the same bytes: stored once, now held by both

    assert [r["sha256"] for r in api(submitter).get(ARTIFACTS).json()["results"]] == [shared, mine]
    assert [r["sha256"] for r in api(other_submitter).get(ARTIFACTS).json()["results"]] == [shared]


def test_artifacts_page_and_filter_by_size_and_time(api, submitter, upload):
    from marketplace.artifacts.models import Artifact

    shas = [upload(b"x" * size, submitter) for size in (10, 20, 30, 40)]
    Artifact.objects.filter(pk=shas[0]).update(created_at=timezone.now() - timedelta(days=3))
    client = api(submitter)

    def listed(**query):
        response = client.get(ARTIFACTS, query)
        assert response.status_code == 200, response.content
        return [r["sha256"] for r in response.json()["results"]]

    first = client.get(ARTIFACTS, {"limit": 3}).json()
    assert [r["sha256"] for r in first["results"]] + [r["sha256"] for r in client.get(first["next"]).json()["results"]] \
        == shas[::-1]
    assert listed(size_min=20, size_max=30) == [shas[2], shas[1]]
    assert listed(created_before=(timezone.now() - timedelta(days=1)).isoformat()) == [shas[0]]
    assert client.get(ARTIFACTS, {"size_min": "9" * 30}).status_code == 400
    assert client.get(ARTIFACTS, {"size_max": "1e999"}).json()["error"]["fields"].keys() == {"size_max"}


def test_a_device_cannot_list_artifacts_but_still_uploads(api, contributor, make_device):
    device = make_device(contributor)

    assert device.client().get(ARTIFACTS).status_code == 403
    assert device.client().post(ARTIFACTS, b"output", content_type="application/octet-stream").status_code == 201


# --- devices -------------------------------------------------------------------------------------

def test_the_device_list_pages_newest_first_and_filters_by_state_and_hardware_class(
        api, contributor, other_contributor, make_device):
    laptop, desktop, server = (make_device(contributor, name=name) for name in ("laptop", "desktop", "server"))
    make_device(other_contributor)
    Device.objects.filter(pk=desktop.pk).update(state=Device.State.BANNED)
    Device.objects.filter(pk=server.pk).update(hardware_class="gpu-class")
    client = api(contributor)

    first = client.get(DEVICES, {"limit": 2})
    assert ids(first) + ids(client.get(first.json()["next"])) == [server.pk, desktop.pk, laptop.pk]
    assert ids(client.get(DEVICES, {"state": "banned"})) == [desktop.pk]
    assert ids(client.get(f"{DEVICES}?state=active&state=disabled")) == [server.pk, laptop.pk]
    assert ids(client.get(DEVICES, {"hardware_class": "gpu-class"})) == [server.pk]
    assert client.get(DEVICES, {"state": "asleep"}).json()["error"]["fields"].keys() == {"state"}
    assert client.get(DEVICES, {"hardware_class": "x" * 65}).status_code == 400


# --- ledger entries -----------------------------------------------------------------------------

def grant(user, key: str, amount: int = 10):
    balance_grant(user=user, amount=amount, actor="tests", reason="list test", idempotency_key=key)


def test_entries_page_by_cursor_and_filter_by_kind_and_time(api, submitter, other_submitter, submit_job):
    submit_job(rows=4, rows_per_unit=4)  # an escrow: two lines of the submitter's (balance and job escrow)
    grant(other_submitter, "theirs")
    client = api(submitter)

    everything = client.get(ENTRIES).json()["results"]
    assert [e["kind"] for e in everything] == ["escrow", "escrow", "grant"]
    first = client.get(ENTRIES, {"limit": 2})
    grant(submitter, "meanwhile")
    second = client.get(first.json()["next"])
    assert ids(first) + ids(second) == [e["id"] for e in everything]
    assert [e["kind"] for e in client.get(ENTRIES, {"kind": "grant"}).json()["results"]] == ["grant", "grant"]
    assert ids(client.get(ENTRIES, {"created_after": timezone.now().isoformat()})) == []
    assert client.get(ENTRIES, {"kind": "theft"}).status_code == 400


def test_a_time_with_an_offset_postgresql_refuses_is_read_as_the_same_instant_in_utc(api, submitter, submit_job):
    # Python takes offsets to +-24 h, PostgreSQL to +-15:59: this query was a 500 on PostgreSQL (schemathesis)
    job = submit_job()

    response = api(submitter).get(JOBS, {"created_after": "2000-01-01T00:00:00-18:48",
                                         "created_before": "6783-05-28T09:23:38+18:48"})

    assert response.status_code == 200, response.json()
    assert ids(response) == [job.pk]
