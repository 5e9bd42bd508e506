"""The Idlegrid demo: one batch-inference job computed by three volunteer agents (one faulty on purpose),
checked by quorum, merged, and compared with the same model run locally; paid for by a deposit on a local
chain (anvil) and paid out in one epoch root that the contributors claim (demo/payouts.py).

    bin/demo                # embedded defaults: SQLite, filesystem broker, files under var/demo
    bin/demo --keep         # leave var/demo and the logs for a look afterwards
    bin/demo --fedavg       # federated training instead: a CNN trained in rounds across the agents
                            # (demo/fedavg.py), checked against `python -m demo.fedavg_reference`
    bin/demo --portal       # the same, then everything stays up: the portal's URL and the demo's logins
                            # are printed, until Ctrl-C

Its last line is one JSON object of the figures; it exits non-zero if the job fails, the faulty
device is not caught, the accuracies differ, a claim differs from the ledger, or the chain and the
ledger disagree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.numpy import load as load_safetensors
from safetensors.torch import save as save_safetensors

from demo import digits, payouts
from demo.api import Api
from demo.cluster import ROOT, Cluster
from marketplace.core.tensors import array_file_bytes

console = Console(stderr=True)
AGENTS = [("alice", "alice-laptop", False), ("bob", "bob-desktop", False), ("mallory", "mallory-box", True)]
DEPOSIT = 100 * 10**18  # base units of the test token the submitter deposits (the job escrows ~0.02 of it)
# Earnings are held this long before they settle: seconds here, so the epoch can close right after the job.
AUDIT_WINDOW_SECONDS = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bin/demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--var-dir", type=Path, default=ROOT / "var" / "demo", help="wiped at start (default var/demo)")
    parser.add_argument("--rows-per-unit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the job")
    parser.add_argument("--keep", action="store_true", help="keep var dir and logs after a successful run")
    parser.add_argument("--fedavg", action="store_true", help="run the federated training scenario (demo/fedavg.py)")
    parser.add_argument("--portal", action="store_true",
                        help="after the run, keep the cluster, the agents and the chain up and print the portal's URL "
                             "and logins, until Ctrl-C")
    args = parser.parse_args()
    if args.portal and args.fedavg:
        parser.error("--portal runs with the inference scenario only")
    return args


def submit(api: Api, model, x_test: np.ndarray, args: argparse.Namespace) -> int:
    weights = api.upload(save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}))
    dataset = api.upload(array_file_bytes(x_test, name="x"))
    spec = {"model": {**digits.CNN, "weights": weights}, "dataset": dataset,
            "rows_per_unit": args.rows_per_unit, "batch_size": args.batch_size}
    response = api.http.post("/api/v1/jobs/", json={"kind": "inference", "spec": spec})
    if response.status_code != 201:
        raise SystemExit(f"the job was refused: {response.text}")
    return response.json()["id"]


AGENT_OPTIONS = ("--batch", "2", "--poll", "1")
REPORTED = r"done in [0-9.]+s, reported"  # worker_agent/agent.py, once a unit's result was accepted


def agents_start(cluster: Cluster, state_dirs: dict) -> None:
    """The faulty agent starts first, alone on the job, and the honest ones once it has reported a result:
    so that it surely computes a share of the job whatever the timing (with all three started together,
    the honest two once took every unit in a second while it was in its idle wait, and it was never
    caught because it never answered). Which units it gets, and how many, still varies; that it answers
    some, wrongly, and that each is judged invalid, does not."""
    for owner, device, faulty in sorted(AGENTS, key=lambda agent: not agent[2]):
        process = cluster.start_agent(device, state_dirs[owner], *AGENT_OPTIONS,
                                      *(["--faulty", "wrong"] if faulty else []))
        if faulty:
            process.wait_for_log(REPORTED, timeout=300)
            console.print(f"• {device} started first and has reported a result; now the honest agents")
        else:
            console.print(f"• agent {device} of {owner} running")


def follow(api: Api, job_id: int, cluster: Cluster, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    columns = [TextColumn("[bold]job {task.fields[job]}[/] {task.fields[state]:<9}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} units  valid {task.fields[valid]}  invalid {task.fields[invalid]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("job", total=None, job=job_id, state="pending", valid=0, invalid=0)
        while True:
            job = api.get(f"/api/v1/jobs/{job_id}/").json()
            progress.update(bar, total=job["units_total"] or None, completed=job["units_done"], state=job["state"],
                            valid=job["results_valid"], invalid=job["results_invalid"])
            if job["state"] in ("completed", "failed"):
                return job
            dead = [p.name for p in cluster.processes if not p.alive() and not p.name.startswith("agent")]
            if dead:
                raise SystemExit(f"{', '.join(dead)} died; see {cluster.var_dir / 'logs'}")
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job_id} did not finish within {timeout:.0f}s (state {job['state']})")
            time.sleep(0.5)


def main() -> int:
    args = parse_args()
    if args.fedavg:
        from demo import fedavg

        return fedavg.run(args)
    started = time.monotonic()
    shutil.rmtree(args.var_dir, ignore_errors=True)
    args.var_dir.mkdir(parents=True)
    console.print(f"[bold]Idlegrid demo[/] — files and logs under {args.var_dir}")
    console.print("• starting a local chain (anvil) and deploying TestToken + PayoutLedger")
    chain_seconds = time.monotonic()
    chain = payouts.chain_start()
    chain_seconds = time.monotonic() - chain_seconds
    console.print(f"  anvil (pid {chain.node.pid}) at {chain.url}; PayoutLedger {chain.deployment.ledger}")
    cluster = None
    ok = False
    try:
        # No known-answer units: with three devices a disputed known answer could find no independent owner
        # to settle it (it needs one more owner than vouched for the answer), and the job would wait.
        cluster = Cluster(var_dir=args.var_dir, env_overrides={
            "IDLEGRID_SWEEP_SECONDS": "2", "IDLEGRID_KNOWN_ANSWER_RATE": "0",
            "IDLEGRID_AUDIT_WINDOW_SECONDS": str(AUDIT_WINDOW_SECONDS), **chain.server_env()})
        console.print("• migrating the database and creating accounts")
        cluster.migrate()
        submitter = cluster.account("submitter")
        owners = {owner: cluster.account(owner) for owner, _, _ in AGENTS}
        console.print("• starting gunicorn, Celery worker and Celery beat")
        cluster.start_services()
        state_dirs = {}
        for owner, device, faulty in AGENTS:
            state_dirs[owner] = cluster.enroll_agent(name=device, owner_token=owners[owner])
            console.print(f"• agent {device} of {owner} enrolled{' [red](faulty on purpose)[/]' if faulty else ''}")
        t0 = time.monotonic()
        wallets = payouts.people_prepare(cluster=cluster, chain=chain, tokens={"submitter": submitter, **owners},
                                         folder=args.var_dir / "wallets")
        console.print("• each person linked a payout address (EIP-191 signature of the marketplace's challenge)")
        deposit = payouts.submitter_fund(cluster=cluster, chain=chain, wallet=wallets["submitter"], amount=DEPOSIT)
        chain_seconds += time.monotonic() - t0
        console.print(f"• the submitter deposited {DEPOSIT} base units on chain; credited by the deposit follower "
                      f"(block {deposit['block']})")

        console.print("• training a small CNN on scikit-learn's digits")
        data = digits.load()
        t0 = time.monotonic()
        model = digits.train(data)
        local_logits = digits.predict_logits(model, data.x_test, batch_size=args.batch_size)
        local_accuracy = float((local_logits.argmax(1) == data.y_test).mean())
        console.print(f"  trained in {time.monotonic() - t0:.1f}s; local held-out accuracy {local_accuracy:.4f}")

        api = Api(cluster.url, submitter)
        job_id = submit(api, model, data.x_test, args)
        console.print(f"• submitted job {job_id}: batch inference over {len(data.x_test)} held-out digits")
        agents_start(cluster, state_dirs)
        job = follow(api, job_id, cluster, args.timeout)
        payout = None
        if job["state"] == "completed":
            console.print(f"• settling: earnings held {AUDIT_WINDOW_SECONDS}s, then one epoch root on chain, "
                          "claims with `idlegrid-agent claim`, reconciliation")
            contributors = [(owner, state_dirs[owner], owners[owner], wallets[owner]) for owner, _, _ in AGENTS]
            t0 = time.monotonic()
            payout = payouts.payouts_settle(cluster=cluster, chain=chain, contributors=contributors, deposit=deposit,
                                            faulty_devices=[device for _, device, faulty in AGENTS if faulty])
            # what the money path adds to the run: chain, wallets and deposit before the job, settlement after
            payout["seconds"] = round(chain_seconds + time.monotonic() - t0, 2)
        summary = summarise(api, cluster, job, data, local_logits, local_accuracy, owners, started, payout)
        ok = summary["ok"]
        print_summary(summary)
        print(json.dumps(summary))
        if args.portal:
            portal_serve(cluster, chain)
        return 0 if ok else 1
    finally:
        try:
            if cluster is not None:
                cluster.stop_all()
        finally:
            chain.stop()
        if ok and not args.keep:
            shutil.rmtree(args.var_dir, ignore_errors=True)
        elif not ok:
            console.print(f"logs kept in {args.var_dir / 'logs'}")


def portal_serve(cluster: Cluster, chain: payouts.LocalChain) -> None:
    """Keep everything up and tell a newcomer where to click, until Ctrl-C (or a server process dies)."""
    table = Table(title="Log in to the portal", title_justify="left")
    for column in ("username", "password", "role"):
        table.add_column(column)
    roles = {"submitter": "submitted the job; funded it on chain"}
    roles.update({owner: f"contributor: runs {device}{' (faulty on purpose)' if faulty else ''}"
                  for owner, device, faulty in AGENTS})
    for username, password in cluster.passwords.items():
        table.add_row(username, password, roles.get(username, ""))
    console.print(table)
    console.print(f"[bold]Portal:[/] {cluster.url}/   (REST API: {cluster.url}/api/docs/; chain: {chain.url})")
    console.print(f"Mail (password resets) is written under {cluster.var_dir / 'mail'}. Press Ctrl-C to stop.")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and a plain `kill` both stop everything through the caller's `finally`; set explicitly, since a
    # shell that starts the demo in the background hands it SIGINT ignored.
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while all(p.alive() for p in cluster.processes if not p.name.startswith("agent")):
            time.sleep(1)
        console.print("[red]a server process exited[/]; stopping")
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def summarise(api, cluster, job, data, local_logits, local_accuracy, owners, started, payout) -> dict:
    summary: dict = {"job_id": job["id"], "state": job["state"], "units": job["units_total"],
                     "units_done": job["units_done"], "results_valid": job["results_valid"],
                     "results_invalid": job["results_invalid"], "results_per_unit": job["results_per_unit"]}
    devices = []
    for owner, _device, faulty in AGENTS:
        for device in Api(cluster.url, owners[owner]).get("/api/v1/devices/").json()["results"]:  # one page: 1-2 each
            devices.append({"device": device["name"], "owner": owner, "faulty_on_purpose": faulty,
                            "valid": device["valid_results"], "invalid": device["invalid_results"]})
    summary["devices"] = devices
    caught = [d["device"] for d in devices if d["invalid"] > 0]
    summary["faulty_devices_caught"] = caught
    faulty = [d for d in devices if d["faulty_on_purpose"]]
    summary["faulty_caught"] = bool(faulty) and all(d["invalid"] > 0 and d["valid"] == 0 for d in faulty) and all(
        d["invalid"] == 0 for d in devices if not d["faulty_on_purpose"])
    if job["state"] == "completed":
        merged = load_safetensors(api.get(f"/api/v1/jobs/{job['id']}/output/").content)["y"]
        summary["accuracy_marketplace"] = float((merged.argmax(1) == data.y_test).mean())
        summary["max_abs_diff_vs_local"] = float(np.abs(merged - local_logits).max())
    else:
        summary["error"] = job["error"]
        summary["accuracy_marketplace"] = None
    summary["accuracy_local"] = local_accuracy
    summary["accuracies_match"] = summary["accuracy_marketplace"] == local_accuracy
    if payout is not None:
        summary["payouts"] = payout
        summary["tokens_paid"] = {owner: c["claimed_on_chain"] for owner, c in payout["contributors"].items()}
        summary["root_tx_hash"] = payout["root_tx_hash"]
        summary["ledger_equals_chain"] = payout["ledger_equals_chain"]
    summary["wall_seconds"] = round(time.monotonic() - started, 2)
    summary["ok"] = (job["state"] == "completed" and summary["faulty_caught"] and summary["accuracies_match"]
                     and payout is not None and payout["ok"])
    return summary


def print_summary(summary: dict) -> None:
    table = Table(title=f"job {summary['job_id']}: {summary['state']}", show_header=False)
    for label, key in [("units (done/total)", None), ("results valid", "results_valid"),
                       ("results invalid", "results_invalid"), ("results per unit", "results_per_unit"),
                       ("faulty device caught", "faulty_devices_caught"), ("accuracy, merged job output", "accuracy_marketplace"),
                       ("accuracy, same model run locally", "accuracy_local"), ("max |merged - local| logit", "max_abs_diff_vs_local"),
                       ("wall time (s)", "wall_seconds")]:
        value = f"{summary['units_done']}/{summary['units']}" if key is None else summary.get(key)
        table.add_row(label, ", ".join(value) if isinstance(value, list) else str(value))
    console.print(table)
    devices = Table("device", "owner", "valid", "invalid", "faulty on purpose", title="devices")
    for d in summary["devices"]:
        devices.add_row(d["device"], d["owner"], str(d["valid"]), str(d["invalid"]), "yes" if d["faulty_on_purpose"] else "")
    console.print(devices)
    payout = summary.get("payouts")
    if payout:
        title = (f"payouts: epoch {payout['epoch']} ({payout['epoch_state']}), root tx {payout['root_tx_hash']}, "
                 f"ledger == chain: {payout['ledger_equals_chain']}")
        paid = Table("owner", "payout address", "ledger (base units)", "claimed on chain", "equal", title=title)
        for owner, c in payout["contributors"].items():
            paid.add_row(owner, c["address"], c["ledger_cumulative"], c["claimed_on_chain"],
                         "yes" if c["claimed_equals_settled"] else "[red]NO[/]")
        console.print(paid)
        for device, amount in payout["faulty_forfeited"].items():
            console.print(f"faulty device {device}: earned {payout['faulty_earned'][device]} base units, "
                          f"{amount} forfeited")
    console.print("[green]demo passed[/]" if summary["ok"] else "[red]demo FAILED[/]")


if __name__ == "__main__":
    sys.exit(main())
