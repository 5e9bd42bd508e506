"""The agent's side of the long poll (docs/protocol.md, "Long poll"), against the stub marketplace: when it
asks the server to wait, how long it then pauses, and what it does when a server refuses or a stop comes."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import httpx
import pytest
from agent_stub import StubMarketplace
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_agent_loop import mlp_unit

from worker_agent import agent as agent_module
from worker_agent.agent import Agent, RunOptions
from worker_agent.client import AgentClient
from worker_agent.shutdown import Shutdown, WaitInterrupted
from worker_agent.state import DeviceState, StateDir

LEASE = "/api/v1/agent/lease"


class Leases:
    """Answers the agent's lease requests from a script of (status, body) and records what it sent."""

    def __init__(self, stub: StubMarketplace, script: list[tuple[int, dict[str, Any]]]) -> None:
        self.stub, self.script = stub, list(script)
        self.bodies: list[dict[str, Any]] = []
        self.read_timeouts: list[float | None] = []
        self.on_last: Any = None
        self.honest = stub.handle

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != LEASE:
            return self.honest(request)
        self.bodies.append(json.loads(request.content))
        self.read_timeouts.append(request.extensions.get("timeout", {}).get("read"))
        if len(self.script) <= 1 and self.on_last is not None:
            self.on_last()
        status, body = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if status == 200 and body.get("leases") == "queued":
            return self.honest(request)
        return httpx.Response(status, json=body)


def idle_agent(stub: StubMarketplace, device: DeviceState, key: Ed25519PrivateKey, state: StateDir,
               script: list[tuple[int, dict[str, Any]]], **options: Any) -> tuple[Agent, Leases, list[float]]:
    leases = Leases(stub, script)
    client = AgentClient("http://stub", device=(device.device_id, device.device_secret),
                         transport=httpx.MockTransport(leases.handle), sleep=lambda _: None)
    agent = Agent(client=client, device=device, key=key, state=state,
                  options=RunOptions(**{"poll_seconds": 5.0, **options}))
    pauses: list[float] = []

    def idle(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) >= 4:
            agent.shutdown.request_warm("test")

    agent._idle = idle  # type: ignore[method-assign]
    return agent, leases, pauses


EMPTY_AFTER_A_WAIT = (200, {"leases": [], "retry_after": 0})
EMPTY_AT_ONCE = (200, {"leases": [], "retry_after": 2})


def test_an_idle_agent_asks_the_server_to_wait_from_its_second_request_on(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    agent, leases, pauses = idle_agent(stub, enrolled, device_key, state, [EMPTY_AT_ONCE, EMPTY_AFTER_A_WAIT])

    agent.run()

    assert len(leases.bodies) == 4
    assert "wait_seconds" not in leases.bodies[0]  # a run's first request: answered at once, as ever
    assert [body["wait_seconds"] for body in leases.bodies[1:]] == [25, 25, 25]
    assert leases.read_timeouts[0] == 30.0 and leases.read_timeouts[1] == 55.0  # above the wait
    # After the server held a request to its end (retry_after 0), the agent asks again almost at once.
    assert pauses == [5.0, agent_module.AFTER_WAIT_SECONDS, agent_module.AFTER_WAIT_SECONDS,
                      agent_module.AFTER_WAIT_SECONDS]


def test_against_a_server_that_answers_at_once_it_polls_as_before(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    """An old server ignores wait_seconds and answers with its retry_after (at least 1): the poll interval."""
    agent, leases, pauses = idle_agent(stub, enrolled, device_key, state, [EMPTY_AT_ONCE])

    agent.run()

    assert pauses == [5.0, 5.0, 5.0, 5.0]
    assert leases.bodies[1]["wait_seconds"] == 25


def test_a_server_that_refuses_wait_seconds_is_asked_without_it_from_then_on(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    refusal = {"error": {"code": "invalid", "message": "the request is invalid",
                         "fields": {"wait_seconds": ["unknown field"]}}}
    agent, leases, pauses = idle_agent(stub, enrolled, device_key, state, [EMPTY_AT_ONCE, (400, refusal), EMPTY_AT_ONCE])

    agent.run()

    assert ["wait_seconds" in body for body in leases.bodies] == [False, True, False, False, False]
    assert pauses == [5.0, 5.0, 5.0, 5.0]


def test_wait_zero_turns_the_long_poll_off(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    agent, leases, _ = idle_agent(stub, enrolled, device_key, state, [EMPTY_AT_ONCE], wait_seconds=0)

    agent.run()

    assert not [body for body in leases.bodies if "wait_seconds" in body]


def test_a_burst_agent_stops_at_the_first_empty_answer_without_waiting_for_one(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    agent, leases, _ = idle_agent(stub, enrolled, device_key, state, [EMPTY_AT_ONCE], burst=True)

    agent.run()

    assert len(leases.bodies) == 1 and "wait_seconds" not in leases.bodies[0]


def test_work_that_comes_to_a_waiting_agent_after_it_was_told_to_stop_is_handed_back(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    stub.add_unit(mlp_unit(stub), result_id=70, unit_id=7)
    agent, leases, _ = idle_agent(stub, enrolled, device_key, state,
                                  [EMPTY_AT_ONCE, (200, {"leases": "queued"})])
    leases.on_last = lambda: agent.shutdown.request_warm("test")  # SIGTERM while the waited request is out

    summary = agent.run()

    assert leases.bodies[-1]["wait_seconds"] == 25
    assert stub.releases == [70] and summary.given_back == 1 and summary.done == 0


def test_the_first_signal_cuts_an_interruptible_wait_short_and_stops_warm() -> None:
    with Shutdown() as shutdown:
        with pytest.raises(WaitInterrupted), shutdown.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
        assert shutdown.warm.is_set() and not shutdown.cold
        with pytest.raises(WaitInterrupted), shutdown.interruptible():
            pass  # already stopping: no wait begins


def test_outside_an_interruptible_wait_the_first_signal_only_asks_for_a_warm_shutdown() -> None:
    with Shutdown() as shutdown:
        with shutdown.interruptible():
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # raises nothing

        assert shutdown.warm.is_set()
