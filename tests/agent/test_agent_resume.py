"""Resume across agent runs: a warm stop checkpoints the unit in hand and keeps its lease; the next run asks
the server which leftover leases are still its own, deletes the others, and resumes the live ones from their
checkpoints to the very bytes of a straight run. Progress travels in the heartbeat."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

import httpx
from agent_models import MLP, inputs, payload, safetensors_bytes, weights
from agent_stub import StubMarketplace
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent.agent import LEASE_FILE, Agent, RunOptions, _write_lease
from worker_agent.client import AgentClient
from worker_agent.kinds._checkpoint import CHECKPOINT_FILE, PROGRESS_FILE
from worker_agent.state import DeviceState, StateDir
from worker_agent.wire import Lease

ROWS = 20_000  # one row per batch: ~0.6 s in the child, long enough to be stopped in the middle


def make_agent(stub: StubMarketplace, device: DeviceState, key: Ed25519PrivateKey, state: StateDir) -> Agent:
    client = AgentClient("http://stub", device=(device.device_id, device.device_secret),
                         transport=httpx.MockTransport(stub.handle), sleep=lambda _: None)
    # checkpoint_seconds: never by the clock here, so the checkpoint the next run uses is the warm stop's
    options = RunOptions(burst=True, batch=1, checkpoint_seconds=3600)
    return Agent(client=client, device=device, key=key, state=state, options=options)


def slow_unit(stub: StubMarketplace) -> dict[str, Any]:
    arch, config = MLP
    return payload(arch, config, weights_sha=stub.add_artifact(safetensors_bytes(weights(arch, config))),
                   x_sha=stub.add_artifact(safetensors_bytes({"x": inputs(arch, config, ROWS)})),
                   rows=ROWS, batch_size=1)


def stop_warm_once_progress_is_reported(agent: Agent, stub: StubMarketplace, result_id: int) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(str(result_id) in beat for beat in stub.progress):
            time.sleep(0.01)
        agent.shutdown.request_warm("test")  # as if SIGTERM arrived mid-unit

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_warm_stop_keeps_the_checkpointed_lease_and_the_next_run_resumes_it_to_the_same_bytes(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    unit = slow_unit(stub)
    stub.add_unit(unit, result_id=100, unit_id=10)
    device = dataclasses.replace(enrolled, lease_seconds=0.3)  # a heartbeat (with progress) every 0.1 s
    first = make_agent(stub, device, device_key, state)
    watcher = stop_warm_once_progress_is_reported(first, stub, 100)

    stopped = first.run()
    watcher.join()

    assert (stopped.kept, stopped.done, stopped.lost) == (1, 0, 0)
    assert 100 in stub.leased and 100 not in stub.releases and 100 not in stub.reports  # still ours
    workdir = state.work_dir / "100"
    assert {LEASE_FILE, CHECKPOINT_FILE} <= {path.name for path in workdir.iterdir()}
    reported = [beat["100"] for beat in stub.progress if "100" in beat]
    assert reported and all(0 <= fraction < 1 for fraction in reported)
    at_stop = json.loads((workdir / PROGRESS_FILE).read_text())["fraction"]
    assert 0 < at_stop < 1

    # The next run: a leftover whose lease the server no longer knows, junk, the kept unit, then new work.
    gone = Lease.from_wire({**stub.leased[100], "result_id": 300})
    (state.work_dir / "300").mkdir()
    _write_lease(state.work_dir / "300", gone)
    (state.work_dir / "junk").mkdir()
    (state.work_dir / "400").mkdir()
    (state.work_dir / "400" / LEASE_FILE).write_bytes(b'{"result_id": 400, "lease": ')  # torn: not a lease
    stub.add_unit(unit, result_id=101, unit_id=11)  # the same payload, computed straight
    stub.heartbeats.clear()

    resumed = make_agent(stub, device, device_key, state).run()

    assert resumed.done == 2 and sorted(stub.reports) == [100, 101]
    assert stub.heartbeats[0] == [100, 300]  # asked first which leftovers are still ours (400 is no lease)
    assert 300 not in stub.reports and 300 not in stub.failures
    assert stub.reports[100]["metrics"]["resumed_from"] >= at_stop  # from the checkpoint, not from 0
    assert "resumed_from" not in stub.reports[101]["metrics"]
    assert stub.reports[100]["output_sha256"] == stub.reports[101]["output_sha256"]
    assert list(state.work_dir.iterdir()) == []
