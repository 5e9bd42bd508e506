"""Unit signatures: the agent runs only what a pinned marketplace key (or one it endorsed) signed."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from agent_stub import StubMarketplace, error, key_record, sign_unit
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_agent_loop import make_agent, mlp_unit

from worker_agent.agent import Agent, RunOptions
from worker_agent.client import AgentClient
from worker_agent.pinning import KeyPins, UnitSignatureInvalid, load_pins, parse_keys
from worker_agent.state import DeviceState, NotEnrolled, StateDir

ARTIFACT_FETCH = "GET /api/v1/artifacts/"
KEYS = "GET /api/v1/agent/keys"


def fetches(stub: StubMarketplace) -> list[str]:
    return [request for request in stub.requests if request.startswith(ARTIFACT_FETCH)]


def tamper(stub: StubMarketplace, unit: dict[str, Any], *, unit_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A unit's payload changed after the marketplace signed it, and the lease fields that go with it."""
    return {**unit, "batch_size": unit["batch_size"] + 1}, {
        "signature": sign_unit(stub.marketplace_key, unit_id=unit_id, payload=unit)}


@pytest.mark.parametrize("forgery", ["payload changed", "signature of another unit", "no signature", "garbage"])
def test_it_refuses_a_unit_whose_signature_fails_without_fetching_its_inputs(
    forgery: str, stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unit = mlp_unit(stub)
    payload, lease = {
        "payload changed": tamper(stub, unit, unit_id=5),
        "signature of another unit": (unit, {"signature": sign_unit(stub.marketplace_key, unit_id=4, payload=unit)}),
        "no signature": (unit, {"signature": None, "key_id": None}),
        "garbage": (unit, {"signature": "bm90IGEgc2lnbmF0dXJl"}),
    }[forgery]
    stub.add_unit(payload, result_id=50, unit_id=5, **lease)

    with caplog.at_level(logging.WARNING):
        summary = make_agent(stub, enrolled, device_key, state).run()

    assert summary.failed == 1 and summary.done == 0
    assert stub.failures[50].startswith("unit signature invalid")
    assert fetches(stub) == []  # not one input of it was downloaded
    assert list(state.cache_dir.iterdir()) == []
    assert any(r.levelno == logging.WARNING and "unit signature invalid" in r.getMessage() for r in caplog.records)


def test_a_tampered_unit_costs_only_itself(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    unit = mlp_unit(stub)
    payload, lease = tamper(stub, unit, unit_id=5)
    stub.add_unit(payload, result_id=50, unit_id=5, **lease)
    stub.add_unit(unit, result_id=51, unit_id=6, job_id=1)  # a stray job_id is ignored

    summary = make_agent(stub, enrolled, device_key, state).run()

    assert (summary.failed, summary.done) == (1, 1)
    assert stub.failures[50].startswith("unit signature invalid") and 51 in stub.reports


def test_it_pins_a_rotated_key_endorsed_by_a_pinned_one_and_runs_its_units(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    stub.rotate("mk-stub-2")
    stub.rotate("mk-stub-3")  # a chain: 1 (pinned) endorses 2, which endorses 3
    stub.add_unit(mlp_unit(stub), result_id=60, unit_id=6)

    summary = make_agent(stub, enrolled, device_key, state).run()

    assert summary.done == 1 and 60 in stub.reports
    assert {"mk-stub-1", "mk-stub-2", "mk-stub-3"} <= set(load_pins(state).keys)  # kept for the next run


def test_a_unit_signed_by_a_key_it_has_not_seen_sends_it_to_fetch_the_keys_once(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    honest, calls = stub.handle, []

    def keys_down_at_start(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/agent/keys":
            calls.append(request)
            if len(calls) == 1:  # the refresh at start fails: the unit itself must make the agent look
                return error(404, "not_found", "try later")
        return honest(request)

    stub.handle = keys_down_at_start  # type: ignore[method-assign]
    stub.rotate("mk-stub-2")
    stub.add_unit(mlp_unit(stub), result_id=61, unit_id=7)

    summary = make_agent(stub, enrolled, device_key, state).run()

    assert summary.done == 1 and 61 in stub.reports
    assert len(calls) == 2


@pytest.mark.parametrize("stranger", ["not endorsed", "endorsed by a key not pinned", "endorsement forged"])
def test_it_refuses_a_key_no_pinned_key_endorsed(
    stranger: str, stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    rogue, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    record = {
        "not endorsed": key_record("mk-rogue", rogue),
        "endorsed by a key not pinned": key_record("mk-rogue", rogue, endorser=("mk-other", other)),
        # Claims the pinned key's endorsement, but the signature is the rogue's own.
        "endorsement forged": key_record("mk-rogue", rogue, endorser=("mk-stub-1", rogue)),
    }[stranger]
    stub.keys.append(record)
    unit = mlp_unit(stub)
    stub.add_unit(unit, result_id=62, unit_id=8, key_id="mk-rogue",
                  signature=sign_unit(rogue, unit_id=8, payload=unit))

    summary = make_agent(stub, enrolled, device_key, state).run()

    assert summary.failed == 1 and 62 not in stub.reports
    assert stub.failures[62] == (
        "unit signature invalid: unit 8 is signed by key mk-rogue, which is neither pinned nor endorsed by a pinned key"
    )
    assert fetches(stub) == []
    assert set(load_pins(state).keys) == {"mk-stub-1"}


def test_it_stops_trusting_a_key_the_marketplace_retired(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    old_key, unit = stub.marketplace_key, mlp_unit(stub)
    stub.rotate("mk-stub-2")
    stub.keys[0]["retired"] = True
    stub.add_unit(unit, result_id=63, unit_id=9, key_id="mk-stub-1", signature=sign_unit(old_key, unit_id=9, payload=unit))

    summary = make_agent(stub, enrolled, device_key, state).run()

    assert summary.failed == 1
    assert stub.failures[63] == "unit signature invalid: unit 9 is signed by key mk-stub-1, which is retired"


def test_an_agent_without_pinned_keys_does_not_start(
    stub: StubMarketplace, enrolled: DeviceState, device_key: Ed25519PrivateKey, state: StateDir,
) -> None:
    state.pins_file.unlink()
    client = AgentClient("http://stub", transport=httpx.MockTransport(stub.handle))

    with pytest.raises(NotEnrolled, match="no pinned marketplace keys"):
        Agent(client=client, device=enrolled, key=device_key, state=state, options=RunOptions(burst=True))


# --- the pins alone -----------------------------------------------------------------------------


def chain(length: int) -> tuple[list[dict[str, Any]], list[Ed25519PrivateKey]]:
    private = [Ed25519PrivateKey.generate() for _ in range(length)]
    records = [key_record("k0", private[0])]
    records += [key_record(f"k{i}", private[i], endorser=(f"k{i - 1}", private[i - 1])) for i in range(1, length)]
    return records, private


def test_a_chain_walks_through_keys_the_marketplace_has_since_retired() -> None:
    # Offline through two rotations: k0 (pinned) and k1 are retired by now, k2 signs.
    records, private = chain(3)
    pins = KeyPins(parse_keys(records[:1]))
    records[0]["retired"] = records[1]["retired"] = True

    pins.merge(parse_keys(list(reversed(records))))  # any order

    payload = {"kind": "inference"}
    pins.verify_unit(unit_id=1, payload=payload, key_id="k2",
                     signature=sign_unit(private[2], unit_id=1, payload=payload))
    with pytest.raises(UnitSignatureInvalid, match="k0, which is retired"):
        pins.verify_unit(unit_id=1, payload=payload, key_id="k0",
                         signature=sign_unit(private[0], unit_id=1, payload=payload))


def test_a_retired_pinned_key_endorses_nothing_new() -> None:
    records, _ = chain(2)
    pins = KeyPins(parse_keys([{**records[0], "retired": True}]))

    assert pins.merge(parse_keys(records)) == []
    assert pins.trusted("k1") is None


def test_the_signature_covers_the_payload_whatever_its_key_order() -> None:
    records, private = chain(1)
    pins = KeyPins(parse_keys(records))
    payload = {"kind": "inference", "rows": 4, "limits": {"seconds": 60, "memory_mb": 256}}
    signature = sign_unit(private[0], unit_id=3, payload=payload)

    pins.verify_unit(unit_id=3, payload=dict(reversed(list(payload.items()))), key_id="k0", signature=signature)
    with pytest.raises(UnitSignatureInvalid, match="does not verify"):
        pins.verify_unit(unit_id=3, payload={**payload, "rows": 5}, key_id="k0", signature=signature)
