"""The marketplace keys this agent trusts to sign units, pinned at enrolment; nothing unsigned runs.

Enrolment pins the keys the marketplace names in its answer. A unit signed by a key not pinned sends
the agent to `GET /api/v1/agent/keys`; a key offered there is pinned only if a pinned key endorsed it
(`protocol.key_endorsement_message`), directly or through a chain of endorsements, so a rotation
needs no re-enrolment while a stranger's key gets nowhere. A key the marketplace reports retired is
no longer trusted: retirement can only take trust away, so the server's word is enough for it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from worker_agent import protocol
from worker_agent.client import ONE_SHOT, AgentClient, AgentError
from worker_agent.state import NotEnrolled, StateDir, atomic_write

log = logging.getLogger(__name__)

SIGNATURE_INVALID = "unit signature invalid"


class UnitSignatureInvalid(Exception):
    """A unit this agent must not run: unsigned, signed by a key it does not trust, or altered."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{SIGNATURE_INVALID}: {reason}")


@dataclass(frozen=True)
class MarketplaceKey:
    key_id: str
    public_key: str  # base64 of the raw 32 bytes
    endorsed_by: str | None = None
    endorsement: str | None = None
    retired: bool = False

    @classmethod
    def from_wire(cls, raw: Any) -> MarketplaceKey:
        if not isinstance(raw, dict):
            raise ValueError(f"a marketplace key must be an object, got {type(raw).__name__}")
        key_id, public_key = raw.get("key_id"), raw.get("public_key")
        endorsed_by, endorsement = raw.get("endorsed_by"), raw.get("endorsement")
        if not isinstance(key_id, str) or not key_id or not isinstance(public_key, str):
            raise ValueError(f"malformed marketplace key: {str(raw)[:200]}")
        if not all(value is None or isinstance(value, str) for value in (endorsed_by, endorsement)):
            raise ValueError(f"malformed endorsement of marketplace key {key_id}")
        key = cls(key_id, public_key, endorsed_by, endorsement, raw.get("retired") is True)
        key.verifier()  # a public key that cannot be loaded is refused now, not at the first unit
        return key

    def verifier(self) -> Ed25519PublicKey:
        try:
            return Ed25519PublicKey.from_public_bytes(protocol.b64decode(self.public_key))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"marketplace key {self.key_id} is not a raw Ed25519 public key: {exc}") from None

    def verifies(self, signature_b64: str, message: bytes) -> bool:
        try:
            self.verifier().verify(protocol.b64decode(signature_b64), message)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def endorses(self, other: MarketplaceKey) -> bool:
        message = protocol.key_endorsement_message(key_id=other.key_id, public_key_b64=other.public_key)
        return other.endorsed_by == self.key_id and other.endorsement is not None and self.verifies(
            other.endorsement, message
        )


def parse_keys(raw: Any) -> list[MarketplaceKey]:
    if not isinstance(raw, list):
        raise ValueError("marketplace_keys must be a list")
    return [MarketplaceKey.from_wire(entry) for entry in raw]


class KeyPins:
    """The pinned keys, by id. Pure: no files, no network."""

    def __init__(self, keys: list[MarketplaceKey]) -> None:
        self.keys = {key.key_id: key for key in keys}

    def trusted(self, key_id: str) -> MarketplaceKey | None:
        key = self.keys.get(key_id)
        return key if key is not None and not key.retired else None

    def merge(self, offered: list[MarketplaceKey]) -> list[str]:
        """Pin every offered key that a trusted pinned key endorses (walking chains), then take note of
        retirements. Returns what changed, for the log."""
        changes: list[str] = []
        unknown = [key for key in offered if key.key_id not in self.keys]
        progress = True
        while progress:
            progress = False
            for key in list(unknown):
                endorser = self.trusted(key.endorsed_by or "")
                if endorser is not None and endorser.endorses(key):
                    # Trusted for now even if the marketplace retired it: it may be a link to a newer key.
                    self.keys[key.key_id] = replace(key, retired=False)
                    unknown.remove(key)
                    changes.append(f"pinned {key.key_id} (endorsed by {endorser.key_id})")
                    progress = True
        for key in offered:
            pinned = self.keys.get(key.key_id)
            if key.retired and pinned is not None and not pinned.retired:
                self.keys[key.key_id] = replace(pinned, retired=True)
                changes.append(f"{key.key_id} retired")
        return changes

    def verify_unit(self, *, unit_id: int, payload: dict[str, Any], key_id: str | None, signature: str | None) -> None:
        if not signature or not key_id:
            raise UnitSignatureInvalid(f"unit {unit_id} carries no signature")
        key = self.trusted(key_id)
        if key is None:
            why = "is retired" if key_id in self.keys else "is neither pinned nor endorsed by a pinned key"
            raise UnitSignatureInvalid(f"unit {unit_id} is signed by key {key_id}, which {why}")
        if not key.verifies(signature, protocol.unit_message(unit_id=unit_id, payload=payload)):
            raise UnitSignatureInvalid(f"the signature of unit {unit_id} does not verify with key {key_id}")


def load_pins(state: StateDir) -> KeyPins:
    try:
        raw = json.loads(state.pins_file.read_text())
        return KeyPins(parse_keys(raw["marketplace_keys"]))
    except FileNotFoundError:
        raise NotEnrolled(
            f"no pinned marketplace keys in {state.root}; enrol again (`idlegrid-agent enroll --force`)"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise AgentError(f"{state.pins_file} is damaged ({exc}); enrol again with --force") from None


def save_pins(state: StateDir, pins: KeyPins) -> None:
    state.ensure()
    record = {"marketplace_keys": [asdict(key) for key in pins.keys.values()]}
    atomic_write(state.pins_file, json.dumps(record, indent=2).encode() + b"\n")


class UnitVerifier:
    """Checks each lease before anything of it is fetched or run; learns rotated keys from the server."""

    def __init__(self, *, state: StateDir, client: AgentClient) -> None:
        self.state = state
        self.client = client
        self.pins = load_pins(state)

    def refresh(self, *, quick: bool = False) -> None:
        """Ask the marketplace for its keys; pin the endorsed ones, drop the retired ones."""
        answer = self.client.keys(retry=ONE_SHOT if quick else None)
        try:
            offered = parse_keys(answer.get("marketplace_keys"))
        except ValueError as exc:
            raise AgentError(f"the server's marketplace keys are malformed: {exc}") from None
        changes = self.pins.merge(offered)
        if changes:
            save_pins(self.state, self.pins)
            for change in changes:
                log.info("marketplace key %s", change)

    def check(self, *, unit_id: int, payload: dict[str, Any], key_id: str | None, signature: str | None) -> None:
        if key_id and key_id not in self.pins.keys:
            try:
                self.refresh()
            except AgentError as exc:
                log.warning("could not fetch the marketplace keys: %s", exc)
        self.pins.verify_unit(unit_id=unit_id, payload=payload, key_id=key_id, signature=signature)
