"""Enrolment: a fresh Ed25519 key, a proof that we hold it, and in return the device credentials and the
marketplace keys to pin (only units they sign will run)."""

from __future__ import annotations

import logging

from worker_agent import hardware, signing, wire
from worker_agent.client import AgentClient, AgentError
from worker_agent.pinning import KeyPins, parse_keys, save_pins
from worker_agent.state import DeviceState, StateDir

log = logging.getLogger(__name__)


class AlreadyEnrolled(Exception):
    """The state directory already holds a device; enrolling again would orphan it."""


def enroll(*, state: StateDir, client: AgentClient, server: str, token: str, name: str, force: bool = False) -> DeviceState:
    if state.is_enrolled() and not force:
        raise AlreadyEnrolled(
            f"{state.root} already holds device {state.load_device().device_id}; use --force to replace it"
        )
    key = signing.generate_key()
    public_key = signing.public_key_b64(key)
    try:
        request = wire.EnrollRequest(
            token=token,
            name=name,
            public_key=public_key,
            hardware=hardware.collect(hardware.numerics_facts()),  # the child's facts need torch
            proof=signing.enroll_proof(key, token=token),
        )
    except wire.WireError as exc:
        raise AgentError(f"cannot enrol: {exc}") from None
    answer = _enrolled(client.enroll(request.to_wire()))
    device = _device_from_answer(answer, server=server, name=name, public_key=public_key)
    pins = _pins_from_answer(answer)
    # device.json last: a device that looks enrolled can sign its results and check its units.
    state.save_key(key)
    save_pins(state, pins)
    state.save_device(device)
    return device


def _enrolled(answer: dict[str, object]) -> wire.Enrolled:
    try:
        return wire.Enrolled.from_wire(answer)
    except wire.WireError as exc:
        raise AgentError(f"the server's enrolment answer is refused: {exc}") from None


def _pins_from_answer(answer: wire.Enrolled) -> KeyPins:
    try:
        keys = [key for key in parse_keys(list(answer.marketplace_keys)) if not key.retired]
    except ValueError as exc:
        raise AgentError(f"the server's enrolment answer has malformed marketplace keys: {exc}") from None
    if not keys:
        raise AgentError("the server's enrolment answer names no marketplace key; this agent could check no unit")
    return KeyPins(keys)


def _device_from_answer(answer: wire.Enrolled, *, server: str, name: str, public_key: str) -> DeviceState:
    return DeviceState(
        server=server.rstrip("/"),
        device_id=answer.device_id,
        device_secret=answer.device_secret,
        name=name,
        lease_seconds=float(answer.lease_seconds),
        public_key=public_key,
    )
