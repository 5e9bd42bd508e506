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


def test_a_unit_over_the_memory_cap_of_a_machine_in_use_runs_again_from_its_checkpoint_once_the_owner_leaves(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    arch, config = MLP[0], SLOW_MLP
    rows = 20_000
    x = inputs(arch, config, rows)
    unit = payload(arch, config, weights_sha=stub.add_artifact(safetensors_bytes(weights(arch, config))),
                   x_sha=stub.add_artifact(safetensors_bytes({"x": x})), rows=rows, batch_size=8)
    stub.add_unit(unit, result_id=200, unit_id=20)
    presence = Presence()
    gib = 1 << 30
    # The child "holds" 10 GiB of a 16 GiB machine: over the 50% cap while the owner is at the keyboard,
    # under the 90% cap once they are away.
    samplers = Samplers(idle=presence, other_cpu=lambda: 0.0, power=lambda: conditions.Power(False, None),
                        total_memory=lambda: 16 * gib, resident=lambda pid: 10 * gib)
    client = AgentClient("http://stub", device=(enrolled.device_id, enrolled.device_secret),
                         transport=httpx.MockTransport(stub.handle), sleep=lambda _: None)
    agent = Agent(client=client, device=enrolled, key=device_key, state=state,
                  options=RunOptions(burst=True, checkpoint_seconds=0.05), policy=Policy(), samplers=samplers)
    runner = threading.Thread(target=agent.run)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        workdir = state.work_dir / "200"
        while not (workdir / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (workdir / "checkpoint.safetensors").exists(), "no checkpoint was written"
        first_child = agent.child.pid
        presence.idle = 0.0  # the owner is back: paused, and over the busy cap, the child is killed
        while agent.child.pid == first_child and time.monotonic() < deadline:
            time.sleep(0.02)
        assert agent.child.pid != first_child, "the child over the cap was not stopped"
        assert runner.is_alive() and not stub.reports and not stub.failures  # no failure: it waits
        presence.idle = NO_SESSION_IDLE_SECONDS  # away again: the unit runs again, from its checkpoint
        runner.join(timeout=30)
        assert not runner.is_alive()
    finally:
        presence.idle = NO_SESSION_IDLE_SECONDS
        agent.shutdown.warm.set()
        runner.join(timeout=30)
    assert not stub.failures and list(stub.reports) == [200]
    assert stub.reports[200]["metrics"]["resumed_from"] > 0
