"""`bin/demo --fedavg`: federated training of the small CNN on scikit-learn's digits across the demo's
agents, one of them poisoning its updates on purpose, then the same rounds in one local loop to check.

Each round, every shard of the training digits is trained by two devices of different owners; a
poisoned update (sign-flipped, x10) disagrees with the honest ones and is never aggregated; the
marketplace averages the validated updates, evaluates the new global model on the held-out digits and
starts the next round. Last line: one JSON object (rounds, accuracy per round, the reference's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import numpy as np
from rich.console import Console
from rich.table import Table
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_safetensors

from demo import digits, fedavg_reference
from demo.api import Api
from demo.cluster import Cluster

console = Console(stderr=True)
AGENTS = [("alice", "alice-laptop", None), ("bob", "bob-desktop", None), ("mallory", "mallory-box", "poison")]
MIN_ACCURACY = 0.95


def submit(api: Api, data: digits.Digits, initial) -> int:
    weights = api.upload(save_safetensors({k: v.contiguous() for k, v in initial.items()}))
    train = api.upload(save_numpy({"x": data.x_train, "y": data.y_train.astype(np.int64)}))
    held_out = api.upload(save_numpy({"x": data.x_test, "y": data.y_test.astype(np.int64)}))
    spec = {"model": {**digits.CNN, "weights": weights}, "train_dataset": train, "eval_dataset": held_out,
            **fedavg_reference.SETTINGS, "aggregation": "mean"}
    response = api.http.post("/api/v1/jobs/", json={"kind": "fedavg", "spec": spec})
    if response.status_code != 201:
        raise SystemExit(f"the job was refused: {response.text}")
    return response.json()["id"]


def follow(api: Api, job_id: int, cluster: Cluster, timeout: float) -> tuple[dict, dict]:
    deadline, shown = time.monotonic() + timeout, 0
    while True:
        job = api.get(f"/api/v1/jobs/{job_id}/").json()
        progress = api.get(f"/api/v1/jobs/{job_id}/rounds/").json()
        for done in progress["rounds"][shown:]:
            console.print(f"  round {done['round']}: {done['updates']} validated updates aggregated, "
                          f"held-out accuracy {done['eval_accuracy']:.4f}, loss {done['eval_loss']:.4f}")
        shown = len(progress["rounds"])
        if job["state"] in ("completed", "failed"):
            return job, progress
        dead = [p.name for p in cluster.processes if not p.alive()]
        if dead:
            raise SystemExit(f"{', '.join(dead)} died; see {cluster.var_dir / 'logs'}")
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} did not finish within {timeout:.0f}s (state {job['state']})")
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    shutil.rmtree(args.var_dir, ignore_errors=True)
    args.var_dir.mkdir(parents=True)
    cluster = Cluster(var_dir=args.var_dir, env_overrides={"IDLEGRID_SWEEP_SECONDS": "2",
                                                           "IDLEGRID_KNOWN_ANSWER_RATE": "0"})
    ok = False
    try:
        console.print(f"[bold]Idlegrid demo: federated training[/] — files and logs under {args.var_dir}")
        cluster.migrate()
        submitter = cluster.account("submitter", funds=10**24)  # escrow for the job (base units)
        # Jobs escrow price x units x replication from the submitter's balance (marketplace/ledger).
        cluster.manage("ledger_grant", "submitter", "--amount", str(10**24), "--reason", "demo funds",
                       "--key", "demo-fedavg-submitter")
        owners = {owner: cluster.account(owner) for owner, _, _ in AGENTS}
        console.print("• starting gunicorn, Celery worker and Celery beat")
        cluster.start_services()
        state_dirs = {owner: cluster.enroll_agent(name=device, owner_token=owners[owner]) for owner, device, _ in AGENTS}
        data, initial = digits.load(), fedavg_reference.initial_model().state_dict()
        api = Api(cluster.url, submitter)
        job_id = submit(api, data, initial)
        # The poisoner starts first and alone, and the honest agents once it has reported an update: so it
        # surely trains a share of round 0 whatever the timing (as in the inference demo, demo/__main__.py).
        for owner, device, fault in sorted(AGENTS, key=lambda agent: agent[2] is None):
            process = cluster.start_agent(device, state_dirs[owner], "--batch", "1", "--poll", "0.5",
                                          *(["--faulty", fault] if fault else []))
            if fault:
                process.wait_for_log(r"done in [0-9.]+s, reported", timeout=300)
            console.print(f"• agent {device} of {owner} running{' [red](poisons its updates on purpose; started first)[/]' if fault else ''}")
        settings = fedavg_reference.SETTINGS
        console.print(f"• job {job_id}: {settings['rounds']} rounds x {settings['shards']} shards of "
                      f"{len(data.x_train)} training digits, {settings['local_epochs']} local epochs")
        job, progress = follow(api, job_id, cluster, args.timeout)
        federated_seconds = time.monotonic() - started
        console.print("• the same rounds in one local loop (python -m demo.fedavg_reference)")
        reference = fedavg_reference.run(data, initial)
        summary = summarise(api, cluster, job, progress, reference, owners, federated_seconds, started)
        ok = summary["ok"]
        print_summary(summary)
        print(json.dumps(summary))
        return 0 if ok else 1
    finally:
        cluster.stop_all()
        if ok and not args.keep:
            shutil.rmtree(args.var_dir, ignore_errors=True)
        elif not ok:
            console.print(f"logs kept in {args.var_dir / 'logs'}")


def summarise(api, cluster, job, progress, reference, owners, federated_seconds, started) -> dict:
    rounds = progress["rounds"]
    summary: dict = {"job_id": job["id"], "state": job["state"], "rounds": len(rounds),
                     "accuracy_per_round": [r["eval_accuracy"] for r in rounds],
                     "eval_loss_per_round": [round(r["eval_loss"], 6) for r in rounds],
                     "reference_accuracy_per_round": reference.accuracy,
                     "reference_accuracy": reference.accuracy[-1] if reference.accuracy else None,
                     "results_valid": job["results_valid"], "results_invalid": job["results_invalid"],
                     "results_per_unit": job["results_per_unit"]}
    devices = []
    for owner, _device, fault in AGENTS:
        api_of_owner = Api(cluster.url, owners[owner])
        # Each validated update credits its device's owner (marketplace/ledger), held for the audit window.
        earned = api_of_owner.get("/api/v1/ledger/balances/").json()["earnings_held"]
        for device in api_of_owner.get("/api/v1/devices/").json()["results"]:  # an owner has fewer than a page
            devices.append({"device": device["name"], "fault": fault, "valid": device["valid_results"],
                            "invalid": device["invalid_results"], "earnings_held": earned})
    summary["devices"] = devices
    aggregated = {result_id for r in rounds for result_id in r["result_ids"]}
    summary["updates_aggregated"] = len(aggregated)
    poisoner = next(d for d in devices if d["fault"])
    summary["poisoned_updates_rejected"] = poisoner["invalid"]
    summary["poisoned_updates_accepted"] = poisoner["valid"]
    if job["state"] == "completed":
        final = load_safetensors(api.get(f"/api/v1/jobs/{job['id']}/output/").content)
        diff, close = fedavg_reference.difference(reference.weights, final)
        summary.update({"accuracy": rounds[-1]["eval_accuracy"], "max_abs_diff_vs_reference": diff,
                        "weights_match_reference": close})
    else:
        summary.update({"error": job["error"], "accuracy": None, "weights_match_reference": False})
    summary["federated_seconds"] = round(federated_seconds, 2)
    summary["wall_seconds"] = round(time.monotonic() - started, 2)
    summary["ok"] = bool(
        job["state"] == "completed" and summary["accuracy"] >= MIN_ACCURACY and summary["weights_match_reference"]
        and poisoner["valid"] == 0 and poisoner["invalid"] > 0
        and all(d["invalid"] == 0 for d in devices if not d["fault"])
    )
    return summary


def print_summary(summary: dict) -> None:
    table = Table("round", "accuracy (federated)", "accuracy (local reference)", title=f"job {summary['job_id']}: {summary['state']}")
    for index, (federated, local) in enumerate(zip(summary["accuracy_per_round"], summary["reference_accuracy_per_round"])):
        table.add_row(str(index), f"{federated:.4f}", f"{local:.4f}")
    console.print(table)
    console.print(f"final weights vs local reference: max |diff| {summary.get('max_abs_diff_vs_reference')}, "
                  f"within tolerance: {summary['weights_match_reference']}")
    for device in summary["devices"]:
        console.print(f"{device['device']}: {device['valid']} valid, {device['invalid']} invalid, "
                      f"earned {device['earnings_held']} base units (held)")
    console.print(f"poisoned updates rejected {summary['poisoned_updates_rejected']}, accepted "
                  f"{summary['poisoned_updates_accepted']}; results per unit {summary['results_per_unit']}")
    console.print("[green]demo passed[/]" if summary["ok"] else "[red]demo FAILED[/]")
