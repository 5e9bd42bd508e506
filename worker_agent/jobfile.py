"""What passes between the agent and its compute child: a job file in, a status file out.

Plain JSON on disk keeps the child's interface tiny and lets the parent stay free of torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SECONDS = 300.0
DEFAULT_MEMORY_MB = 2048
FAULT_MODES = ("wrong",)
AGENT_PID_ENV = "IDLEGRID_AGENT_PID"  # lets the child notice an agent that died before it started


class PayloadError(ValueError):
    """A unit payload the agent cannot run as given."""


@dataclass(frozen=True)
class Limits:
    seconds: float = DEFAULT_SECONDS
    memory_mb: int = DEFAULT_MEMORY_MB

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Limits:
        raw = payload.get("limits") or {}
        if not isinstance(raw, dict):
            raise PayloadError("payload.limits must be an object")
        seconds = raw.get("seconds", DEFAULT_SECONDS)
        memory_mb = raw.get("memory_mb", DEFAULT_MEMORY_MB)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise PayloadError(f"payload.limits.seconds must be a positive number, got {seconds!r}")
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0:
            raise PayloadError(f"payload.limits.memory_mb must be a positive integer, got {memory_mb!r}")
        return cls(seconds=float(seconds), memory_mb=memory_mb)


@dataclass(frozen=True)
class ChildJob:
    payload: dict[str, Any]
    artifacts: dict[str, str]  # sha256 -> local path of the verified copy
    output_path: str
    status_path: str
    fault: str | None = None
    fault_seed: int = 0
    limits: Limits = field(default_factory=Limits)

    def artifact_path(self, sha256: str) -> Path:
        try:
            return Path(self.artifacts[sha256])
        except KeyError:
            raise PayloadError(f"artifact {sha256[:12]} was not fetched for this job") from None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> ChildJob:
        raw = json.loads(path.read_text())
        raw["limits"] = Limits(**raw.get("limits", {}))
        return cls(**raw)


@dataclass(frozen=True)
class ChildStatus:
    ok: bool
    error: str = ""
    code: str = ""  # bad_input, memory, internal: lets the parent word its report
    metrics: dict[str, float] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(asdict(self)))
        temp.replace(path)  # the parent never reads half a status

    @classmethod
    def read(cls, path: Path) -> ChildStatus | None:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return cls(**raw)
