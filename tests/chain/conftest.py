"""Chains for the contract tests: py-evm in process and a real anvil node.

`chain` is parametrised over both, so every contract test runs on each. Each test deploys its own
TestToken and PayoutLedger (a few milliseconds), so tests never see each other's state; one anvil
serves the whole session and is stopped by its PID at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from web3 import Web3

from marketplace.chain.anvil import Anvil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chainkit import Chain, Ledger, ledger_deploy, pyevm_chain_make  # noqa: E402


@pytest.fixture(scope="session")
def anvil_node() -> Iterator[Anvil]:
    with Anvil(accounts=8) as node:
        yield node


@pytest.fixture(params=["pyevm", "anvil"])
def chain(request) -> Chain:
    if request.param == "pyevm":
        return pyevm_chain_make()
    node: Anvil = request.getfixturevalue("anvil_node")
    return Chain(name="anvil", w3=Web3(Web3.HTTPProvider(node.url)), keys=[key for _, key in node.accounts])


@pytest.fixture
def ledger(chain: Chain) -> Ledger:
    return ledger_deploy(chain)
