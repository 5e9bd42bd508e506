"""The client's own behaviour, against httpx.MockTransport: what it does with answers a live server
seldom gives on cue (a 429 with Retry-After, a 5xx, a dropped connection, a wrong checksum, a next link
elsewhere). That it speaks the real API is tested against the real server (test_client_api.py, and
tests/e2e/test_cli.py through the CLI)."""

from __future__ import annotations

import hashlib
import json
import stat

import httpx
import pytest

from idlegrid_client import config
from idlegrid_client.client import (
    NO_RETRY,
    ApiError,
    BadAnswer,
    ChecksumMismatch,
    Client,
    Job,
    RetryPolicy,
    ServerUnreachable,
    WaitTimeout,
)

URL = "http://market.test"
DEFAULT_RETRY = RetryPolicy()


def job_body(job_id: int = 7, state: str = "running", **fields) -> dict:
    return {"id": job_id, "kind": "inference", "state": state, "spec": {"rows_per_unit": 10},
            "units_total": 4, "units_done": 1, "units_error": 0, "results_valid": 2, "results_invalid": 0,
            "results_per_unit": 2.0, "corrections": 0, "output_sha256": None, "error": "",
            "created_at": "2026-12-03T10:00:00Z", "started_at": None, "finished_at": None, **fields}


def error(status: int, code: str, message: str, fields=None, headers=None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "fields": fields or {}}},
                          headers=headers)


class Server:
    """A scripted server: answers in order, and keeps every request it was sent."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer


def client_for(server: Server, *, sleeps: list[float] | None = None, retry: RetryPolicy = DEFAULT_RETRY) -> Client:
    return Client(URL, "tok", transport=httpx.MockTransport(server), retry=retry,
                  sleep=(sleeps if sleeps is not None else []).append)


# --- retries ----------------------------------------------------------------------------------------

def test_a_429_is_sent_again_after_the_seconds_its_retry_after_asks_for():
    server = Server(error(429, "throttled", "slow down", headers={"Retry-After": "7"}), httpx.Response(200, json=job_body()))
    sleeps: list[float] = []

    job = client_for(server, sleeps=sleeps).job(7)

    assert job.id == 7 and job.state == "running"
    assert len(server.requests) == 2
    assert sleeps == [7.0]  # the jitter (at most 0.5 s on a first retry) never shortens the server's wait


def test_a_429_asking_for_longer_than_the_client_waits_is_raised_at_once():
    server = Server(error(429, "throttled", "come back in an hour", headers={"Retry-After": "3600"}))
    sleeps: list[float] = []

    with pytest.raises(ApiError) as refused:
        client_for(server, sleeps=sleeps).job(7)

    assert (refused.value.status, refused.value.code) == (429, "throttled")
    assert sleeps == [] and len(server.requests) == 1


def test_a_submission_retried_after_a_5xx_sends_the_same_idempotency_key_each_time():
    server = Server(error(503, "server_error", "busy"), httpx.ReadTimeout("no answer"),
                    httpx.Response(201, json=job_body(state="pending")))

    job = client_for(server).submit("inference", {"dataset": "ab" * 32})

    assert job.state == "pending"
    keys = [r.headers["Idempotency-Key"] for r in server.requests]
    assert len(keys) == 3 and len(set(keys)) == 1 and len(keys[0]) == 36  # one uuid4 for every attempt
    assert json.loads(server.requests[0].content) == {"kind": "inference", "spec": {"dataset": "ab" * 32}}


def test_an_idempotency_key_in_flight_is_asked_again_shortly():
    server = Server(error(409, "idempotency_key_in_flight", "still running"), httpx.Response(201, json=job_body()))
    sleeps: list[float] = []

    client_for(server, sleeps=sleeps).submit("inference", {}, idempotency_key="key-1")

    assert [r.headers["Idempotency-Key"] for r in server.requests] == ["key-1", "key-1"]
    assert sleeps[0] >= 1.0


def test_a_post_without_a_key_is_not_sent_again_once_it_may_have_reached_the_server():
    server = Server(httpx.ReadTimeout("no answer"))

    with pytest.raises(ServerUnreachable, match="not sent again"):
        client_for(server).login("alice", "secret")

    assert len(server.requests) == 1  # a second login would make a second token


def test_a_post_without_a_key_is_not_sent_again_after_a_5xx():
    server = Server(httpx.Response(502, text="<html>Bad Gateway</html>"))

    with pytest.raises(ApiError) as refused:
        client_for(server).login("alice", "secret")

    assert refused.value.status == 502 and "Bad Gateway" in refused.value.message
    assert len(server.requests) == 1


def test_a_connection_that_never_opened_is_retried_whatever_the_request():
    token = {"token": "t" * 64, "expiry": "2027-01-01T00:00:00Z", "token_key": "t" * 15}
    server = Server(httpx.ConnectError("refused"), httpx.ConnectError("refused"), httpx.Response(201, json=token))
    sleeps: list[float] = []
    client = client_for(server, sleeps=sleeps)

    info = client.login("alice", "secret")

    assert info.token_key == "t" * 15 and len(server.requests) == 3 and len(sleeps) == 2
    assert sleeps[0] <= 0.5 and sleeps[1] <= 1.0  # full jitter under a doubling cap


def test_the_server_unreachable_after_every_retry_is_said_plainly():
    server = Server(*[httpx.ConnectError("[Errno 111] Connection refused")] * 3)

    with pytest.raises(ServerUnreachable, match="cannot reach http://market.test"):
        client_for(server, retry=RetryPolicy(attempts=3)).job(1)

    assert len(server.requests) == 3


# --- errors -----------------------------------------------------------------------------------------

def test_the_apis_error_body_becomes_an_api_error_with_code_message_and_fields():
    server = Server(error(400, "invalid", "the job spec is invalid", {"rows_per_unit": "must be an integer"}))

    with pytest.raises(ApiError) as refused:
        client_for(server).quote("inference", {"rows_per_unit": "many"})

    problem = refused.value
    assert (problem.status, problem.code, problem.message) == (400, "invalid", "the job spec is invalid")
    assert problem.fields == {"rows_per_unit": "must be an integer"}
    assert str(problem) == "the job spec is invalid (HTTP 400 invalid): rows_per_unit: must be an integer"
    assert len(server.requests) == 1  # a 4xx is the server's answer: not retried


def test_an_answer_nested_past_the_bound_is_refused_not_parsed():
    server = Server(httpx.Response(200, content=b"[" * 100 + b"]" * 100))

    with pytest.raises(BadAnswer, match="refused"):
        client_for(server).job(7)


def test_a_job_missing_a_field_is_a_bad_answer():
    body = job_body()
    del body["state"]

    with pytest.raises(BadAnswer, match="state"):
        client_for(Server(httpx.Response(200, json=body))).job(7)


# --- pagination -------------------------------------------------------------------------------------

def pages(*pages_of_ids: list[int]):
    """Pages of jobs linked by `next` cursors, as the list endpoint answers."""
    answers = []
    for number, ids in enumerate(pages_of_ids):
        last = number == len(pages_of_ids) - 1
        answers.append(httpx.Response(200, json={
            "next": None if last else f"{URL}/api/v1/jobs/?cursor=c{number + 1}&limit=2",
            "previous": None if number == 0 else f"{URL}/api/v1/jobs/?cursor=p{number}",
            "results": [job_body(job_id) for job_id in ids]}))
    return answers


def test_the_job_list_follows_next_until_the_last_page():
    server = Server(*pages([9, 8], [7, 6], [5]))

    jobs = list(client_for(server).jobs(state=["running", "pending"], kind="inference", page_size=2))

    assert [job.id for job in jobs] == [9, 8, 7, 6, 5]
    first = server.requests[0].url
    assert first.path == "/api/v1/jobs/"
    assert first.params.get_list("state") == ["running", "pending"]
    assert (first.params["kind"], first.params["limit"]) == ("inference", "2")
    assert [r.url.params.get("cursor") for r in server.requests] == [None, "c1", "c2"]


def test_the_job_list_stops_reading_pages_at_its_limit():
    server = Server(*pages([9, 8], [7, 6], [5]))

    jobs = list(client_for(server).jobs(limit=3, page_size=2))

    assert [job.id for job in jobs] == [9, 8, 7]
    assert len(server.requests) == 2  # the third page is never asked for


def test_a_page_size_is_kept_within_the_endpoints_bound():
    server = Server(*pages([1]))

    list(client_for(server).jobs(page_size=5000))

    assert server.requests[0].url.params["limit"] == "200"


def test_a_next_link_naming_another_host_is_asked_of_this_marketplace_so_the_token_goes_nowhere_else():
    page = httpx.Response(200, json={"next": "http://elsewhere.test/prefix/api/v1/jobs/?cursor=c1", "previous": None,
                                     "results": [job_body(2)]})
    server = Server(page, *pages([1]))

    jobs = list(client_for(server).jobs())

    assert [job.id for job in jobs] == [2, 1]
    followed = server.requests[1].url
    assert (followed.host, followed.path, followed.params["cursor"]) == ("market.test", "/prefix/api/v1/jobs/", "c1")
    assert server.requests[1].headers["Authorization"] == "Token tok"


def test_a_page_names_its_next_cursor_for_integrators_who_page_themselves():
    server = Server(*pages([9, 8], [7]))
    client = client_for(server)

    first = client.jobs_page(limit=2)
    second = client.jobs_page(limit=2, cursor=first.next_cursor)

    assert first.next_cursor == "c1" and second.next_cursor is None
    assert [job.id for job in second.results] == [7]
    assert server.requests[1].url.params["cursor"] == "c1"


# --- cancel (the endpoint is built on another branch: these pin the client's half of its contract) ---

def test_cancel_posts_to_the_jobs_cancel_endpoint_and_returns_the_job_cancelling():
    server = Server(httpx.Response(200, json=job_body(state="cancelling")))

    job = client_for(server).cancel(7)

    assert job.state == "cancelling" and not job.finished
    request = server.requests[0]
    assert (request.method, request.url.path) == ("POST", "/api/v1/jobs/7/cancel/")
    assert request.headers["Idempotency-Key"]


def test_cancelling_a_finished_job_is_the_servers_409():
    server = Server(error(409, "conflict", "job 7 is completed; it cannot be cancelled"))

    with pytest.raises(ApiError) as refused:
        client_for(server).cancel(7)

    assert refused.value.status == 409 and len(server.requests) == 1


def test_a_cancelled_job_is_finished_for_wait():
    server = Server(httpx.Response(200, json=job_body(state="cancelling")),
                    httpx.Response(200, json=job_body(state="cancelled")))

    assert client_for(server).wait(7).state == "cancelled"


# --- wait -------------------------------------------------------------------------------------------

def test_wait_polls_until_the_job_finished_backing_off_while_nothing_moves():
    still = httpx.Response(200, json=job_body(units_done=1))
    server = Server(still, httpx.Response(200, json=job_body(units_done=1)), httpx.Response(200, json=job_body(units_done=1)),
                    httpx.Response(200, json=job_body(units_done=3)), httpx.Response(200, json=job_body(state="completed")))
    sleeps: list[float] = []
    seen: list[Job] = []

    job = client_for(server, sleeps=sleeps).wait(7, poll=1.0, max_poll=2.0, on_update=seen.append)

    assert job.state == "completed" and len(seen) == 5
    assert sleeps == [1.0, 1.5, 2.0, 1.0]  # backs off while nothing changes, quick again once it moves


def test_wait_gives_up_at_its_timeout():
    server = Server(*[httpx.Response(200, json=job_body())] * 3)

    with pytest.raises(WaitTimeout, match="still running"):
        client_for(server).wait(7, timeout=0.0)


# --- transfers --------------------------------------------------------------------------------------

def test_an_upload_streams_the_file_with_its_sha256_and_length(tmp_path):
    data = b"\x01" * (3 * 1024 * 1024 + 5)
    (tmp_path / "w.safetensors").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    received = {}

    def store(request: httpx.Request) -> httpx.Response:
        received["body"] = request.read()
        return httpx.Response(201, json={"sha256": sha, "size": len(data)})

    server = Server(store)
    progress: list[tuple[int, int | None]] = []

    assert client_for(server).upload(tmp_path / "w.safetensors", progress=lambda d, t: progress.append((d, t))) == sha

    request = server.requests[0]
    assert request.headers["X-Content-SHA256"] == sha
    assert request.headers["Content-Length"] == str(len(data)) and "Transfer-Encoding" not in request.headers
    assert request.headers["Content-Type"] == "application/octet-stream"
    assert received["body"] == data
    assert progress[0] == (0, len(data)) and progress[-1] == (len(data), len(data)) and len(progress) == 5


def output_answer(data: bytes, declared: str) -> httpx.Response:
    return httpx.Response(200, content=data, headers={"X-Content-SHA256": declared, "Content-Length": str(len(data))})


def test_a_download_is_written_whole_and_checked_then_renamed_into_place(tmp_path):
    data = b"safetensors bytes" * 1000
    server = Server(output_answer(data, hashlib.sha256(data).hexdigest()))
    progress: list[tuple[int, int | None]] = []

    sha = client_for(server).download(7, tmp_path / "out.safetensors", progress=lambda d, t: progress.append((d, t)))

    assert sha == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out.safetensors").read_bytes() == data
    assert server.requests[0].url.path == "/api/v1/jobs/7/output/"
    assert progress[-1] == (len(data), len(data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_a_download_whose_bytes_do_not_match_the_declared_sha256_is_refused_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"the previous download")
    server = Server(output_answer(b"tampered bytes", "0" * 64))

    with pytest.raises(ChecksumMismatch, match="0000000000"):
        client_for(server).download(7, target)

    assert target.read_bytes() == b"the previous download"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no partial file left


def test_a_download_cut_short_is_started_again_from_the_first_byte(tmp_path):
    data = b"x" * 5000
    server = Server(httpx.RemoteProtocolError("peer closed connection"), output_answer(data, hashlib.sha256(data).hexdigest()))

    client_for(server).download(7, tmp_path / "out.bin")

    assert (tmp_path / "out.bin").read_bytes() == data and len(server.requests) == 2


def test_a_download_of_a_job_not_yet_completed_is_the_servers_409(tmp_path):
    server = Server(error(409, "conflict", "job 7 is running; its output exists once it is completed"))

    with pytest.raises(ApiError, match="is running"):
        client_for(server, retry=NO_RETRY).download(7, tmp_path / "out.bin")

    assert list(tmp_path.iterdir()) == []


# --- configuration ------------------------------------------------------------------------------------

def test_login_saves_the_token_readable_by_its_owner_alone(tmp_path):
    path = tmp_path / "idlegrid" / "config.toml"

    config.write_config(path, url="http://market.test", token='to"ken')

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert config.read_config(path) == {"url": "http://market.test", "token": 'to"ken'}


def test_a_flag_beats_the_environment_which_beats_the_config_file(tmp_path):
    path = tmp_path / "config.toml"
    config.write_config(path, url="http://saved.test", token="saved-token")
    environ = {config.CONFIG_ENV: str(path)}

    assert config.resolve(environ=environ) == config.Settings("http://saved.test", "saved-token", path)
    with_env = {**environ, config.URL_ENV: "http://saved.test/", config.TOKEN_ENV: "env-token"}
    assert config.resolve(environ=with_env).token == "env-token"
    assert config.resolve(token="flag-token", environ=with_env).token == "flag-token"


def test_the_saved_token_is_never_sent_to_another_marketplace(tmp_path):
    path = tmp_path / "config.toml"
    config.write_config(path, url="http://saved.test", token="saved-token")

    settings = config.resolve(url="http://other.test", environ={config.CONFIG_ENV: str(path)})

    assert (settings.url, settings.token) == ("http://other.test", None)


def test_without_anything_configured_the_url_is_the_local_marketplace(tmp_path):
    settings = config.resolve(environ={"XDG_CONFIG_HOME": str(tmp_path)})

    assert settings == config.Settings(config.DEFAULT_URL, None, tmp_path / "idlegrid" / "config.toml")
