"""The policy through the real process boundary: an agent process told by a fake idle source that the
user is active leases nothing; once idle it computes, under a 50% CPU cap its child is stopped and
continued in turn (the duty cycle); input again stops the child within a second and the heartbeat
goes on; idle again, the child computes on."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_stub import StubMarketplace, serve_http
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_agent_cli import SLOW_MLP, add_units, agent_process, live_children, read_until

from worker_agent.state import DeviceState, StateDir

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
BOUND = 3.0  # generous: the mechanism is asked to act within a second


def proc_state(pid: int) -> tuple[str, int]:
    """(state letter, user+system CPU ticks) of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[11]) + int(fields[12])


def wait_for(condition: Callable[[], bool], seconds: float = BOUND, step: float = 0.02) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def states_over(pid: int, seconds: float) -> set[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(proc_state(pid)[0])
        time.sleep(0.02)
    return seen


def test_an_active_user_stops_the_work_and_an_idle_one_lets_it_run_under_the_cap(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir, tmp_path: Path,
) -> None:
    presence = tmp_path / "presence"
    presence.write_text("active")
    add_units(stub, 1, config=SLOW_MLP, rows=200_000)  # tens of seconds: still running when the test ends
    device = DeviceState(**{**enrolled.__dict__, "lease_seconds": 0.9})  # a heartbeat every 0.3 s
    policy = ("--idle-source", f"file:{presence}", "--cpu-percent", "50")  # idle_minutes: the default 3
    with serve_http(stub) as url, agent_process(state, device, url, "--poll", "0.1", *policy) as agent:
        assert agent.stderr is not None
        lines = read_until(agent.stderr, "not leasing work: user active")
        assert "not leasing work: user active" in lines[-1], "".join(lines)
        time.sleep(0.5)
        assert not [r for r in stub.requests if r.endswith("/agent/lease")] and not stub.reports

        presence.write_text("idle")
        read_until(agent.stderr, "computing")
        [pid] = live_children(state)
        # The duty cycle: stopped and continued in turn (half a second each), never left in one state.
        assert {"T", "R"} <= states_over(pid, 2.5)

        presence.write_text("active")
        assert wait_for(lambda: states_over(pid, 0.6) == {"T"}), "the child was not held stopped"
        beats, cpu = len(stub.heartbeats), proc_state(pid)[1]
        time.sleep(1.0)
        assert proc_state(pid) == ("T", cpu), "a paused child used CPU"
        assert len(stub.heartbeats) > beats, "the heartbeat stopped while the unit was paused"

        presence.write_text("idle")
        assert wait_for(lambda: proc_state(pid)[1] > cpu), "the child did not compute on"
        assert not stub.reports and not stub.failures
