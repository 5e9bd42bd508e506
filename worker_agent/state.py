"""The agent's state directory: who this device is (device.json), its signing key (device_key.pem) and
the marketplace keys it trusts to sign units (marketplace_keys.json, see pinning.py).

The first two hold secrets, so all are written atomically with mode 0600 and never logged.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker_agent import signing

HOME_ENV = "IDLEGRID_AGENT_HOME"
DEFAULT_LEASE_SECONDS = 60.0


class NotEnrolled(Exception):
    """The state directory holds no enrolment yet."""


class StateDirBusy(Exception):
    """Another agent is already running on this state directory."""


@dataclass(frozen=True)
class DeviceState:
    server: str
    device_id: int
    device_secret: str = field(repr=False)
    name: str
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    public_key: str = ""


def default_state_dir() -> Path:
    configured = os.environ.get(HOME_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".idlegrid-agent"


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def device_file(self) -> Path:
        return self.root / "device.json"

    @property
    def key_file(self) -> Path:
        return self.root / "device_key.pem"

    @property
    def pins_file(self) -> Path:
        return self.root / "marketplace_keys.json"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    def ensure(self) -> None:
        # 0700: the directory lists a secret-bearing file; other users need not even see it.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in (self.cache_dir, self.work_dir):
            sub.mkdir(mode=0o700, exist_ok=True)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held while an agent runs: two agents on one state dir would clear each other's work."""
        self.ensure()
        with (self.root / "agent.lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateDirBusy(f"another agent is already running with {self.root}") from None
            yield  # the lock goes with the file descriptor, even if the process is killed

    def is_enrolled(self) -> bool:
        return self.device_file.exists()

    def load_device(self) -> DeviceState:
        try:
            raw = json.loads(self.device_file.read_text())
        except FileNotFoundError:
            raise NotEnrolled(f"no enrolment in {self.root}; run `idlegrid-agent enroll` first") from None
        return DeviceState(
            server=str(raw["server"]),
            device_id=int(raw["device_id"]),
            device_secret=str(raw["device_secret"]),
            name=str(raw.get("name", "")),
            lease_seconds=float(raw.get("lease_seconds") or DEFAULT_LEASE_SECONDS),
            public_key=str(raw.get("public_key", "")),
        )

    def save_device(self, device: DeviceState) -> None:
        self.ensure()
        atomic_write(self.device_file, json.dumps(asdict(device), indent=2).encode() + b"\n")

    def load_key(self) -> Ed25519PrivateKey:
        try:
            return signing.key_from_pem(self.key_file.read_bytes())
        except FileNotFoundError:
            raise NotEnrolled(f"no device key in {self.root}; run `idlegrid-agent enroll` first") from None

    def save_key(self, key: Ed25519PrivateKey) -> None:
        self.ensure()
        atomic_write(self.key_file, signing.key_to_pem(key))


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written secret behind."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_EXCL and the mode at creation: the secret is never readable by others, not even briefly.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; say exactly what we mean
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
