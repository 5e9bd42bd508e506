"""Helpers for the contract tests: a chain (py-evm or anvil), a deployed ledger with personas, reverts.

Personas: admin (deploys, pauses), operator (publishes roots), submitter (holds tokens, deposits),
contributors (are paid), relayer (sends other people's claims).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from web3 import EthereumTesterProvider, Web3

from marketplace.chain.client import ChainRevert, Web3ChainClient, contract_artifact, deploy, revert_from_exception
from marketplace.chain.merkle import MerkleTree

TOKENS = 10**18


@dataclass
class Chain:
    name: str
    w3: Web3
    keys: list[str]

    @property
    def addresses(self) -> list[str]:
        return [Account.from_key(k).address for k in self.keys]


@dataclass
class Ledger:
    chain: Chain
    client: Web3ChainClient
    contract: Any
    token: Any
    admin: str
    operator: str
    submitter: str
    relayer: str
    contributors: list[str]

    @property
    def w3(self) -> Web3:
        return self.chain.w3

    def send(self, fn: Any, sender: str) -> dict[str, Any]:
        """Sends a contract call as `sender` (an unlocked dev account) and returns its mined receipt."""
        tx_hash = fn.transact({"from": sender})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash)
        assert receipt["status"] == 1
        return receipt

    def publish(self, epoch: int, tree: MerkleTree) -> dict[str, Any]:
        return self.send(self.contract.functions.publishRoot(epoch, tree.root, tree.total), self.operator)

    def claim(self, tree: MerkleTree, account: str, sender: str | None = None) -> dict[str, Any]:
        amount = dict(tree.leaves)[account]
        return self.send(self.contract.functions.claim(account, amount, tree.proof(account)), sender or account)

    def fund(self, amount: int) -> None:
        """The submitter mints `amount` and deposits it into the ledger."""
        self.send(self.token.functions.mint(self.submitter, amount), self.admin)
        self.send(self.token.functions.approve(self.contract.address, amount), self.submitter)
        self.send(self.contract.functions.deposit(amount), self.submitter)

    def balance(self, account: str) -> int:
        return self.token.functions.balanceOf(account).call()


def reverted(action: Callable[[], Any]) -> ChainRevert:
    """Runs `action`, which must revert, and returns the decoded revert (the same on anvil and py-evm)."""
    with pytest.raises(Exception) as caught:  # noqa: B017 - the two chains raise different types; decoded below
        action()
    revert = revert_from_exception(caught.value)
    assert revert is not None, f"not a revert: {caught.value!r}"
    return revert


def pyevm_chain_make() -> Chain:
    provider = EthereumTesterProvider()
    keys = [key.to_hex() for key in provider.ethereum_tester.backend.account_keys[:8]]
    return Chain(name="pyevm", w3=Web3(provider), keys=keys)


def ledger_deploy(chain: Chain) -> Ledger:
    admin, operator, submitter, relayer, *contributors = chain.addresses
    deployment = deploy(w3=chain.w3, deployer_key=chain.keys[0], operator=operator, token=None)
    contract = chain.w3.eth.contract(address=deployment.ledger, abi=contract_artifact("PayoutLedger")["abi"])
    token = chain.w3.eth.contract(address=deployment.token, abi=contract_artifact("TestToken")["abi"])
    client = Web3ChainClient(chain.w3, deployment.ledger, chain.keys[1])
    return Ledger(chain=chain, client=client, contract=contract, token=token, admin=admin, operator=operator,
                  submitter=submitter, relayer=relayer, contributors=contributors)
