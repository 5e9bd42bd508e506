"""The Anvil fixture: a real node on a free loopback port, with funded keys, stopped by its PID."""

from __future__ import annotations

import os

import pytest
from eth_account import Account
from web3 import Web3

from marketplace.chain.anvil import ANVIL_CHAIN_ID, Anvil, AnvilError


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_anvil_serves_funded_accounts_on_loopback_and_is_gone_after_exit():
    with Anvil(accounts=3) as node:
        pid = node.pid
        assert node.url.startswith("http://127.0.0.1:")
        w3 = Web3(Web3.HTTPProvider(node.url))
        assert w3.eth.chain_id == ANVIL_CHAIN_ID
        assert len(node.accounts) == 3
        for address, key in node.accounts:
            assert Account.from_key(key).address == address
            assert w3.eth.get_balance(address) > 0
    assert pid is not None and not _running(pid)
    assert node.url == ""


def test_two_anvils_run_side_by_side_on_different_ports():
    with Anvil(accounts=1) as first, Anvil(accounts=1) as second:
        assert first.url != second.url
        assert Web3(Web3.HTTPProvider(second.url)).eth.block_number == 0


def test_a_missing_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("IDLEGRID_ANVIL_BIN", str(tmp_path / "anvil"))
    with pytest.raises(AnvilError, match="bin/bootstrap"):
        Anvil().start()
