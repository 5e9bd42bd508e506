"""The ChainClient boundary: built from settings, every chain failure raised as ChainError, inputs checked
before any request, and deployment by the management command."""

from __future__ import annotations

import json
import socket
from io import StringIO

import pytest
from chainkit import Chain, Ledger, ledger_deploy
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from eth_account import Account
from web3 import Web3

from marketplace.chain.anvil import Anvil
from marketplace.chain.client import (
    ChainClient,
    ChainError,
    Web3ChainClient,
    chain_client,
    contract_artifact,
    revert_decode,
    web3_connect,
)
from marketplace.chain.merkle import tree_build

KEY = "0x" + "42" * 32


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_chain_client_names_every_missing_setting(settings):
    settings.IDLEGRID_CHAIN_RPC_URL = None
    settings.IDLEGRID_CHAIN_CONTRACT = None
    settings.IDLEGRID_CHAIN_OPERATOR_KEY = None
    with pytest.raises(ImproperlyConfigured, match="IDLEGRID_CHAIN_RPC_URL, IDLEGRID_CHAIN_CONTRACT, IDLEGRID_CHAIN_OPERATOR_KEY"):
        chain_client()


def test_chain_client_refuses_a_bad_contract_address_without_echoing_the_key(settings):
    settings.IDLEGRID_CHAIN_RPC_URL = "http://127.0.0.1:1"
    settings.IDLEGRID_CHAIN_CONTRACT = "0x1234"
    settings.IDLEGRID_CHAIN_OPERATOR_KEY = KEY
    with pytest.raises(ImproperlyConfigured) as caught:
        chain_client()
    assert "0x1234" in str(caught.value) and KEY[2:] not in str(caught.value)


def test_chain_client_from_settings_reads_the_deployed_ledger(settings, anvil_node: Anvil):
    ledger = ledger_deploy(Chain(name="anvil", w3=Web3(Web3.HTTPProvider(anvil_node.url)),
                                 keys=[k for _, k in anvil_node.accounts]))
    settings.IDLEGRID_CHAIN_RPC_URL = anvil_node.url
    settings.IDLEGRID_CHAIN_CONTRACT = ledger.contract.address
    settings.IDLEGRID_CHAIN_OPERATOR_KEY = anvil_node.accounts[1][1]

    client = chain_client()

    assert isinstance(client, ChainClient)
    assert client.chain_id == 31337
    assert client.published_epoch() == 0 and client.published_total() == 0
    assert KEY[2:] not in repr(client) and anvil_node.accounts[1][1][2:] not in repr(client)


def test_an_unreachable_node_is_a_chain_error():
    client = Web3ChainClient(web3_connect(_closed_port_url(), timeout=2), "0x" + "11" * 20, KEY)
    for read in (client.block_number, client.published_epoch, lambda: client.operator_nonce(pending=True),
                 lambda: client.deposits(from_block=0, to_block=1), lambda: client.tx_receipt("0x" + "ab" * 32)):
        with pytest.raises(ChainError):
            read()


def test_bad_inputs_are_refused_before_any_request():
    client = Web3ChainClient(web3_connect(_closed_port_url()), "0x" + "11" * 20, KEY)
    good = {"epoch": 1, "root": b"\1" * 32, "total": 5, "nonce": 0}
    for bad in ({"epoch": 0}, {"epoch": True}, {"root": b"\1" * 31}, {"root": b"\0" * 32}, {"total": -1},
                {"total": 2**192}, {"nonce": -1}, {"gas_price_wei": 0}):
        with pytest.raises(ValueError):
            client.publish_root_send(**{**good, **bad})
    with pytest.raises(ValueError):
        client.deposits(from_block=5, to_block=4)
    with pytest.raises(ValueError):
        client.claimed("not an address")
    with pytest.raises(ValueError, match="64 hex digits"):
        Web3ChainClient(web3_connect(_closed_port_url()), "0x" + "11" * 20, "0x1234")


def test_a_root_the_contract_refuses_is_mined_with_a_failed_receipt(ledger: Ledger):
    tree = tree_build(leaves=[(ledger.contributors[0], 5)])
    nonce = ledger.client.operator_nonce(pending=True)

    tx_hash = ledger.client.publish_root_send(epoch=2, root=tree.root, total=5, nonce=nonce)
    ledger.w3.eth.wait_for_transaction_receipt(tx_hash)

    receipt = ledger.client.tx_receipt(tx_hash)
    assert receipt is not None and receipt.status == 0
    assert ledger.client.published_epoch() == 0


def test_unknown_revert_data_decodes_to_nothing():
    assert revert_decode(bytes.fromhex("deadbeef")) is None
    assert revert_decode(b"") is None


# --- chain_deploy -----------------------------------------------------------------------------------

def test_chain_deploy_deploys_a_test_token_and_the_ledger_and_prints_the_settings(anvil_node: Anvil, monkeypatch, tmp_path):
    (_, deployer_key), (operator, _), (holder, _) = anvil_node.accounts[5:8]
    key_file = tmp_path / "deployer.key"
    key_file.write_text(deployer_key + "\n")
    out = StringIO()

    call_command("chain_deploy", "--rpc-url", anvil_node.url, "--deployer-key-file", str(key_file),
                 "--operator", operator, "--test-token", "--mint", f"{holder}=1000", "--json", stdout=out)

    figures = json.loads(out.getvalue())
    w3 = web3_connect(anvil_node.url)
    ledger = w3.eth.contract(address=figures["ledger"], abi=contract_artifact("PayoutLedger")["abi"])
    token = w3.eth.contract(address=figures["token"], abi=contract_artifact("TestToken")["abi"])
    assert ledger.functions.token().call() == figures["token"]
    assert ledger.functions.hasRole(ledger.functions.OPERATOR_ROLE().call(), operator).call()
    assert figures["admin"] == Account.from_key(deployer_key).address
    assert token.functions.balanceOf(holder).call() >= 1000
    assert deployer_key[2:] not in out.getvalue()

    monkeypatch.setenv("IDLEGRID_CHAIN_DEPLOYER_KEY", deployer_key)
    lines = StringIO()
    call_command("chain_deploy", "--rpc-url", anvil_node.url, "--operator", operator, "--token", figures["token"],
                 stdout=lines)
    assert "IDLEGRID_CHAIN_RPC_URL=" + anvil_node.url in lines.getvalue()
    assert "IDLEGRID_CHAIN_CONTRACT=0x" in lines.getvalue()
    assert "IDLEGRID_CHAIN_START_BLOCK=" in lines.getvalue()


def test_chain_deploy_needs_a_token_choice_and_a_key(anvil_node: Anvil, monkeypatch):
    monkeypatch.delenv("IDLEGRID_CHAIN_DEPLOYER_KEY", raising=False)
    with pytest.raises(CommandError):
        call_command("chain_deploy", "--rpc-url", anvil_node.url, "--operator", anvil_node.accounts[1][0])
    with pytest.raises(CommandError, match="deployer key"):
        call_command("chain_deploy", "--rpc-url", anvil_node.url, "--operator", anvil_node.accounts[1][0],
                     "--test-token")
    monkeypatch.setenv("IDLEGRID_CHAIN_DEPLOYER_KEY", KEY)
    with pytest.raises(CommandError, match="failed"):
        call_command("chain_deploy", "--rpc-url", _closed_port_url(), "--operator", anvil_node.accounts[1][0],
                     "--test-token")
    with pytest.raises(CommandError, match="--mint needs --test-token"):
        call_command("chain_deploy", "--rpc-url", anvil_node.url, "--token", anvil_node.accounts[1][0],
                     "--mint", f"{anvil_node.accounts[1][0]}=1")
