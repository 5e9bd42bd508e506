"""Builders for federated-training tests: labelled datasets, specs, and updates computed as an agent would."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from marketplace.artifacts.storage import get_storage
from marketplace.core.tensors import array_file_bytes
from marketplace.workunits.models import WorkUnit
from worker_agent.jobfile import ChildJob

MLP = {"architecture": "mlp", "config": {"in_features": 4, "hidden": [8], "out_features": 3}}


def labelled_bytes(rows: int, *, seed: int = 0, features: int = 4, classes: int = 3) -> bytes:
    """A learnable dataset: the label is the arg-max of the first `classes` features."""
    from safetensors.numpy import save

    x = np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)
    y = x[:, :classes].argmax(axis=1).astype(np.int64)
    return save({"x": x, "y": y})


def x_only_bytes(rows: int) -> bytes:
    return array_file_bytes(np.zeros((rows, 4), dtype=np.float32), name="x")


def honest_update(unit: WorkUnit, tmp_path: Path, *, fault: str | None = None, fault_seed: int = 0) -> bytes:
    """What an agent's compute child writes for a fedavg unit (the worker half, run in this process)."""
    from worker_agent.kinds import fedavg

    storage = get_storage()
    payload = unit.payload
    shas = [payload["model"]["weights"], payload["inputs"]["x"], payload["inputs"]["y"]]
    out = tmp_path / f"update-{unit.pk}-{fault}-{fault_seed}.safetensors"
    with ExitStack() as stack:
        paths = {sha: str(stack.enter_context(storage.local_path(sha))) for sha in shas}
        fedavg.execute(ChildJob(payload=payload, artifacts=paths, output_path=str(out), fault=fault,
                                fault_seed=fault_seed))
    return out.read_bytes()


def spec_for(upload, owner, *, rows: int = 60, eval_rows: int = 30, **spec: Any) -> dict[str, Any]:
    from tests.conftest import weights_bytes

    weights = upload(weights_bytes("mlp", MLP["config"]), owner)
    train = upload(labelled_bytes(rows, seed=1), owner)
    held_out = upload(labelled_bytes(eval_rows, seed=2), owner)
    base = {"model": {**MLP, "weights": weights}, "train_dataset": train, "eval_dataset": held_out,
            "rounds": 2, "shards": 3, "local_epochs": 2, "batch_size": 8, "learning_rate": 0.1}
    base.update(spec)
    return base
