"""Retries and refusals on the wire, and the artifact cache's hash check."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from worker_agent.artifacts import ArtifactCache, ArtifactError
from worker_agent.client import AgentClient, ApiError, RetryPolicy, ServerUnavailable

Handler = Callable[[httpx.Request], httpx.Response]


def scripted(*steps: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    """A handler answering each request with the next step (an exception is raised, as a network error)."""
    seen: list[httpx.Request] = []
    remaining = list(steps)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        step = remaining.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    return handle, seen


def client_for(handler: Handler, sleeps: list[float], *, attempts: int = 5, cap: float = 30.0) -> AgentClient:
    return AgentClient(
        "http://server",
        device=(7, "secret"),
        retry=RetryPolicy(attempts=attempts, base_seconds=0.5, cap_seconds=cap),
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
        rng=random.Random(4),
    )


def test_server_errors_are_retried_with_backoff_until_the_server_answers(caplog: pytest.LogCaptureFixture) -> None:
    handler, seen = scripted(
        httpx.Response(503), httpx.Response(502), httpx.Response(200, json={"leases": [], "retry_after": 5})
    )
    sleeps: list[float] = []

    with caplog.at_level(logging.WARNING, logger="worker_agent.client"):
        answer = client_for(handler, sleeps).lease(4)

    assert answer == {"leases": [], "retry_after": 5}
    assert len(seen) == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0  # full jitter under 0.5 * 2**n
    assert "HTTP 503 Service Unavailable; retry 1/4" in caplog.text


def test_connection_errors_are_retried() -> None:
    handler, seen = scripted(httpx.ConnectError("refused"), httpx.Response(200, json={"renewed": [1], "lost": []}))
    sleeps: list[float] = []

    answer = client_for(handler, sleeps).heartbeat([1])

    assert answer["renewed"] == [1]
    assert len(seen) == 2 and len(sleeps) == 1


def test_a_400_is_not_retried_and_surfaces_the_servers_message() -> None:
    body = {"error": {"code": "invalid", "message": "max_units must be at most 64", "fields": {"max_units": ["too big"]}}}
    handler, seen = scripted(httpx.Response(400, json=body))
    sleeps: list[float] = []

    with pytest.raises(ApiError) as caught:
        client_for(handler, sleeps).lease(65)

    assert caught.value.status == 400 and caught.value.code == "invalid"
    assert caught.value.message == "max_units must be at most 64"
    assert caught.value.fields == {"max_units": ["too big"]}
    assert len(seen) == 1 and sleeps == []


def test_a_429_waits_at_least_as_long_as_the_server_asks() -> None:
    handler, _ = scripted(httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(200, json={}))
    sleeps: list[float] = []

    client_for(handler, sleeps).lease(1)

    assert len(sleeps) == 1 and sleeps[0] >= 7


def test_it_gives_up_after_the_last_attempt() -> None:
    handler, seen = scripted(*[httpx.Response(500)] * 3)
    sleeps: list[float] = []

    with pytest.raises(ServerUnavailable, match="gave up after 3 attempt"):
        client_for(handler, sleeps, attempts=3).lease(1)

    assert len(seen) == 3 and len(sleeps) == 2


def test_backoff_grows_exponentially_and_never_passes_the_cap() -> None:
    policy, rng = RetryPolicy(base_seconds=0.5, cap_seconds=4.0), random.Random(1)

    delays = [policy.delay(retry, rng) for retry in range(12) for _ in range(50)]

    assert max(delays[:50]) <= 0.5 and max(delays[50:100]) <= 1.0
    assert max(delays) <= 4.0 and max(delays[-50:]) > 2.0  # capped, but the cap is reached


def test_every_agent_call_carries_the_device_credentials() -> None:
    handler, seen = scripted(httpx.Response(200, json={}))

    client_for(handler, []).lease(1)

    assert seen[0].headers["Authorization"] == "Device 7:secret"


def test_uploads_stream_the_file_with_its_declared_hash(tmp_path: Path) -> None:
    data = b"output bytes" * 1000
    source = tmp_path / "out"
    source.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    handler, seen = scripted(httpx.Response(503), httpx.Response(201, json={"sha256": sha, "size": len(data)}))

    client_for(handler, []).upload(source, sha)

    request = seen[-1]
    assert request.url.path == "/api/v1/artifacts/"
    assert request.headers["Content-Type"] == "application/octet-stream"
    assert request.headers["X-Content-SHA256"] == sha
    assert request.headers["Content-Length"] == str(len(data))  # a length, not chunked: any WSGI server copes
    assert request.read() == data  # the retry resent the whole file


def test_the_artifact_fetch_rejects_bytes_that_do_not_match_their_hash(tmp_path: Path) -> None:
    expected = hashlib.sha256(b"the real weights").hexdigest()
    handler, _ = scripted(httpx.Response(200, content=b"tampered weights"))
    cache = ArtifactCache(tmp_path / "cache", client_for(handler, []))

    with pytest.raises(ArtifactError, match=f"artifact {expected[:12]} arrived with sha256"):
        cache.ensure(expected)

    assert list((tmp_path / "cache").iterdir()) == []  # neither the file nor a partial download remains


def test_the_artifact_fetch_keeps_verified_bytes_under_their_hash(tmp_path: Path) -> None:
    data = b"the real weights"
    sha = hashlib.sha256(data).hexdigest()
    handler, seen = scripted(httpx.Response(200, content=data))
    cache = ArtifactCache(tmp_path / "cache", client_for(handler, []))

    first, second = cache.ensure(sha), cache.ensure(sha)

    assert first == second == tmp_path / "cache" / sha
    assert first.read_bytes() == data
    assert [request.url.path for request in seen] == [f"/api/v1/artifacts/{sha}/"]  # the second came from the cache
