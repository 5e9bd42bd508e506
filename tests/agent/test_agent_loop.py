"""The work loop against a stub marketplace: signed reports, refusals, failures and lost leases."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any

import httpx
import pytest
from agent_models import MLP, inputs, payload, safetensors_bytes, weights
from agent_stub import StubMarketplace, error
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent import protocol
from worker_agent.agent import Agent, RunOptions
from worker_agent.client import AgentClient
from worker_agent.shutdown import ColdShutdown, Shutdown
from worker_agent.state import DeviceState, StateDir

SLOW_MLP = {"in_features": 8, "hidden": [512] * 8, "out_features": 10}  # ~0.8 TFLOP for 200k rows: tens of seconds


def make_agent(stub: StubMarketplace, device: DeviceState, key: Ed25519PrivateKey, state: StateDir,
               **options: Any) -> Agent:
    client = AgentClient("http://stub", device=(device.device_id, device.device_secret),
                         transport=httpx.MockTransport(stub.handle), sleep=lambda _: None)
    return Agent(client=client, device=device, key=key, state=state, options=RunOptions(burst=True, **options))


def mlp_unit(stub: StubMarketplace, *, rows: int = 16, config: dict[str, Any] | None = None, seconds: float = 60) -> dict[str, Any]:
    arch, config = MLP[0], config or MLP[1]
    weights_sha = stub.add_artifact(safetensors_bytes(weights(arch, config)))
    x_sha = stub.add_artifact(safetensors_bytes({"x": inputs(arch, config, rows)}))
    return payload(arch, config, weights_sha=weights_sha, x_sha=x_sha, rows=rows, batch_size=8, seconds=seconds)


def test_it_signs_its_report_and_moves_on_when_the_lease_expired_meanwhile(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (An accepted report is covered end to end, over a socket, in test_agent_cli.) A server without the
    # batched report: the agent uploads the output and reports the unit on its own.
    stub.batched_reports = False
    stub.add_unit(mlp_unit(stub), result_id=31, unit_id=12)
    sent: list[dict[str, Any]] = []
    honest = stub.handle

    def expire_on_report(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/agent/results/31/report":
            sent.append(json.loads(request.content))
            return error(409, "lease_expired", "the lease on result 31 expired")
        return honest(request)

    stub.handle = expire_on_report  # type: ignore[method-assign]

    with caplog.at_level(logging.INFO):
        summary = make_agent(stub, enrolled, device_key, state).run()

    assert (summary.done, summary.refused, summary.failed) == (0, 1, 0)
    report = sent[0]
    message = protocol.result_message(result_id=31, unit_id=12, device_id=enrolled.device_id,
                                      output_sha256=report["output_sha256"])
    device_key.public_key().verify(protocol.b64decode(report["signature"]), message)  # raises if it does not verify
    assert report["output_sha256"] in stub.artifacts  # uploaded before the report
    assert report["metrics"]["rows"] == 16 and report["elapsed_seconds"] > 0
    assert "the lease on result 31 expired" in caplog.text
    assert stub.requests[-1] == "POST /api/v1/agent/lease"  # it moved on and asked for more work


def test_units_in_a_row_are_computed_by_one_warm_child(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (A child replaced after a timeout, a crash or running out of memory: test_agent_child.)
    unit = mlp_unit(stub)
    for result_id in (90, 91, 92):
        stub.add_unit(unit, result_id=result_id, unit_id=result_id)

    with caplog.at_level(logging.INFO):
        summary = make_agent(stub, enrolled, device_key, state, batch=2).run()

    assert summary.done == 3
    assert sorted(stub.reports) == [90, 91, 92]
    started = [record.getMessage() for record in caplog.records if record.getMessage().startswith("compute child")]
    assert len(started) == 1 and "ready" in started[0], started  # one torch import for all three units


def _verifies(key: Ed25519PrivateKey, device: DeviceState, *, result_id: int, unit_id: int, report: dict[str, Any]) -> None:
    message = protocol.result_message(result_id=result_id, unit_id=unit_id, device_id=device.device_id,
                                      output_sha256=report["output_sha256"])
    key.public_key().verify(protocol.b64decode(report["signature"]), message)  # raises if it does not verify


def test_small_outputs_travel_inline_in_batched_reports_with_no_upload(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    unit = mlp_unit(stub)
    for result_id in (70, 71, 72):
        stub.add_unit(unit, result_id=result_id, unit_id=result_id + 100)

    summary = make_agent(stub, enrolled, device_key, state, batch=3).run()

    assert (summary.done, summary.refused, summary.failed) == (3, 0, 0)
    assert sorted(stub.inline_outputs) == [70, 71, 72] and sorted(stub.reports) == [70, 71, 72]
    assert "POST /api/v1/artifacts/" not in stub.requests  # the output came inside the report
    assert not [r for r in stub.requests if r.endswith("/report")]  # no single report either
    assert sorted(rid for batch in stub.batches for rid in batch) == [70, 71, 72]  # each reported once
    for result_id in (70, 71, 72):
        _verifies(device_key, enrolled, result_id=result_id, unit_id=result_id + 100, report=stub.reports[result_id])
        assert stub.reports[result_id]["output_sha256"] in stub.artifacts  # stored content-addressed
    assert list(state.work_dir.iterdir()) == []


def test_an_output_too_large_to_travel_inline_is_uploaded_and_named_in_the_batch(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    rows = protocol.MAX_INLINE_OUTPUT_BYTES // 12 + 100  # 3 float32 logits a row (MLP): past the inline limit
    stub.add_unit(mlp_unit(stub, rows=rows), result_id=75, unit_id=175)

    summary = make_agent(stub, enrolled, device_key, state).run()

    assert summary.done == 1 and stub.batches == [[75]] and stub.inline_outputs == []
    sha = stub.reports[75]["output_sha256"]
    assert "POST /api/v1/artifacts/" in stub.requests and len(stub.artifacts[sha]) > protocol.MAX_INLINE_OUTPUT_BYTES
    _verifies(device_key, enrolled, result_id=75, unit_id=175, report=stub.reports[75])


def test_one_refused_report_of_a_batch_leaves_the_others_reported(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unit = mlp_unit(stub)
    for result_id in (80, 81):
        stub.add_unit(unit, result_id=result_id, unit_id=result_id)
    honest = stub.handle

    def expire_81(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/agent/reports":
            with stub.lock:
                stub.leased.pop(81, None)  # reissued meanwhile
        return honest(request)

    stub.handle = expire_81  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO):
        summary = make_agent(stub, enrolled, device_key, state, batch=2).run()

    assert (summary.done, summary.refused, summary.failed) == (1, 1, 0)
    assert list(stub.reports) == [80] and not stub.failures  # an expired lease is not given up: it is gone
    assert "unit 81 (result 81): the server refused the report: lease_expired" in caplog.text


def test_against_a_server_without_batched_reports_it_asks_once_then_reports_one_by_one(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    stub.batched_reports = False
    unit = mlp_unit(stub)
    for result_id in (85, 86, 87):
        stub.add_unit(unit, result_id=result_id, unit_id=result_id)

    summary = make_agent(stub, enrolled, device_key, state, batch=3).run()

    assert summary.done == 3 and sorted(stub.reports) == [85, 86, 87]
    assert stub.requests.count("POST /api/v1/agent/reports") == 1  # the 404 is remembered
    assert stub.requests.count("POST /api/v1/artifacts/") == 3  # each output uploaded, then reported alone
    assert len([r for r in stub.requests if r.endswith("/report")]) == 3


def test_units_finished_while_a_delivery_is_in_flight_go_together_in_the_next() -> None:
    from worker_agent.agent import _Courier

    delivered: list[list[str]] = []
    first_in_flight, release = threading.Event(), threading.Event()

    def deliver(batch: list[Any]) -> None:
        delivered.append(list(batch))
        first_in_flight.set()
        release.wait(5)

    courier = _Courier(deliver, limit=3)
    courier.send("a")  # type: ignore[arg-type]
    assert first_in_flight.wait(5)
    for item in "bcde":  # b, c, d wait for the next delivery; e waits for room (limit 3)
        if item == "e":
            sender = threading.Thread(target=courier.send, args=(item,))
            sender.start()
            sender.join(0.2)
            assert sender.is_alive()  # blocked: three are waiting already
            release.set()
            sender.join(5)
        else:
            courier.send(item)  # type: ignore[arg-type]
    courier.wait()
    assert delivered[0] == ["a"] and delivered[1] == ["b", "c", "d"]
    assert [item for batch in delivered for item in batch] == list("abcde")


def test_a_lost_lease_kills_the_running_unit_without_a_report(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    # A unit that would run for minutes, and a heartbeat every 0.1 s that says its lease is gone.
    stub.add_unit(mlp_unit(stub, rows=200_000, config=SLOW_MLP), result_id=40, unit_id=4)
    stub.lose_on_heartbeat.add(40)
    device = dataclasses.replace(enrolled, lease_seconds=0.3)

    summary = make_agent(stub, device, device_key, state).run()

    assert summary.lost == 1 and summary.done == 0
    assert 40 not in stub.reports and 40 not in stub.failures
    assert [40] in stub.heartbeats
    assert list(state.work_dir.iterdir()) == []  # the unit's scratch files are gone


def test_a_unit_whose_artifact_is_corrupt_is_failed_not_computed(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    unit = mlp_unit(stub)
    stub.artifacts[unit["model"]["weights"]] = b"not what the hash promised"
    stub.add_unit(unit, result_id=50, unit_id=5)

    summary = make_agent(stub, enrolled, device_key, state).run()

    assert summary.failed == 1
    assert "arrived with sha256" in stub.failures[50]
    assert unit["model"]["weights"] not in {path.name for path in state.cache_dir.iterdir()}


def test_a_unit_of_an_unknown_kind_is_failed_with_the_reason(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    stub.add_unit({"kind": "sweep"}, result_id=60, unit_id=6)

    summary = make_agent(stub, enrolled, device_key, state).run()

    assert summary.failed == 1
    assert stub.failures[60] == "unsupported task kind 'sweep'; this agent runs: fedavg, inference"


def test_it_leases_no_more_than_max_units_and_stops_there(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    for result_id in (70, 71, 72):
        stub.add_unit({"kind": "unknown"}, result_id=result_id, unit_id=result_id)  # fails fast: no child needed

    summary = make_agent(stub, enrolled, device_key, state, max_units=2, batch=4).run()

    assert summary.failed == 2
    assert sorted(stub.failures) == [70, 71]
    assert [lease["result_id"] for lease in stub.pending] == [72]  # never leased


def test_leases_not_started_are_given_back_at_a_warm_shutdown(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    for result_id in (80, 81):
        stub.add_unit({"kind": "unknown"}, result_id=result_id, unit_id=result_id)
    honest = stub.handle

    def shut_down_after_the_first_failure(request: httpx.Request) -> httpx.Response:
        response = honest(request)
        if request.url.path == "/api/v1/agent/results/80/fail":
            agent.shutdown.request_warm("test")  # as if SIGTERM arrived while unit 80 was running
        return response

    stub.handle = shut_down_after_the_first_failure  # type: ignore[method-assign]
    agent = make_agent(stub, enrolled, device_key, state)

    summary = agent.run()

    assert summary.failed == 1 and summary.given_back == 1
    assert stub.releases == [81] and 81 not in stub.failures


def test_the_first_signal_asks_for_a_warm_shutdown_and_the_second_goes_cold() -> None:
    with Shutdown() as shutdown:
        os.kill(os.getpid(), signal.SIGTERM)
        assert shutdown.warm.is_set() and not shutdown.cold

        with pytest.raises(ColdShutdown):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a third is ignored: the give-back must not be interrupted

    assert shutdown.cold
    assert signal.getsignal(signal.SIGINT) is not shutdown._handle  # the previous handlers are back
