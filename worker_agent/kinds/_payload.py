"""What every kind checks of its payload beyond the wire schema (worker_agent/wire.py): pure Python, and
no marketplace code (the agent knows only the protocol)."""

from __future__ import annotations

from typing import Any, TypeVar

from worker_agent.architectures import Architecture, ArchitectureError, resolve
from worker_agent.wire import FedAvgPayload, InferencePayload, ModelRef, PayloadError, unit_payload_from_wire

P = TypeVar("P", InferencePayload, FedAvgPayload)


def payload_of_kind(payload: dict[str, Any], record: type[P]) -> P:
    """The payload read by the schema, refused unless it is a unit of this kind."""
    unit = unit_payload_from_wire(payload)
    if not isinstance(unit, record):
        raise PayloadError(f"must be {record.KIND!r} here, got {unit.kind!r}", "payload.kind")
    return unit


def model_resolve(model: ModelRef) -> tuple[Architecture, dict[str, Any]]:
    try:
        return resolve(model.architecture, model.config)
    except ArchitectureError as exc:
        raise PayloadError(f"payload.model: {exc}") from None
