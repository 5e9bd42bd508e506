"""What passes between the agent and its compute child: one JSON line per unit each way.

The agent writes a `ChildJob` line to the child's stdin and reads a `ChildStatus` line back from its
stdout. Plain JSON (never pickle) keeps the child's interface tiny and the parent free of torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker_agent.gpu import device_checked
from worker_agent.wire import Limits, PayloadError

# Sabotage modes for demos and tests: wrong (noise differing per result), collude (the same wrong answer
# for the same input on every colluding device), lazy (random output, nothing computed), poison (fedavg
# only: the training update sign-flipped and scaled; other kinds compute honestly under it).
FAULT_MODES = ("wrong", "collude", "lazy", "poison")
AGENT_PID_ENV = "IDLEGRID_AGENT_PID"  # lets the child notice an agent that died before it started
# torch threads the child's units run with (the policy's `cores`): a numerics fact, since a thread count
# other than 1 may change the last bits of a result; each ChildJob says it again (`threads`).
THREADS_ENV = "IDLEGRID_CHILD_THREADS"
MAX_THREADS = 1024
# A unit's limits and a refused payload are the wire's (worker_agent/wire.py); the child's interface
# names them too, so they are exported from here as well.
__all__ = ["AGENT_PID_ENV", "FAULT_MODES", "MAX_THREADS", "THREADS_ENV", "ChildJob", "ChildStatus", "Limits", "PayloadError"]


@dataclass(frozen=True)
class ChildJob:
    payload: dict[str, Any]
    artifacts: dict[str, str]  # sha256 -> local path of the verified copy
    output_path: str
    fault: str | None = None
    fault_seed: int = 0
    limits: Limits = field(default_factory=Limits)
    device: str = "cpu"  # "cpu" or "cuda:N" (worker_agent/gpu.py child_device decides)
    threads: int = 1  # torch threads for this unit (the policy's `cores` key); restored after it
    # Checkpoints and progress (worker_agent/kinds/_checkpoint.py): where, and how often; None: neither.
    checkpoint_dir: str | None = None
    checkpoint_seconds: float = 60.0

    def __post_init__(self) -> None:
        device_checked(self.device)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 1 <= self.threads <= MAX_THREADS:
            raise PayloadError(f"threads must be a whole number from 1 to {MAX_THREADS}, got {self.threads!r}")

    def artifact_path(self, sha256: str) -> Path:
        try:
            return Path(self.artifacts[sha256])
        except KeyError:
            raise PayloadError(f"artifact {sha256[:12]} was not fetched for this job") from None

    def to_line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> ChildJob:
        raw = json.loads(line)
        raw["limits"] = Limits(**raw.get("limits", {}))
        return cls(**raw)


@dataclass(frozen=True)
class ChildStatus:
    ok: bool
    error: str = ""
    code: str = ""  # bad_input, memory, internal: lets the parent word its report
    metrics: dict[str, float] = field(default_factory=dict)
    recycle: bool = False  # the child's address space has drifted too far; it asks to be replaced

    def to_line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> ChildStatus:
        """Raises ValueError on anything but a well-formed status line."""
        raw = json.loads(line)
        if not isinstance(raw, dict) or not isinstance(raw.get("ok"), bool):
            raise ValueError(f"not a status: {line[:200]!r}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ValueError(f"not a status: {exc}") from None
