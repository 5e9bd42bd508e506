import json
import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from eth_account import Account
from web3 import Web3
from web3.types import Nonce

from marketplace.chain.client import (
    ChainError,
    Deployment,
    chain_errors,
    contract_artifact,
    deploy,
    private_key_check,
    web3_connect,
)
from marketplace.chain.merkle import account_normalize


def _key_read(path: str | None) -> str:
    # Keys come from a file or the environment, never from argv (which `ps` shows to every user).
    if path:
        try:
            raw = Path(path).read_text()
        except OSError as exc:
            raise CommandError(f"cannot read the deployer key file {path}: {exc}") from None
    else:
        raw = os.environ.get("IDLEGRID_CHAIN_DEPLOYER_KEY", "")
        if not raw:
            raise CommandError("give the deployer key with --deployer-key-file or IDLEGRID_CHAIN_DEPLOYER_KEY")
    try:
        return private_key_check(raw)
    except ValueError as exc:
        raise CommandError(f"deployer key: {exc}") from None


def _mint_parse(value: str) -> tuple[str, int]:
    account, _, amount = value.partition("=")
    try:
        return account_normalize(account), int(amount)
    except ValueError:
        raise CommandError(f"--mint takes ADDRESS=AMOUNT (base units), got {value!r}") from None


class Command(BaseCommand):
    help = (
        "Deploy PayoutLedger (over an existing ERC-20 with --token, or over a new TestToken with --test-token "
        "on a local chain) and print the settings lines that point the marketplace at it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rpc-url", default=settings.IDLEGRID_CHAIN_RPC_URL,
                            help="JSON-RPC URL (default: IDLEGRID_CHAIN_RPC_URL)")
        parser.add_argument("--deployer-key-file", help="file holding the deployer's private key (becomes admin "
                            "and pauser); default: the IDLEGRID_CHAIN_DEPLOYER_KEY environment variable")
        parser.add_argument("--operator", help="address allowed to publish roots (default: the address of "
                            "IDLEGRID_CHAIN_OPERATOR_KEY)")
        token = parser.add_mutually_exclusive_group(required=True)
        token.add_argument("--token", help="address of the ERC-20 the ledger pays in")
        token.add_argument("--test-token", action="store_true", help="deploy a new TestToken (local chains only)")
        parser.add_argument("--mint", action="append", default=[], metavar="ADDRESS=AMOUNT",
                            help="with --test-token: mint AMOUNT base units to ADDRESS (repeatable)")
        parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object instead of settings lines")

    def handle(self, *args: Any, rpc_url: str | None, deployer_key_file: str | None, operator: str | None, token: str | None,
               test_token: bool, mint: list[str], as_json: bool, **options: Any) -> None:
        if not rpc_url:
            raise CommandError("give --rpc-url or set IDLEGRID_CHAIN_RPC_URL")
        if mint and not test_token:
            raise CommandError("--mint needs --test-token: only the test token can be minted")
        mints = [_mint_parse(value) for value in mint]
        deployer_key = _key_read(deployer_key_file)
        operator = self._operator(operator)
        try:
            w3 = web3_connect(rpc_url)
            deployment = deploy(w3=w3, deployer_key=deployer_key, operator=operator,
                                token=None if test_token else token)
            with chain_errors("minting"):
                chain_id = int(w3.eth.chain_id)
                self._mint(w3, deployer_key, deployment.token, mints)
        except (ChainError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        self._print(as_json=as_json, rpc_url=rpc_url, chain_id=chain_id, deployment=deployment, operator=operator,
                    admin=Account.from_key(deployer_key).address, test_token=test_token)

    def _operator(self, operator: str | None) -> str:
        if operator:
            try:
                return account_normalize(operator)
            except ValueError as exc:
                raise CommandError(f"--operator: {exc}") from None
        if settings.IDLEGRID_CHAIN_OPERATOR_KEY:
            address: str = Account.from_key(private_key_check(settings.IDLEGRID_CHAIN_OPERATOR_KEY)).address
            return address
        raise CommandError("give --operator or set IDLEGRID_CHAIN_OPERATOR_KEY(_FILE)")

    def _mint(self, w3: Web3, deployer_key: str, token: str, mints: list[tuple[str, int]]) -> None:
        deployer = Account.from_key(deployer_key)
        contract = w3.eth.contract(address=Web3.to_checksum_address(token), abi=contract_artifact("TestToken")["abi"])
        nonce = w3.eth.get_transaction_count(deployer.address, "pending")
        for account, amount in mints:
            transaction = contract.functions.mint(account, amount).build_transaction(
                {"from": deployer.address, "nonce": nonce, "chainId": w3.eth.chain_id})
            tx_hash = w3.eth.send_raw_transaction(deployer.sign_transaction(transaction).raw_transaction)
            if w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)["status"] != 1:
                raise ChainError(f"minting {amount} to {account} failed")
            nonce = Nonce(nonce + 1)

    def _print(self, *, as_json: bool, rpc_url: str, chain_id: int, deployment: Deployment, operator: str, admin: str,
               test_token: bool) -> None:
        figures = {"chain_id": chain_id, "ledger": deployment.ledger, "token": deployment.token,
                   "block": deployment.block, "admin": admin, "operator": operator, "test_token": test_token}
        if as_json:
            self.stdout.write(json.dumps(figures))
            return
        self.stdout.write(f"# PayoutLedger deployed on chain {chain_id} at block {deployment.block}; "
                          f"token {deployment.token}{' (TestToken)' if test_token else ''}; admin {admin}")
        self.stdout.write(f"IDLEGRID_CHAIN_RPC_URL={rpc_url}")
        self.stdout.write(f"IDLEGRID_CHAIN_CONTRACT={deployment.ledger}")
        self.stdout.write(f"IDLEGRID_CHAIN_START_BLOCK={deployment.block}")
        self.stdout.write(f"# and IDLEGRID_CHAIN_OPERATOR_KEY_FILE=<file with the key of {operator}>")
