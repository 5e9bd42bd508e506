"""Payload parsing every kind shares, on the agent's side: pure Python, and no marketplace code (the agent
knows only the protocol)."""

from __future__ import annotations

from typing import Any

from worker_agent import protocol
from worker_agent.architectures import Architecture, ArchitectureError, resolve
from worker_agent.jobfile import PayloadError


def payload_object(payload: dict[str, Any], key: str) -> dict[str, Any]:
    value = payload.get(key)
    if not isinstance(value, dict):
        raise PayloadError(f"payload.{key} must be an object")
    return value


def positive_int(source: dict[str, Any], key: str, label: str) -> int:
    """source[key] as a positive integer; `label` names it in the error (say "payload.train.epochs")."""
    value = source.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PayloadError(f"{label} must be a positive integer, got {value!r}")
    return value


def model_resolve(model: dict[str, Any]) -> tuple[Architecture, dict[str, Any]]:
    try:
        return resolve(model.get("architecture"), model.get("config"))
    except ArchitectureError as exc:
        raise PayloadError(f"payload.model: {exc}") from None


def artifacts_distinct(wanted: list[Any]) -> list[str]:
    """Refuse any reference that is not a sha256; one fetch per distinct artifact, order kept."""
    for sha in wanted:
        if not protocol.is_sha256_hex(sha):
            raise PayloadError(f"artifact reference {sha!r} is not a sha256")
    return list(dict.fromkeys(wanted))
