"""Server halves of task kinds: validate a spec, split a job into units, compare two results, merge."""

from __future__ import annotations

from types import ModuleType

from marketplace.core.exceptions import ValidationFailed
from marketplace.jobs.kinds import fedavg, inference

KINDS: dict[str, ModuleType] = {"inference": inference, "fedavg": fedavg}


def kind_module(kind: object) -> ModuleType:
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValidationFailed(f"unknown job kind {kind!r}; known: {', '.join(sorted(KINDS))}", fields={"kind": "unknown"})
    return KINDS[kind]
