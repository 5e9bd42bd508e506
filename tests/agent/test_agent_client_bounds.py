"""The agent reads the server's answers bounded: a deep, huge or non-JSON answer is an AgentError saying
so, an error answer is read only so far, and nothing is retried that a retry would not fix."""

from __future__ import annotations

import random

import httpx
import pytest

from worker_agent import client as client_module
from worker_agent.client import AgentClient, AgentError, ApiError, RetryPolicy

DEEP = b"[" * 100_000 + b"]" * 100_000


def client_answering(*responses: httpx.Response) -> tuple[AgentClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    pending = list(responses)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return pending.pop(0)

    agent = AgentClient("http://server", device=(7, "secret"), retry=RetryPolicy(attempts=3),
                        transport=httpx.MockTransport(handle), sleep=lambda _: None, rng=random.Random(1))
    return agent, seen


def test_an_answer_nested_100000_deep_is_an_agent_error_not_a_crash() -> None:
    agent, seen = client_answering(httpx.Response(200, content=DEEP))

    with pytest.raises(AgentError, match="the server's answer is refused: nested deeper than 64"):
        agent.lease(1)

    assert len(seen) == 1  # not retried: the same server would send the same answer


@pytest.mark.parametrize(("content", "reason"), [
    (b'{"leases": [], "retry_after": NaN}', "NaN/Infinity are not JSON"),
    (b'{"retry_after": ' + b"9" * 4301 + b"}", "a number of more than 100 digits"),
    (b'{"leases": "\xff"}', "not UTF-8"),
    (b"<html>gateway</html>", "not JSON"),
])
def test_an_answer_the_reader_refuses_says_why(content: bytes, reason: str) -> None:
    agent, _ = client_answering(httpx.Response(200, content=content))

    with pytest.raises(AgentError, match=reason):
        agent.lease(1)


def test_an_answer_past_the_size_bound_stops_being_read(monkeypatch) -> None:
    monkeypatch.setattr(client_module, "MAX_ANSWER_BYTES", 1000)
    sent: list[int] = []

    def body():
        for _ in range(100):
            sent.append(1)
            yield b" " * 100

    agent, _ = client_answering(httpx.Response(200, content=body()))

    with pytest.raises(AgentError, match="an answer larger than 1000 bytes"):
        agent.lease(1)

    assert len(sent) == 11  # 1,100 bytes read, not 10,000


def test_a_well_formed_answer_still_parses() -> None:
    agent, _ = client_answering(httpx.Response(200, json={"leases": [], "retry_after": 5}))

    assert agent.lease(1) == {"leases": [], "retry_after": 5}


def test_a_deep_error_answer_becomes_an_api_error_with_its_text() -> None:
    agent, _ = client_answering(httpx.Response(400, content=DEEP))

    with pytest.raises(ApiError) as caught:
        agent.lease(1)

    assert caught.value.status == 400
    assert caught.value.message == "[" * 200  # the start of the body, as text


def test_an_error_answer_is_read_only_as_far_as_its_message_needs(monkeypatch) -> None:
    monkeypatch.setattr(client_module, "MAX_ERROR_BYTES", 100)
    sent: list[int] = []

    def body():
        for _ in range(1000):
            sent.append(1)
            yield b"x" * 10

    agent, _ = client_answering(httpx.Response(403, content=body()))

    with pytest.raises(ApiError, match="xxxx"):
        agent.lease(1)

    assert len(sent) == 10


def test_an_error_answer_in_the_protocol_shape_keeps_its_code() -> None:
    error = {"error": {"code": "lease_expired", "message": "the lease expired", "fields": {}}}
    agent, _ = client_answering(httpx.Response(409, json=error))

    with pytest.raises(ApiError) as caught:
        agent.report(3, {"output_sha256": "0" * 64, "signature": "AA=="})

    assert (caught.value.code, caught.value.message) == ("lease_expired", "the lease expired")


def test_api_error_from_a_read_response_is_bounded_too() -> None:
    error = ApiError.from_response(httpx.Response(400, content=DEEP))

    assert error.code == "" and error.message.startswith("[[[")
