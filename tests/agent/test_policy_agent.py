"""The agent loop under a policy (in process, a stub marketplace, a real compute child)."""

from __future__ import annotations

import threading
import time

import httpx
from agent_models import MLP, inputs, payload, safetensors_bytes, weights
from agent_stub import StubMarketplace
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent.agent import Agent, RunOptions
from worker_agent.client import AgentClient
from worker_agent.policy import conditions
from worker_agent.policy.config import Policy
from worker_agent.policy.governor import Samplers
from worker_agent.policy.idle import NO_SESSION_IDLE_SECONDS
from worker_agent.shutdown import Shutdown
from worker_agent.state import DeviceState, StateDir

SLOW_MLP = {"in_features": 8, "hidden": [512] * 8, "out_features": 10}


class Presence:
    name = "test"

    def __init__(self) -> None:
        self.idle = NO_SESSION_IDLE_SECONDS

    def seconds_idle(self) -> float | None:
        return self.idle


def test_a_warm_shutdown_keeps_the_lease_of_a_unit_the_policy_holds_stopped_instead_of_waiting_for_the_user(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    arch, config = MLP[0], SLOW_MLP
    unit = payload(arch, config, weights_sha=stub.add_artifact(safetensors_bytes(weights(arch, config))),
                   x_sha=stub.add_artifact(safetensors_bytes({"x": inputs(arch, config, 200_000)})),
                   rows=200_000, batch_size=8)
    stub.add_unit(unit, result_id=100, unit_id=10)
    stub.add_unit(unit, result_id=101, unit_id=11)
    presence, shutdown = Presence(), Shutdown()
    samplers = Samplers(idle=presence, other_cpu=lambda: 0.0, power=lambda: conditions.Power(False, None))
    client = AgentClient("http://stub", device=(enrolled.device_id, enrolled.device_secret),
                         transport=httpx.MockTransport(stub.handle), sleep=lambda _: None)
    agent = Agent(client=client, device=enrolled, key=device_key, state=state, options=RunOptions(batch=2),
                  shutdown=shutdown, policy=Policy(), samplers=samplers)
    runner = threading.Thread(target=agent.run)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while agent.child.unit_pid() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert agent.child.unit_pid() is not None, "the unit never started"
        presence.idle = 0.0  # the owner is back: the child is stopped
        while agent.child.paused_seconds() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        shutdown.request_warm("test")
        runner.join(timeout=10)
        assert not runner.is_alive(), "the agent waited for the user instead of parking the unit"
    finally:
        shutdown.warm.set()
        presence.idle = NO_SESSION_IDLE_SECONDS
        runner.join(timeout=30)
    # The stopped unit is not woken to checkpoint: its lease and work dir are kept for the next run (which
    # resumes from its last periodic checkpoint, or from the start); the unit never started goes back.
    assert len(stub.releases) == 1 and not stub.reports and not stub.failures
    (kept,) = {100, 101} - set(stub.releases)
    assert (state.work_dir / str(kept) / "lease.json").is_file()
    assert (agent.summary.kept, agent.summary.given_back, agent.summary.lost) == (1, 1, 0)
