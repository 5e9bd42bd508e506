"""The marketplace's Ed25519 keyring: the keys that sign work units, which agents pin at enrolment.

Keys live in files, never in the database (a database dump must not let anyone sign units):
IDLEGRID_SIGNING_KEY_DIR holds, per key, `<key_id>.pem` (PKCS8, mode 0600) and `<key_id>.json`, its
public record {key_id, public_key, created_at, endorsed_by, endorsement, retired_at}. A key exists
once its record does; the newest key not retired is the active one and signs every new unit.

Rotation makes a new key endorsed by the active one (its signature over
`protocol.key_endorsement_message`), so agents that pinned the old key can pin the new one on that
word alone. Every change is made under an exclusive lock on the directory and published by linking
complete files into place, so several web and Celery processes starting at once end up with one
first key, and no process ever reads half a key.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings

from worker_agent.protocol import b64decode, b64encode, key_endorsement_message, sha256_hex

log = logging.getLogger(__name__)

KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The directory's mtime moves whenever a key is added or retired (files are renamed into it); the
# periodic rescan covers file systems whose timestamps are too coarse to show two changes a second apart.
RESCAN_SECONDS = 30.0
LOCK_FILE = ".lock"


class KeyringError(Exception):
    """The key directory holds something the marketplace cannot use; the message says what."""


@dataclass(frozen=True)
class MarketplaceKey:
    key_id: str
    public_key: bytes  # raw, 32 bytes
    created_at: str  # ISO 8601, UTC: records sort by it
    endorsed_by: str | None = None
    endorsement: bytes | None = None
    retired_at: str | None = None

    @property
    def retired(self) -> bool:
        return self.retired_at is not None

    def wire(self) -> dict[str, Any]:
        """The record agents pin (docs/protocol.md)."""
        return {
            "key_id": self.key_id,
            "public_key": b64encode(self.public_key),
            "endorsed_by": self.endorsed_by,
            "endorsement": b64encode(self.endorsement) if self.endorsement is not None else None,
            "retired": self.retired,
        }

    def record(self) -> dict[str, Any]:
        return {**self.wire(), "created_at": self.created_at, "retired_at": self.retired_at}

    def verifies(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    @classmethod
    def from_record(cls, raw: Any, *, expected_id: str) -> MarketplaceKey:
        try:
            key = cls(
                key_id=str(raw["key_id"]),
                public_key=b64decode(raw["public_key"]),
                created_at=str(raw["created_at"]),
                endorsed_by=raw.get("endorsed_by"),
                endorsement=b64decode(raw["endorsement"]) if raw.get("endorsement") else None,
                retired_at=raw.get("retired_at"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise KeyringError(f"the key record {expected_id}.json is malformed: {exc!r}") from None
        if key.key_id != expected_id or len(key.public_key) != 32:
            raise KeyringError(f"the key record {expected_id}.json names another key or a bad public key")
        return key


@dataclass(frozen=True)
class Keyring:
    directory: Path
    keys: tuple[MarketplaceKey, ...]  # oldest first, retired ones included
    active: MarketplaceKey
    private_key: Ed25519PrivateKey  # the active key's
    stamp: int  # the directory's mtime when it was read
    loaded_at: float

    def sign(self, message: bytes) -> tuple[str, bytes]:
        """(key id, signature) by the active key."""
        return self.active.key_id, self.private_key.sign(message)

    def get(self, key_id: str) -> MarketplaceKey | None:
        return next((key for key in self.keys if key.key_id == key_id), None)

    def published(self) -> list[MarketplaceKey]:
        """The keys an enrolling agent pins: every key not retired."""
        return [key for key in self.keys if not key.retired]


_cache_lock = threading.Lock()
_cache: Keyring | None = None


def keyring() -> Keyring:
    """The keyring, read once per process and read again when the directory changes; the first key is
    made on first use when the directory holds none."""
    global _cache
    directory = Path(settings.IDLEGRID_SIGNING_KEY_DIR)
    with _cache_lock:
        cached = _cache
        if (
            cached is not None
            and cached.directory == directory
            and cached.stamp == _stamp(directory)
            and time.monotonic() - cached.loaded_at < RESCAN_SECONDS
        ):
            return cached
        _cache = _load(directory)
        if _cache is None:
            with _locked(directory):
                _cache = _load(directory) or _create_first(directory)
        return _cache


def key_rotate() -> MarketplaceKey:
    """Make a new active key, endorsed by the current one."""
    global _cache
    directory = Path(settings.IDLEGRID_SIGNING_KEY_DIR)
    with _locked(directory):
        current = _load(directory) or _create_first(directory)
        key = _create_key(directory, endorser=current)
        with _cache_lock:
            _cache = None
    log.info("signing key %s made, endorsed by %s", key.key_id, current.active.key_id)
    return key


def key_retire(*, key_id: str) -> MarketplaceKey:
    """Retire a key: it signs nothing more and agents that learn of it stop trusting it. The active key
    cannot be retired (rotate first); pending units it signed must be signed again (`workunits.creation.units_resign`)."""
    global _cache
    directory = Path(settings.IDLEGRID_SIGNING_KEY_DIR)
    with _locked(directory):
        ring = _load(directory)
        key = ring.get(key_id) if ring is not None else None
        if ring is None or key is None:
            raise KeyringError(f"no signing key {key_id!r} in {directory}")
        if key.retired:
            return key
        if key.key_id == ring.active.key_id:
            raise KeyringError(f"{key_id} is the active key; rotate to a new one before retiring it")
        key = replace(key, retired_at=_now())
        _write_json(directory / f"{key.key_id}.json", key.record(), replace_existing=True)
        with _cache_lock:
            _cache = None
    log.info("signing key %s retired", key_id)
    return key


# --- files ------------------------------------------------------------------------------------------


def _stamp(directory: Path) -> int:
    try:
        return directory.stat().st_mtime_ns
    except FileNotFoundError:
        return -1


def _load(directory: Path) -> Keyring | None:
    """The keyring as the directory holds it now, or None when it holds no key yet."""
    stamp = _stamp(directory)  # before listing: a change during the scan makes the next call look again
    try:
        names = sorted(path.name for path in directory.iterdir())
    except FileNotFoundError:
        return None
    keys = []
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            path = directory / name
            try:
                raw = json.loads(path.read_text())
            except ValueError:
                raise KeyringError(f"the key record {path} is not JSON") from None
            keys.append(MarketplaceKey.from_record(raw, expected_id=path.stem))
    keys.sort(key=lambda key: (key.created_at, key.key_id))
    live = [key for key in keys if not key.retired]
    if not keys:
        return None
    if not live:
        raise KeyringError(f"every signing key in {directory} is retired; run `manage.py signing_key_rotate`")
    active = live[-1]
    private_key = _read_private_key(directory, active)
    return Keyring(directory, tuple(keys), active, private_key, stamp, time.monotonic())


def _read_private_key(directory: Path, key: MarketplaceKey) -> Ed25519PrivateKey:
    path = directory / f"{key.key_id}.pem"
    try:
        private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyringError(f"the active signing key {key.key_id} has a record but no {path.name}") from None
    if not isinstance(private_key, Ed25519PrivateKey) or _raw_public(private_key) != key.public_key:
        raise KeyringError(f"{path.name} is not the Ed25519 private key of the record {key.key_id}.json")
    return private_key


def _create_first(directory: Path) -> Keyring:
    key = _create_key(directory, endorser=None)
    log.info("signing key %s made: the marketplace's first", key.key_id)
    ring = _load(directory)
    assert ring is not None
    return ring


def _create_key(directory: Path, *, endorser: Keyring | None) -> MarketplaceKey:
    """Called under the directory lock. The private key goes first: a record makes a key exist, and a
    record without its private key could not sign."""
    private_key = Ed25519PrivateKey.generate()
    public_key = _raw_public(private_key)
    key_id = f"mk-{sha256_hex(public_key)[:16]}"
    endorsement = None
    if endorser is not None:
        endorsement = endorser.private_key.sign(
            key_endorsement_message(key_id=key_id, public_key_b64=b64encode(public_key))
        )
    key = MarketplaceKey(
        key_id=key_id,
        public_key=public_key,
        created_at=_now(),
        endorsed_by=endorser.active.key_id if endorser is not None else None,
        endorsement=endorsement,
    )
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _publish(directory / f"{key_id}.pem", pem, mode=0o600, replace_existing=False)
    _write_json(directory / f"{key_id}.json", key.record(), replace_existing=False)
    return key


def _write_json(path: Path, record: dict[str, Any], *, replace_existing: bool) -> None:
    data = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
    _publish(path, data, mode=0o644, replace_existing=replace_existing)


def _publish(path: Path, data: bytes, *, mode: int, replace_existing: bool) -> None:
    """Write a complete file under a temporary name, then link it into place: readers see all or nothing.
    A link (unlike a rename) refuses to overwrite, so no key file is ever replaced by mistake."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # the mode from the start: never readable by others
    try:
        os.fchmod(fd, mode)  # whatever the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace_existing:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive across processes (and threads: each call opens its own file description)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the process dies
        yield
    finally:
        os.close(fd)


def _raw_public(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
