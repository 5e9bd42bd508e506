"""The agent as its users run it: a separate process, a real socket, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest
from agent_models import inputs, payload, safetensors_bytes, weights
from agent_stub import StubMarketplace, serve_http
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent.state import DeviceState, StateDir

REPO_ROOT = Path(__file__).resolve().parents[2]
# These tests are about the loop, not the policy: compute whatever the machine is doing (a shared CI box is busy).
UNCONDITIONAL_POLICY = {"IDLEGRID_AGENT_IDLE_SOURCE": "none", "IDLEGRID_AGENT_OTHER_CPU_PERCENT": "100",
                        "IDLEGRID_AGENT_RUN_ON_BATTERY": "true"}
SLOW_MLP = {"in_features": 8, "hidden": [512] * 8, "out_features": 10}  # ~0.8 TFLOP for 200k rows: tens of seconds


def add_units(stub: StubMarketplace, count: int, *, config: dict[str, Any], rows: int) -> None:
    weights_sha = stub.add_artifact(safetensors_bytes(weights("mlp", config)))
    x_sha = stub.add_artifact(safetensors_bytes({"x": inputs("mlp", config, rows)}))
    unit = payload("mlp", config, weights_sha=weights_sha, x_sha=x_sha, rows=rows, batch_size=8)
    for index in range(count):
        stub.add_unit(unit, result_id=100 + index, unit_id=10 + index)


@contextmanager
def agent_process(state: StateDir, device: DeviceState, url: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    StateDir.save_device(state, DeviceState(**{**device.__dict__, "server": url}))
    command = [sys.executable, "-X", "importtime", "-m", "worker_agent", "run", "--state-dir", str(state.root), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **UNCONDITIONAL_POLICY}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, process.kill)  # a hung agent fails the test instead of hanging it
    watchdog.start()
    try:
        yield process
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()


def read_until(stream: IO[str], marker: str) -> list[str]:
    lines: list[str] = []
    for line in stream:
        lines.append(line)
        if marker in line:
            break
    return lines


def live_children(state: StateDir) -> list[int]:
    """Compute children still running for this state dir (their job file lives under it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "worker_agent.child" in cmdline and str(state.root) in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_warm_shutdown_checkpoints_the_unit_keeps_its_lease_gives_back_the_rest_and_never_imports_torch(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    add_units(stub, 2, config=SLOW_MLP, rows=200_000)  # tens of seconds: the stop lands mid-unit
    with serve_http(stub) as url, agent_process(state, enrolled, url, "--poll", "0.1") as agent:
        assert agent.stderr is not None
        lines = read_until(agent.stderr, "unit 10 (result 100): computing")
        agent.send_signal(signal.SIGTERM)
        lines += agent.stderr.readlines()
        code = agent.wait()

    assert code == 0, "".join(lines)
    # The unit in hand was checkpointed and its lease kept (the next run resumes it: test_agent_resume);
    # the one not started was handed back, not given up: free for the device.
    assert 100 in stub.leased and 100 not in stub.reports and 100 not in stub.releases
    assert (state.work_dir / "100" / "checkpoint.safetensors").is_file()
    assert stub.releases == [101] and stub.failures == {}
    assert any("0 done, 0 failed" in line and "1 kept" in line for line in lines), "".join(lines)
    assert live_children(state) == []  # the child was stopped with the agent
    imports = [line for line in lines if line.startswith("import time:")]
    assert imports  # -X importtime really reported the agent's imports
    assert not [line for line in imports if any(name in line for name in ("torch", "django", "numpy"))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_second_signal_kills_the_running_unit_and_gives_everything_back(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    add_units(stub, 2, config=SLOW_MLP, rows=200_000)
    with serve_http(stub) as url, agent_process(state, enrolled, url) as agent:
        assert agent.stderr is not None
        lines = read_until(agent.stderr, "computing")
        # Held still, the child cannot checkpoint: the warm stop waits for it (a few seconds at most),
        # and the second signal lands while it does, every time.
        child = int(re.search(r"compute child (\d+) ready", "".join(lines)).group(1))  # type: ignore[union-attr]
        os.kill(child, signal.SIGSTOP)
        agent.send_signal(signal.SIGINT)
        lines += read_until(agent.stderr, "warm shutdown")
        agent.send_signal(signal.SIGINT)
        lines += agent.stderr.readlines()
        code = agent.wait()

    assert code == 1, "".join(lines)
    assert sorted(stub.releases) == [100, 101] and stub.failures == {}
    assert stub.reports == {}
    assert live_children(state) == []
