"""Wire definitions shared by the agent and the marketplace (the marketplace imports these; never the reverse).

Kept free of third-party imports beyond `cryptography` so both sides agree byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

PROTOCOL_VERSION = 1
TASK_KINDS = ("inference", "fedavg")
MAX_LEASE_BATCH = 64
# The longest a lease request may ask the server to wait for work (docs/protocol.md, "Long poll"): under the
# 30-60 s idle timeouts of common proxies and load balancers, so a waiting request is never cut in between.
MAX_LEASE_WAIT_SECONDS = 25
# A batched report (POST /api/v1/agent/reports) carries 1 to MAX_REPORT_BATCH reports; an output of at most
# MAX_INLINE_OUTPUT_BYTES may travel inside its report (base64) instead of being uploaded first: an
# inference unit's output is rows x classes float32, 64 KiB is 1,600 rows of 10 classes.
MAX_REPORT_BATCH = 64
MAX_INLINE_OUTPUT_BYTES = 64 * 1024
DEVICE_AUTH_SCHEME = "Device"


def result_message(*, result_id: int, unit_id: int, device_id: int, output_sha256: str) -> bytes:
    """What a device signs when it reports: binds the output to one lease, unit and device (no replay)."""
    return f"idlegrid-result-v1\n{result_id}\n{unit_id}\n{device_id}\n{output_sha256}".encode()


def enroll_message(*, token: str, public_key_b64: str) -> bytes:
    """What a new device signs at enrolment, proving it holds the private key of the key it registers."""
    return f"idlegrid-enroll-v1\n{token}\n{public_key_b64}".encode()


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value, whatever the key order or spacing it travelled with."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def unit_message(*, unit_id: int, payload: dict[str, Any]) -> bytes:
    """What the marketplace signs for each unit: its id and everything the agent will run (input hashes
    included), so no byte of a unit can be changed, or moved to another unit id, without the agent noticing."""
    return f"idlegrid-unit-v1\n{unit_id}\n".encode() + canonical_json(payload)


def key_endorsement_message(*, key_id: str, public_key_b64: str) -> bytes:
    """What the active marketplace key signs to vouch for its successor: agents pin the new key on that word."""
    return f"idlegrid-key-v1\n{key_id}\n{public_key_b64}".encode()


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha256_hex(value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(c in "0123456789abcdef" for c in value)
    )
