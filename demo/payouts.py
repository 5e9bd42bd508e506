"""The demo's money path on a local chain: anvil on a free loopback port, TestToken + PayoutLedger, the
submitter's deposit credited by the deposit follower, payout addresses linked with EIP-191 signatures,
one epoch settled after the job (one root on chain), contributors claiming with `idlegrid-agent claim`,
and the ledger reconciled with the chain.

The demo process plays the people (submitter and contributors: their keys, their transactions, their API
calls). The marketplace's side (following deposits, closing and publishing the epoch, reconciling) runs
through the ledger's services in a process with the cluster's settings, as a Celery task would:

    python -m demo.payouts follow-deposit --tx 0x... | settle | reconcile    # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct
from web3 import Web3

from marketplace.chain.anvil import Anvil
from marketplace.chain.client import Deployment, contract_artifact, deploy, web3_connect

if TYPE_CHECKING:
    from demo.cluster import Cluster

# Blocks every half second: confirmation depths pass in about a second without a transaction to wait for.
BLOCK_SECONDS = "0.5"
CONFIRMATIONS = 2
GAS_MONEY_WEI = 10**18  # each person's key pays its own gas
RECEIPT_TIMEOUT = 60
STEP_TIMEOUT = 120


class PayoutError(RuntimeError):
    """The money path failed; the message says where."""


@dataclass
class Wallet:
    """A person's own key, generated for the demo and kept in a 0600 file (never printed)."""

    name: str
    address: str
    key_file: Path

    @classmethod
    def create(cls, name: str, folder: Path) -> Wallet:
        folder.mkdir(parents=True, exist_ok=True)
        account = Account.create()
        key_file = folder / f"{name}.key"
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(Web3.to_hex(account.key))
        return cls(name=name, address=account.address, key_file=key_file)

    def account(self) -> Any:
        return Account.from_key(self.key_file.read_text().strip())


@dataclass
class LocalChain:
    """anvil with TestToken + PayoutLedger deployed; `stop()` ends anvil by its PID."""

    node: Anvil
    w3: Web3
    deployment: Deployment
    deployer_key: str
    operator_key: str
    faucet_key: str
    chain_id: int
    _token: Any = field(default=None, repr=False)
    _ledger: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.node.url

    def server_env(self) -> dict[str, str]:
        """Settings for the marketplace's processes. The operator key goes only to them, through the
        environment: it is never printed and never given to an agent."""
        return {
            "IDLEGRID_CHAIN_RPC_URL": self.url,
            "IDLEGRID_CHAIN_CONTRACT": self.deployment.ledger,
            "IDLEGRID_CHAIN_OPERATOR_KEY": self.operator_key,
            "IDLEGRID_CHAIN_START_BLOCK": str(self.deployment.block),
            "IDLEGRID_CHAIN_CONFIRMATIONS": str(CONFIRMATIONS),
        }

    @property
    def token(self) -> Any:
        if self._token is None:
            self._token = self.w3.eth.contract(address=self.deployment.token, abi=contract_artifact("TestToken")["abi"])
        return self._token

    @property
    def ledger(self) -> Any:
        if self._ledger is None:
            self._ledger = self.w3.eth.contract(address=self.deployment.ledger,
                                                abi=contract_artifact("PayoutLedger")["abi"])
        return self._ledger

    def send(self, key: str, call: Any = None, *, to: str | None = None, value: int = 0, nonce: int | None = None,
             gas: int = 200_000) -> str:
        """Sign and send a contract call (or a plain transfer `to`); returns the hash without waiting. The
        gas is given, not estimated: a call may depend on an earlier one of the same sender still pending."""
        sender = Account.from_key(key)
        params = {"from": sender.address, "chainId": self.chain_id, "gas": gas, "value": value,
                  "nonce": self.w3.eth.get_transaction_count(sender.address, "pending") if nonce is None else nonce}
        transaction = call.build_transaction(params) if call is not None else {
            **params, "to": to, "maxFeePerGas": 2 * 10**10, "maxPriorityFeePerGas": 10**9}
        return Web3.to_hex(self.w3.eth.send_raw_transaction(sender.sign_transaction(transaction).raw_transaction))

    def wait(self, *tx_hashes: str) -> list[dict]:
        receipts = [self.w3.eth.wait_for_transaction_receipt(tx, timeout=RECEIPT_TIMEOUT, poll_latency=0.1)
                    for tx in tx_hashes]
        failed = [tx for tx, receipt in zip(tx_hashes, receipts, strict=True) if receipt["status"] != 1]
        if failed:
            raise PayoutError(f"transactions reverted: {failed}")
        return receipts

    def stop(self) -> None:
        self.node.stop()


def chain_start() -> LocalChain:
    """Start anvil and deploy a TestToken and a PayoutLedger over it (deployer: dev account 0, admin and
    minter; operator: dev account 1; dev account 2 hands out gas money)."""
    node = Anvil(accounts=3, extra_args=["--block-time", BLOCK_SECONDS])
    node.start()
    try:
        w3 = web3_connect(node.url, timeout=30)
        (_, deployer_key), (operator, operator_key), (_, faucet_key) = node.accounts
        deployment = deploy(w3=w3, deployer_key=deployer_key, operator=operator, token=None)
        return LocalChain(node=node, w3=w3, deployment=deployment, deployer_key=deployer_key,
                          operator_key=operator_key, faucet_key=faucet_key, chain_id=int(w3.eth.chain_id))
    except BaseException:
        node.stop()
        raise


def gas_money_give(chain: LocalChain, wallets: list[Wallet]) -> None:
    faucet = Account.from_key(chain.faucet_key).address
    nonce = chain.w3.eth.get_transaction_count(faucet, "pending")
    chain.wait(*[chain.send(chain.faucet_key, to=w.address, value=GAS_MONEY_WEI, nonce=nonce + i, gas=21_000)
                 for i, w in enumerate(wallets)])


def deposit_make(chain: LocalChain, wallet: Wallet, amount: int) -> str:
    """The deployer mints test tokens to the submitter; the submitter approves the ledger and deposits.
    Returns the deposit's transaction hash once mined."""
    chain.wait(chain.send(chain.deployer_key, chain.token.functions.mint(wallet.address, amount)))
    key = Web3.to_hex(wallet.account().key)
    nonce = chain.w3.eth.get_transaction_count(wallet.address, "pending")
    approve = chain.send(key, chain.token.functions.approve(chain.deployment.ledger, amount), nonce=nonce)
    deposit = chain.send(key, chain.ledger.functions.deposit(amount), nonce=nonce + 1)
    chain.wait(approve, deposit)
    return deposit


def wallet_link(*, server: str, token: str, password: str, wallet: Wallet) -> dict:
    """Link the wallet as the account's payout address: the account's password and the marketplace's
    challenge signed with the wallet's key (EIP-191). The first address takes effect at once."""
    with httpx.Client(base_url=server, headers={"Authorization": f"Token {token}"}, timeout=30) as http:
        challenge = http.get("/api/v1/wallet/challenge/")
        challenge.raise_for_status()
        signed = wallet.account().sign_message(encode_defunct(text=challenge.json()["message"]))
        linked = http.post("/api/v1/wallet/", json={"nonce": challenge.json()["nonce"], "address": wallet.address,
                                                    "signature": Web3.to_hex(signed.signature), "password": password})
    if linked.status_code != 201:
        raise PayoutError(f"linking {wallet.name}'s address was refused: {linked.text}")
    return linked.json()


def proof_get(*, server: str, token: str) -> dict | None:
    response = httpx.get(f"{server}/api/v1/payouts/proof/", headers={"Authorization": f"Token {token}"}, timeout=30)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()


def claim_run(*, cluster: Cluster, chain: LocalChain, state_dir: Path, token: str, wallet: Wallet) -> subprocess.Popen:
    """`idlegrid-agent claim` as the contributor runs it: their key from a file, their API token from the
    environment (the proof endpoint answers people, not devices). Returns the running process."""
    env = cluster.agent_env(state_dir)
    env["IDLEGRID_API_TOKEN"] = token
    return subprocess.Popen(
        [sys.executable, "-m", "worker_agent", "--state-dir", str(state_dir), "claim", "--rpc-url", chain.url,
         "--key-file", str(wallet.key_file), "--server", cluster.url],
        cwd=cluster_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def cluster_root() -> Path:
    from demo.cluster import ROOT

    return ROOT


def step(cluster: Cluster, name: str, *args: str, timeout: float = STEP_TIMEOUT) -> dict:
    """Run one marketplace-side step (below) with the cluster's settings; its JSON answer."""
    done = subprocess.run([sys.executable, "-m", "demo.payouts", name, *args], cwd=cluster_root(), env=cluster.env,
                          capture_output=True, text=True, timeout=timeout + 30)
    if done.returncode != 0:
        raise PayoutError(f"payout step {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def claims_collect(*, cluster: Cluster, chain: LocalChain, contributors: list[tuple[str, Path, str, Wallet]]) -> dict:
    """Every contributor with a leaf in the published epoch claims (concurrently: each its own key and
    nonce); the answer per owner, with what the chain then says."""
    running, paid = {}, {}
    for owner, state_dir, token, wallet in contributors:
        proof = proof_get(server=cluster.url, token=token)
        if proof is None:
            paid[owner] = {"address": wallet.address, "ledger_cumulative": "0", "claimed": False}
            continue
        running[owner] = (claim_run(cluster=cluster, chain=chain, state_dir=state_dir, token=token, wallet=wallet),
                          proof, wallet)
    for owner, (process, proof, wallet) in running.items():
        out, err = process.communicate(timeout=RECEIPT_TIMEOUT + 60)
        if process.returncode != 0:
            raise PayoutError(f"{owner}'s claim failed (exit {process.returncode}):\n{err[-2000:]}")
        answer = json.loads(out.strip().splitlines()[-1])
        paid[owner] = {"address": wallet.address, "ledger_cumulative": proof["cumulative"], "claimed": True,
                       "claim_tx_hash": answer["tx_hash"], "claim_amount": answer["amount"]}
    paid = {owner: paid[owner] for owner, *_ in contributors}  # in the demo's order, whoever finished first
    for row in paid.values():
        on_chain = int(chain.ledger.functions.claimed(row["address"]).call())
        received = int(chain.token.functions.balanceOf(row["address"]).call())
        row.update(claimed_on_chain=str(on_chain), tokens_received=str(received),
                   claimed_equals_settled=on_chain == received == int(row["ledger_cumulative"])
                   and (not row["claimed"] or int(row["claim_amount"]) == on_chain))
    return paid


def people_prepare(*, cluster: Cluster, chain: LocalChain, tokens: dict[str, str], folder: Path) -> dict[str, Wallet]:
    """A key per person, gas money for each, and each key linked as its account's payout address."""
    wallets = {name: Wallet.create(name, folder) for name in tokens}
    gas_money_give(chain, list(wallets.values()))
    for name, token in tokens.items():
        wallet_link(server=cluster.url, token=token, password=cluster.passwords[name], wallet=wallets[name])
    return wallets


def submitter_fund(*, cluster: Cluster, chain: LocalChain, wallet: Wallet, amount: int) -> dict:
    """A real deposit on chain, credited to the submitter's balance by the marketplace's deposit follower."""
    tx_hash = deposit_make(chain, wallet, amount)
    return step(cluster, "follow-deposit", "--tx", tx_hash)


def payouts_settle(*, cluster: Cluster, chain: LocalChain, contributors: list[tuple[str, Path, str, Wallet]],
                   deposit: dict, faulty_devices: list[str]) -> dict:
    """After the job: one epoch settled and final on chain, every contributor with earnings claims, then
    the chain is reconciled with the ledger. The figures for the demo's summary."""
    epoch = step(cluster, "settle")
    claims = claims_collect(cluster=cluster, chain=chain, contributors=contributors)
    report = step(cluster, "reconcile")
    summary = {
        "chain_id": chain.chain_id, "contract": chain.deployment.ledger, "token": chain.deployment.token,
        "deposit_tx_hash": deposit["tx_hash"], "deposited": deposit["amount"],
        "epoch": epoch["epoch"], "epoch_state": epoch["state"], "root": epoch["root"],
        "root_tx_hash": epoch["tx_hash"], "epoch_total": epoch["total"],
        "contributors": claims,
        # what the faulty devices' results earned at all, and how much of it a ban took back
        "faulty_earned": {name: report["earned"].get(name, "0") for name in faulty_devices},
        "faulty_forfeited": {name: report["forfeited"].get(name, "0") for name in faulty_devices},
        "ledger_equals_chain": report["ok"] and not report["ledger_check"],
        "reconciliation": {"differences": report["differences"] + report["ledger_check"], **report["figures"]},
    }
    summary["ok"] = (summary["ledger_equals_chain"] and epoch["state"] == "final"
                     and any(c["claimed"] for c in claims.values())
                     and all(c["claimed_equals_settled"] for c in claims.values()))
    return summary


# --- the marketplace's side: run with the cluster's settings (`python -m demo.payouts STEP`) ----------

def _follow_deposit(tx_hash: str, timeout: float) -> dict:
    from marketplace.chain.client import chain_client
    from marketplace.ledger.deposits import deposits_follow
    from marketplace.ledger.models import Deposit

    client = chain_client()
    deadline = time.monotonic() + timeout
    credited = 0
    while not Deposit.objects.filter(tx_hash=tx_hash.lower()).exists():
        if time.monotonic() > deadline:
            raise PayoutError(f"deposit {tx_hash} was not credited within {timeout:.0f}s")
        credited += deposits_follow(client=client)
        time.sleep(0.2)
    deposit = Deposit.objects.get(tx_hash=tx_hash.lower())
    return {"tx_hash": deposit.tx_hash, "block": deposit.block_number, "amount": str(deposit.amount),
            "depositor": deposit.depositor, "credited_now": credited}


def _held_wait(timeout: float) -> None:
    """Wait out the audit window of every held earning that will settle (valid result, device not banned)."""
    from django.db.models import Max
    from django.utils import timezone

    from marketplace.ledger.models import Earning
    from marketplace.workers.models import Device
    from marketplace.workunits.models import Result

    last = (Earning.objects.filter(state=Earning.State.HELD, result__state=Result.State.VALID)
            .exclude(device__state=Device.State.BANNED).aggregate(last=Max("settle_after"))["last"])
    if last is None:
        return
    wait = (last - timezone.now()).total_seconds()
    if wait > timeout:
        raise PayoutError(f"earnings settle only in {wait:.0f}s: set a shorter IDLEGRID_AUDIT_WINDOW_SECONDS")
    time.sleep(max(0.0, wait) + 0.1)


def _settle(timeout: float) -> dict:
    """Close the epoch (settling what the audit window released), publish its root once, and wait until it
    is final at the confirmation depth: the work of `ledger.settle_epoch` and `ledger.follow_deposits`."""
    from marketplace.chain.client import chain_client
    from marketplace.ledger.earnings import earnings_sync
    from marketplace.ledger.epochs import epoch_close, epoch_confirm, epoch_publish
    from marketplace.ledger.models import Epoch

    client = chain_client()
    deadline = time.monotonic() + timeout
    synced = earnings_sync()  # whatever an after-commit hook missed: credits, reversals, forfeits, releases
    _held_wait(timeout)
    epoch = epoch_close()
    if epoch is None:
        raise PayoutError("nothing settled: no linked contributor has earnings past the audit window")
    tx_hash = epoch_publish(epoch_id=epoch.pk, client=client)
    while not epoch_confirm(epoch_id=epoch.pk, client=client):
        if time.monotonic() > deadline:
            raise PayoutError(f"epoch {epoch.number} was not final within {timeout:.0f}s")
        epoch.refresh_from_db()
        if epoch.state in (Epoch.State.CLOSED, Epoch.State.SENDING) and client.tx_receipt(epoch.tx_hash) is not None:
            tx_hash = epoch_publish(epoch_id=epoch.pk, client=client)  # the receipt is in: mark it published
        time.sleep(0.2)
    epoch.refresh_from_db()
    return {"epoch": epoch.number, "root": epoch.root, "total": str(epoch.total), "leaves": epoch.leaf_count,
            "tx_hash": tx_hash or epoch.tx_hash, "block": epoch.block_number, "state": epoch.state, "synced": synced}


def _reconcile() -> dict:
    from marketplace.chain.client import chain_client
    from marketplace.ledger.models import Earning
    from marketplace.ledger.reconcile import chain_reconcile
    from marketplace.ledger.selectors import ledger_check

    report = chain_reconcile(client=chain_client())
    earned: dict[str, int] = {}
    forfeited: dict[str, int] = {}
    for name, net, state in Earning.objects.values_list("device__name", "net", "state"):
        earned[name] = earned.get(name, 0) + int(net)
        if state == Earning.State.FORFEITED:
            forfeited[name] = forfeited.get(name, 0) + int(net)
    return {"ok": report.ok, "differences": report.differences, "figures": report.figures,
            "chain_epoch": report.chain_epoch, "ledger_epoch": report.ledger_epoch,
            "forfeited": {name: str(total) for name, total in forfeited.items()},
            "earned": {name: str(total) for name, total in earned.items()}, "ledger_check": ledger_check()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.payouts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    follow = steps.add_parser("follow-deposit", help="follow Deposited events until this deposit is credited")
    follow.add_argument("--tx", required=True, help="the deposit's transaction hash")
    follow.add_argument("--timeout", type=float, default=STEP_TIMEOUT)
    settle = steps.add_parser("settle", help="close, publish and confirm one epoch")
    settle.add_argument("--timeout", type=float, default=STEP_TIMEOUT)
    steps.add_parser("reconcile", help="compare the contract with the ledger")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    import django

    django.setup()
    if args.step == "follow-deposit":
        answer = _follow_deposit(args.tx, args.timeout)
    elif args.step == "settle":
        answer = _settle(args.timeout)
    else:
        answer = _reconcile()
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
