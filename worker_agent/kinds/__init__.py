"""Task kinds: one module per kind, each with the same function.

- `execute(job) -> metrics`: runs in the compute child; may import torch inside the function.

What a unit of a kind holds, and which artifacts it needs, is its payload record in worker_agent/wire.py
(shared with the marketplace, which builds units with it); a kind's module reads its record with
`parse` and adds the checks that need the architecture registry.

Adding a kind is a payload record in wire.py, one module here and one line in KIND_MODULES.
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
    def execute(self, job: ChildJob) -> dict[str, float]: ...


def load(kind: Any) -> Kind:
    module = KIND_MODULES.get(kind) if isinstance(kind, str) else None
    if module is None:
        raise PayloadError(f"unsupported task kind {kind!r}; this agent runs: {', '.join(sorted(KIND_MODULES))}")
    return cast(Kind, importlib.import_module(module))
