"""Checkpoints and progress of a unit in the compute child, shared by the kinds.

A kind calls `Ticker.due()` at each safe point (between two batches); when it says so, the kind saves
what it needs to continue (`save`), and the next run of the same unit in the same directory reads it
back (`load`) and carries on from there. The result must be bitwise the one of an uninterrupted run, so
a checkpoint holds exact tensors (safetensors, no pickle) and exact numbers (JSON of Python floats,
which round-trips every float exactly).

A checkpoint is written atomically (temporary file, fsync, rename, fsync of the directory): a kill at
any moment leaves the previous checkpoint or the new one, never half of one. It is stamped with a digest
of the unit (its signed payload, the sabotage mode): a checkpoint of another unit, of another version of
this one, or one that cannot be read is discarded and the unit starts over.

Ticks come from the clock (every `checkpoint_seconds`) and on request: SIGUSR1 (the agent sends it
before a warm stop) makes the next safe point checkpoint, whatever the clock says.

Progress: the fraction of the unit done (0..1), written atomically to `progress.json` next to the
checkpoint at most every PROGRESS_SECONDS; the agent reads it for its heartbeat.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import worker_agent
from worker_agent import protocol
from worker_agent.jobfile import ChildJob

CHECKPOINT_FILE = "checkpoint.safetensors"
PROGRESS_FILE = "progress.json"
PROGRESS_SECONDS = 0.25  # "at most a few times a second"
FORMAT = "idlegrid-checkpoint-v1"

_requested = False  # set by SIGUSR1, cleared by the checkpoint it asked for


def _on_request(signum: int, frame: object) -> None:
    global _requested
    _requested = True


def install_request_handler() -> None:
    """SIGUSR1 asks for a checkpoint at the next safe point (the child's serve loop installs it once)."""
    signal.signal(signal.SIGUSR1, _on_request)


def clear_checkpoint_request() -> None:
    """After a unit: a request that came as it ended is void (the agent asks only while a unit runs)."""
    global _requested
    _requested = False


def unit_digest(job: ChildJob) -> str:
    """What a checkpoint must match to be used: the signed payload and whatever else changes the bytes."""
    stamp = {"payload": job.payload, "fault": job.fault, "fault_seed": job.fault_seed,
             "agent": worker_agent.__version__}  # another version of this code may checkpoint otherwise
    return hashlib.sha256(FORMAT.encode() + b"\n" + protocol.canonical_json(stamp)).hexdigest()


class Ticker:
    """When to checkpoint and report progress for one unit. Without a checkpoint_dir it never ticks."""

    def __init__(self, job: ChildJob) -> None:
        self.directory = Path(job.checkpoint_dir) if job.checkpoint_dir else None
        self.every = job.checkpoint_seconds
        self.digest = unit_digest(job)
        self._last = time.monotonic()
        self._last_progress = 0.0
        self.resumed_from = 0.0  # the fraction of the unit a checkpoint covered when it was resumed

    def metrics(self) -> dict[str, float]:
        """What a unit's metrics say of this: `resumed_from` when it resumed from a checkpoint."""
        return {"resumed_from": round(self.resumed_from, 4)} if self.resumed_from else {}

    @property
    def path(self) -> Path | None:
        return self.directory / CHECKPOINT_FILE if self.directory else None

    def due(self) -> bool:
        if self.directory is None:
            return False
        return _requested or time.monotonic() - self._last >= self.every

    def save(self, tensors: dict[str, Any], state: dict[str, Any]) -> None:
        """Write a checkpoint now (atomically) and restart the clock."""
        global _requested
        assert self.path is not None
        save(self.path, tensors, state, digest=self.digest)
        self._last = time.monotonic()
        _requested = False

    def load(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        return load(self.path, digest=self.digest) if self.path else None

    def progress(self, fraction: float, *, force: bool = False) -> None:
        if self.directory is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_SECONDS:
            return
        self._last_progress = now
        write_progress(self.directory, fraction)


def save(path: Path, tensors: dict[str, Any], state: dict[str, Any], *, digest: str) -> None:
    from safetensors.torch import save as to_bytes

    metadata = {"format": FORMAT, "unit": digest, "state": json.dumps(state, allow_nan=False)}
    # On the CPU whatever device computed them (a CUDA unit's too): load() gives CPU tensors back.
    data = to_bytes({name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}, metadata=metadata)
    _write_atomically(path, data, durable=True)


def load(path: Path, *, digest: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The checkpoint's tensors and state; None (the file deleted) when absent, unreadable, or of another unit."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("unit") != digest:
                raise ValueError("the checkpoint is of another unit")
            state = json.loads(metadata["state"])
            if not isinstance(state, dict):
                raise ValueError("the checkpoint's state is not an object")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means: start over
        print(f"checkpoint discarded ({type(exc).__name__}: {exc}); the unit starts over", file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
        return None
    return tensors, state


def write_progress(directory: Path, fraction: float) -> None:
    fraction = min(max(float(fraction), 0.0), 1.0)
    _write_atomically(directory / PROGRESS_FILE, json.dumps({"fraction": round(fraction, 4)}).encode(), durable=False)


def _write_atomically(path: Path, data: bytes, *, durable: bool) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
