"""The CLI's own behaviour over a scripted server (httpx.MockTransport): exit codes of `watch`, and the
`jobs` and `cancel` commands, whose endpoints are built on another branch (until they are merged, these
pin what the CLI expects of them; test_client_api.py runs the CLI against the real server)."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from idlegrid_client import cli
from idlegrid_client.client import Client
from tests.client.test_client import URL, Server, error, job_body, pages


@pytest.fixture
def serve(monkeypatch):
    """serve(*answers): the CLI's client talks to a scripted server; returns it (with its requests)."""

    def install(*answers) -> Server:
        server = Server(*answers)
        monkeypatch.setattr(cli, "_client", lambda args: Client(URL, "tok", transport=httpx.MockTransport(server),
                                                                     sleep=lambda _: None))
        return server

    return install


@pytest.mark.parametrize(("state", "code"), [("completed", cli.EXIT_OK), ("failed", cli.EXIT_JOB_FAILED),
                                             ("cancelled", cli.EXIT_JOB_CANCELLED)])
def test_watch_exits_with_the_code_of_how_the_job_ended(serve, capsys, state, code):
    serve(httpx.Response(200, json=job_body(state="running")),
          httpx.Response(200, json=job_body(state=state, units_done=4, error="a unit failed" if state == "failed" else "")))

    assert cli.main(["watch", "7", "--interval", "0"]) == code

    printed = capsys.readouterr().out
    assert f"job 7 {state}: 4/4 units, 2 valid and 0 invalid results" in printed
    assert ("a unit failed" in printed) == (state == "failed")


def test_watch_gives_up_at_its_timeout_with_its_own_code(serve, capsys):
    serve(*[httpx.Response(200, json=job_body())] * 2)

    assert cli.main(["watch", "7", "--timeout", "0"]) == cli.EXIT_TIMEOUT
    assert "still running" in capsys.readouterr().err


def test_watch_of_a_federated_job_shows_its_rounds(serve, capsys):
    fed = {"kind": "fedavg", "spec": {"rounds": 2, "shards": 2}}
    rounds = {"rounds_planned": 2, "training": None, "privacy": None, "target": None, "rounds": [
        {"round": 0, "weights_in_sha256": "a" * 64, "weights_sha256": "b" * 64, "updates": 2, "result_ids": [1, 2],
         "samples": 100, "train_loss": 1.25, "eval_loss": 0.75, "eval_accuracy": 0.8125, "aggregated_at": "2026"}]}
    server = serve(httpx.Response(200, json=job_body(state="completed", **fed)), httpx.Response(200, json=rounds))

    assert cli.main(["watch", "7"]) == cli.EXIT_OK

    assert server.requests[1].url.path == "/api/v1/jobs/7/rounds/"
    shown = capsys.readouterr().err
    assert "rounds (1/2)" in shown and "0.8125" in shown and "0.7500" in shown


def test_jobs_lists_every_page_as_a_table_or_as_json(serve, capsys):
    server = serve(*pages([9, 8], [7]))

    assert cli.main(["jobs", "--state", "running", "--state", "pending", "--kind", "inference", "--json"]) == cli.EXIT_OK

    assert [job["id"] for job in json.loads(capsys.readouterr().out)] == [9, 8, 7]
    assert server.requests[0].url.params.get_list("state") == ["running", "pending"]
    serve(*pages([9, 8], [7]))
    assert cli.main(["jobs", "--limit", "2"]) == cli.EXIT_OK
    table = capsys.readouterr().out
    assert "2 job(s)" in table and "│ 9" in table and "│ 7" not in table


def test_cancel_shows_the_job_cancelling_and_a_finished_job_is_refused_plainly(serve, capsys):
    serve(httpx.Response(200, json=job_body(state="cancelling")))
    assert cli.main(["cancel", "7"]) == cli.EXIT_OK
    assert "job 7 is cancelling" in capsys.readouterr().out

    serve(error(409, "conflict", "job 7 is completed; it cannot be cancelled"))
    assert cli.main(["cancel", "7"]) == cli.EXIT_ERROR
    said = capsys.readouterr().err
    assert "job 7 is completed" in said and "HTTP 409" in said and "Traceback" not in said


def test_download_round_fetches_that_rounds_aggregated_weights(serve, capsys, tmp_path):
    weights = b"round one weights"
    sha = hashlib.sha256(weights).hexdigest()
    rounds = {"rounds_planned": 2, "training": None, "privacy": None, "target": None, "rounds": [
        {"round": 1, "weights_in_sha256": "a" * 64, "weights_sha256": sha, "updates": 2, "result_ids": [1, 2],
         "samples": 100, "train_loss": 1.0, "eval_loss": 0.5, "eval_accuracy": 0.9, "aggregated_at": "2026"}]}
    server = serve(httpx.Response(200, json=rounds), httpx.Response(200, content=weights, headers={"X-Content-SHA256": sha}))

    assert cli.main(["download", "7", "--round", "1", "-o", str(tmp_path / "r1.safetensors"), "--json"]) == cli.EXIT_OK

    assert server.requests[1].url.path == f"/api/v1/artifacts/{sha}/"
    assert (tmp_path / "r1.safetensors").read_bytes() == weights
    assert json.loads(capsys.readouterr().out)["sha256"] == sha
    serve(httpx.Response(200, json=rounds))
    assert cli.main(["download", "7", "--round", "5", "-o", str(tmp_path / "r5")]) == cli.EXIT_ERROR
    assert "no aggregated round 5" in capsys.readouterr().err and not (tmp_path / "r5").exists()
