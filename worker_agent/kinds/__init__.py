"""Task kinds: one module per kind, each with the same two functions.

- `required_artifacts(payload) -> list[str]`: the sha256 of every artifact the unit needs. Runs in
  the agent process, so it must stay pure Python (no torch, no numpy).
- `execute(job) -> metrics`: runs in the compute child; may import torch inside the function.

Adding a kind is one module here and one line in KIND_MODULES.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, cast

from worker_agent.jobfile import ChildJob, PayloadError

KIND_MODULES = {
    "inference": "worker_agent.kinds.inference",
    "fedavg": "worker_agent.kinds.fedavg",
}


class JobError(Exception):
    """The unit cannot be computed as given (bad weights, inputs or payload); reported verbatim."""


class Kind(Protocol):
    def required_artifacts(self, payload: dict[str, Any]) -> list[str]: ...

    def execute(self, job: ChildJob) -> dict[str, float]: ...


def load(kind: Any) -> Kind:
    module = KIND_MODULES.get(kind) if isinstance(kind, str) else None
    if module is None:
        raise PayloadError(f"unsupported task kind {kind!r}; this agent runs: {', '.join(sorted(KIND_MODULES))}")
    return cast(Kind, importlib.import_module(module))
