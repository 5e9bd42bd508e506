"""Webhooks through real processes: an endpoint registered through the API gets a job's events from the
Celery worker that consumes the `webhooks` queue, signed so the reference verifier accepts them; an
answer of 500 is retried by the beat-driven sweep."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks.webhooks import Webhook

from tests.e2e.conftest import Client, enrolled, mlp_job


@pytest.fixture
def receiver():
    """A loopback receiver that answers its first request with 500 and every later one with 204."""
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(500 if len(got) == 1 else 204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks", got
    server.shutdown()
    server.server_close()


def test_a_jobs_events_reach_a_registered_receiver_signed_and_retried(cluster, receiver):
    url, got = receiver
    submitter, alice, bob = (Client(cluster, name) for name in ("submitter", "alice", "bob"))
    created = submitter.http.post("/api/v1/webhooks/endpoints/", json={
        "url": url, "event_types": ["job.started", "job.completed"]})
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    job_id, _ = mlp_job(submitter, rows=20, rows_per_unit=10)
    for owner, name in [(alice, "alice-1"), (bob, "bob-1")]:
        cluster.start_agent(name, enrolled(cluster, owner, name), "--batch", "1", "--poll", "0.5")

    assert submitter.wait_for_job(job_id, cluster)["state"] == "completed"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and {json.loads(b)["type"] for _, b in got[1:]} != {"job.started", "job.completed"}:
        time.sleep(0.5)

    events = [Webhook(secret).verify(body, headers) for headers, body in got]
    assert {e["type"] for e in events[1:]} == {"job.started", "job.completed"}, events
    assert events[0] == next(e for e in events[1:] if e["type"] == events[0]["type"])  # the 500, sent again
    assert all(e["data"]["job"]["id"] == job_id for e in events)
    deliveries = submitter.http.get("/api/v1/webhooks/deliveries/").json()["results"]
    assert sorted(d["state"] for d in deliveries) == ["succeeded", "succeeded"]
    retried = next(d for d in deliveries if d["attempts_made"] == 2)
    attempts = submitter.http.get(f"/api/v1/webhooks/deliveries/{retried['id']}/").json()["attempts"]
    assert [a["status_code"] for a in attempts] == [500, 204]
