"""`idlegrid-agent claim` against a real anvil chain and a stub of the marketplace's proof endpoint: the
contributor's tokens arrive, the key never shows, and every refusal is said in words."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from eth_utils import keccak
from web3 import Web3

from marketplace.chain.anvil import Anvil
from marketplace.chain.client import contract_artifact, deploy
from marketplace.chain.merkle import MerkleTree, tree_build
from worker_agent import wallet
from worker_agent.state import DeviceState, StateDir

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ProofServer:
    """Answers GET /api/v1/payouts/proof/ like the marketplace, to one Authorization header only."""

    authorization: str
    answer: dict[str, Any] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)


@contextmanager
def proof_server(stub: ProofServer) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            stub.seen.append(self.path)
            if self.headers.get("Authorization") != stub.authorization:
                self._send(401, {"error": {"code": "not_authenticated", "message": "bad credentials"}})
            elif not self.path.startswith(wallet.PROOF_PATH):
                self._send(404, {"error": {"code": "not_found", "message": "no route"}})
            else:
                self._send(200, stub.answer)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Payouts:
    node: Anvil
    w3: Web3
    ledger: Any
    token: Any
    contributor: str
    contributor_key: str
    operator: str
    epoch: int = 0

    def publish(self, earnings: dict[str, int]) -> MerkleTree:
        tree = tree_build(leaves=earnings.items())
        self.epoch += 1
        tx = self.ledger.functions.publishRoot(self.epoch, tree.root, tree.total).transact({"from": self.operator})
        self.w3.eth.wait_for_transaction_receipt(tx)
        return tree

    def answer(self, tree: MerkleTree, account: str | None = None, **overrides: Any) -> dict[str, Any]:
        account = account or self.contributor
        return {"epoch": self.epoch, "account": account, "cumulative": str(dict(tree.leaves)[account]),
                "proof": ["0x" + p.hex() for p in tree.proof(account)], "root": "0x" + tree.root.hex(),
                "state": "published", "contract": self.ledger.address, "chain_id": 31337, **overrides}

    def balance(self, account: str) -> int:
        return self.token.functions.balanceOf(account).call()


@pytest.fixture(scope="module")
def anvil() -> Iterator[Anvil]:
    with Anvil(accounts=6) as node:
        yield node


@pytest.fixture
def payouts(anvil: Anvil) -> Payouts:
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    (admin, admin_key), (operator, _), (submitter, _), *_ = anvil.accounts
    deployment = deploy(w3=w3, deployer_key=admin_key, operator=operator, token=None)
    ledger = w3.eth.contract(address=deployment.ledger, abi=contract_artifact("PayoutLedger")["abi"])
    token = w3.eth.contract(address=deployment.token, abi=contract_artifact("TestToken")["abi"])
    for call, sender in [(token.functions.mint(submitter, 10**6), admin),
                         (token.functions.approve(ledger.address, 10**6), submitter),
                         (ledger.functions.deposit(10**6), submitter)]:
        w3.eth.wait_for_transaction_receipt(call.transact({"from": sender}))
    # A fresh contributor per test, funded for gas only, so balances start at zero.
    contributor_key = "0x" + os.urandom(32).hex()
    contributor = w3.eth.account.from_key(contributor_key).address
    w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction({"from": admin, "to": contributor, "value": 10**18}))
    return Payouts(node=anvil, w3=w3, ledger=ledger, token=token, contributor=contributor,
                   contributor_key=contributor_key, operator=operator)


@pytest.fixture
def key_file(tmp_path: Path, payouts: Payouts) -> Path:
    path = tmp_path / "wallet.key"
    path.write_text(payouts.contributor_key + "\n")
    path.chmod(0o600)
    return path


def run_claim(state: StateDir, device: DeviceState, server: str, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    StateDir.save_device(state, replace(device, server=server))
    command = [sys.executable, "-m", "worker_agent", "claim", "--state-dir", str(state.root), *args]
    environment = {k: v for k, v in os.environ.items() if k not in {wallet.WALLET_KEY_ENV, wallet.API_TOKEN_ENV}}
    environment |= {"PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=120)


def device_stub(device: DeviceState) -> ProofServer:
    return ProofServer(authorization=wallet.device_authorization(device.device_id, device.device_secret))


def test_a_contributor_claims_its_tokens_and_the_key_never_shows(state, enrolled, payouts, key_file):
    tree = payouts.publish({payouts.contributor: 300, "0x" + "11" * 20: 700})
    stub = device_stub(enrolled)
    stub.answer = payouts.answer(tree)

    with proof_server(stub) as url:
        done = run_claim(state, enrolled, url, "--rpc-url", payouts.node.url, "--key-file", str(key_file))

    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["amount"] == "300" and printed["account"] == payouts.contributor
    receipt = payouts.w3.eth.get_transaction_receipt(printed["tx_hash"])
    assert receipt["status"] == 1 and receipt["from"] == payouts.contributor
    assert payouts.balance(payouts.contributor) == 300
    assert stub.seen == [wallet.PROOF_PATH]
    assert payouts.contributor_key[2:] not in done.stdout + done.stderr


def test_a_second_claim_sends_nothing_and_a_later_epoch_pays_only_the_difference(state, enrolled, payouts, key_file):
    stub = device_stub(enrolled)
    args = ("--rpc-url", payouts.node.url)
    env = {wallet.WALLET_KEY_ENV: payouts.contributor_key}
    first = payouts.publish({payouts.contributor: 300, "0x" + "11" * 20: 700})
    stub.answer = payouts.answer(first)
    with proof_server(stub) as url:
        assert run_claim(state, enrolled, url, *args, env=env).returncode == 0
        again = run_claim(state, enrolled, url, *args, env=env)
        stub.answer = payouts.answer(payouts.publish({payouts.contributor: 450, "0x" + "11" * 20: 700}))
        later = run_claim(state, enrolled, url, *args, env=env)

    assert json.loads(again.stdout)["tx_hash"] is None and json.loads(again.stdout)["amount"] == "0"
    assert json.loads(later.stdout)["amount"] == "150"
    assert payouts.balance(payouts.contributor) == 450


def test_a_proof_the_contract_refuses_is_reported_in_words_and_pays_nothing(state, enrolled, payouts, key_file):
    other = "0x" + "22" * 20
    tree = payouts.publish({payouts.contributor: 300, other: 700})
    stub = device_stub(enrolled)
    stub.answer = payouts.answer(tree, cumulative="301")

    with proof_server(stub) as url:
        done = run_claim(state, enrolled, url, "--rpc-url", payouts.node.url, "--key-file", str(key_file))

    assert done.returncode == 1
    assert "InvalidProof" in done.stderr
    assert payouts.balance(payouts.contributor) == 0


def test_a_proof_for_another_chain_is_refused_before_anything_is_sent(state, enrolled, payouts, key_file):
    tree = payouts.publish({payouts.contributor: 300})
    stub = device_stub(enrolled)
    stub.answer = payouts.answer(tree, chain_id=1)
    nonce = payouts.w3.eth.get_transaction_count(payouts.contributor)

    with proof_server(stub) as url:
        done = run_claim(state, enrolled, url, "--rpc-url", payouts.node.url, "--key-file", str(key_file))

    assert done.returncode == 1 and "chain 31337" in done.stderr and "chain 1" in done.stderr
    assert payouts.w3.eth.get_transaction_count(payouts.contributor) == nonce


def test_with_an_api_token_the_person_asks_for_the_proof_instead_of_the_device(state, enrolled, payouts, key_file):
    tree = payouts.publish({payouts.contributor: 5})
    stub = ProofServer(authorization=wallet.token_authorization("person-token"))
    stub.answer = payouts.answer(tree)

    with proof_server(stub) as url:
        done = run_claim(state, enrolled, url, "--rpc-url", payouts.node.url, "--key-file", str(key_file),
                         env={wallet.API_TOKEN_ENV: "person-token"})

    assert done.returncode == 0, done.stderr
    assert payouts.balance(payouts.contributor) == 5


def test_a_refused_device_is_told_it_may_use_the_persons_api_token(state, enrolled, payouts, key_file):
    stub = ProofServer(authorization=wallet.token_authorization("person-token"))
    with proof_server(stub) as url:
        done = run_claim(state, enrolled, url, "--rpc-url", payouts.node.url, "--key-file", str(key_file))
    assert done.returncode == 1 and "HTTP 401" in done.stderr and wallet.API_TOKEN_ENV in done.stderr


def test_without_a_key_nothing_is_asked(state, enrolled, payouts):
    stub = device_stub(enrolled)
    with proof_server(stub) as url:
        done = run_claim(state, enrolled, url, "--rpc-url", payouts.node.url)
    assert done.returncode == 1 and wallet.WALLET_KEY_ENV in done.stderr
    assert stub.seen == []


# --- the pieces, in process -------------------------------------------------------------------------

def test_a_key_that_is_not_one_is_refused_without_repeating_it(tmp_path):
    secret_looking = "not-a-key-but-secret-" + "z" * 30
    path = tmp_path / "k"
    path.write_text(secret_looking)
    for attempt in (lambda: wallet.wallet_key_load(key_file=path),
                    lambda: wallet.wallet_key_load(key_file=None, environ={wallet.WALLET_KEY_ENV: secret_looking})):
        with pytest.raises(wallet.WalletError) as caught:
            attempt()
        assert secret_looking not in str(caught.value)
    assert wallet.wallet_key_load(key_file=None, environ={wallet.WALLET_KEY_ENV: "ab" * 32}) == "0x" + "ab" * 32


@pytest.mark.parametrize("change", [
    {"epoch": 0}, {"epoch": "1"}, {"account": "0x12"}, {"cumulative": 5}, {"cumulative": "-5"},
    {"cumulative": str(2**256)}, {"proof": ["0x12"]}, {"proof": "0x" + "00" * 32}, {"contract": ""},
    {"chain_id": 0},
])
def test_a_malformed_proof_answer_is_refused(change):
    good = {"epoch": 1, "account": "0x" + "11" * 20, "cumulative": "5", "proof": ["0x" + "ab" * 32],
            "contract": "0x" + "22" * 20, "chain_id": 31337}
    assert wallet.proof_parse(good).cumulative == 5
    with pytest.raises(wallet.WalletError):
        wallet.proof_parse({**good, **change})


def test_the_error_selectors_the_agent_knows_are_those_of_the_contract():
    abi_errors = {entry["name"]: entry for entry in contract_artifact("PayoutLedger")["abi"] if entry["type"] == "error"}
    for selector, reason in wallet.CLAIM_ERRORS.items():
        name = reason.split(":")[0]
        signature = f"{name}({','.join(i['type'] for i in abi_errors[name]['inputs'])})" if name in abi_errors else f"{name}()"
        assert keccak(text=signature)[:4].hex() == selector, name


def test_the_agents_claim_abi_matches_the_compiled_contract():
    compiled = {(e["type"], e.get("name")): e for e in contract_artifact("PayoutLedger")["abi"]}
    for entry in wallet.LEDGER_ABI:
        assert [i["type"] for i in entry["inputs"]] == [i["type"] for i in compiled[(entry["type"], entry["name"])]["inputs"]]
