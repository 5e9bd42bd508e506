"""The same federated rounds in one plain local loop: the check on the federated demo's claim.

    python -m demo.fedavg_reference                        # the demo's job, computed here
    python -m demo.fedavg_reference --compare final.safetensors   # and compared with a downloaded model

Round by round: every shard trains the round's global weights exactly as an agent's compute child does
(the worker's own `train_local`, one thread, deterministic algorithms, the unit's data-order seed), then
the updates are averaged weighted by samples (here in torch, float64, independently of the
marketplace's numpy aggregation) and evaluated on the held-out digits (torch, float32). Prints one JSON
object: accuracy and loss per round, and with --compare how far the given weights are from these.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from demo import digits
from worker_agent.kinds.fedavg import train_local, unit_seed

# The demo's job (demo/fedavg.py submits exactly these).
SETTINGS = {"rounds": 5, "shards": 4, "local_epochs": 3, "batch_size": 16, "learning_rate": 0.05, "momentum": 0.9,
            "seed": 0}
# The job's cross-class comparator (fedavg DEFAULTS): what "matches" means for the final weights.
RTOL, ATOL = 1e-3, 1e-5


@dataclass
class Reference:
    weights: dict[str, torch.Tensor]
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)


def initial_model(seed: int = digits.SEED) -> torch.nn.Module:
    torch.manual_seed(seed)
    return digits.build_cnn()


def run(data: digits.Digits, initial: dict[str, torch.Tensor], settings: dict = SETTINGS) -> Reference:
    torch.set_num_threads(1)  # as the compute child: training with 1 and 2 threads differs in the last bits
    torch.use_deterministic_algorithms(True)
    global_weights = {name: tensor.detach().clone() for name, tensor in initial.items()}
    xs = np.array_split(data.x_train, settings["shards"])
    ys = np.array_split(data.y_train.astype(np.int64), settings["shards"])
    reference = Reference(weights=global_weights)
    for round_index in range(settings["rounds"]):
        updates, samples = [], []
        for shard, (x, y) in enumerate(zip(xs, ys)):
            model = digits.build_cnn()
            model.load_state_dict(global_weights)
            train_local(model, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)),
                        epochs=settings["local_epochs"], batch_size=settings["batch_size"],
                        learning_rate=settings["learning_rate"], momentum=settings["momentum"],
                        seed=unit_seed(settings["seed"], round_index, shard))
            updates.append(model.state_dict())
            samples.append(len(x))
        total = sum(samples)
        global_weights = {
            name: (start.double() + sum((u[name].double() - start.double()) * (n / total) for u, n in zip(updates, samples))).float()
            for name, start in global_weights.items()
        }
        loss, accuracy = evaluate(global_weights, data)
        reference.accuracy.append(accuracy)
        reference.loss.append(loss)
    reference.weights = global_weights
    return reference


def evaluate(weights: dict[str, torch.Tensor], data: digits.Digits) -> tuple[float, float]:
    model = digits.build_cnn()
    model.load_state_dict(weights)
    model.eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(data.x_test))
        labels = torch.from_numpy(data.y_test.astype(np.int64))
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
    return loss, float((logits.argmax(1).numpy() == data.y_test).mean())


def difference(reference: dict[str, torch.Tensor], other: dict[str, np.ndarray]) -> tuple[float, bool]:
    """Max |difference| over all weights, and whether every weight is within the comparator's allclose."""
    if set(reference) != set(other):
        return float("inf"), False
    a = np.concatenate([reference[name].numpy().ravel() for name in sorted(reference)])
    b = np.concatenate([np.asarray(other[name]).ravel() for name in sorted(reference)])
    return float(np.abs(a - b).max()), bool(np.allclose(b, a, rtol=RTOL, atol=ATOL))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.fedavg_reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, help="a safetensors model to compare with the reference's final weights")
    parser.add_argument("--save", type=Path, help="write the reference's final weights here (safetensors)")
    args = parser.parse_args(argv)
    data = digits.load()
    reference = run(data, initial_model().state_dict())
    summary: dict = {"rounds": SETTINGS["rounds"], "accuracy_per_round": reference.accuracy,
                     "eval_loss_per_round": [round(v, 6) for v in reference.loss]}
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in reference.weights.items()}, str(args.save))
    if args.compare:
        from safetensors.numpy import load_file

        diff, close = difference(reference.weights, load_file(str(args.compare)))
        summary.update({"max_abs_diff": diff, "within_tolerance": close, "rtol": RTOL, "atol": ATOL})
    print(json.dumps(summary))
    return 0 if summary.get("within_tolerance", True) else 1


if __name__ == "__main__":
    sys.exit(main())
