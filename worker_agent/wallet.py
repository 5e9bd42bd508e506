"""`idlegrid-agent claim`: fetch the owner's latest payout proof from the marketplace and send the claim
transaction to the PayoutLedger contract, signed with the contributor's own key.

The key comes from a file or the IDLEGRID_WALLET_KEY environment variable, never from the command line
(which `ps` shows to everyone), and is never logged or echoed, not even in an error. web3 is imported
only when a claim is sent: the base agent installs and runs without it (`pip install 'idlegrid[claim]'`).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from worker_agent.client import answer_json
from worker_agent.protocol import DEVICE_AUTH_SCHEME

log = logging.getLogger("worker_agent.wallet")

WALLET_KEY_ENV = "IDLEGRID_WALLET_KEY"
API_TOKEN_ENV = "IDLEGRID_API_TOKEN"
PROOF_PATH = "/api/v1/payouts/proof/"
RECEIPT_TIMEOUT_SECONDS = 180
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_WORD = re.compile(r"0x[0-9a-fA-F]{64}")
_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")

# The part of PayoutLedger's ABI a claim needs; the agent never imports the marketplace's artifacts.
LEDGER_ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "claim", "stateMutability": "nonpayable", "outputs": [],
     "inputs": [{"name": "account", "type": "address"}, {"name": "cumulativeAmount", "type": "uint256"},
                {"name": "proof", "type": "bytes32[]"}]},
    {"type": "function", "name": "claimed", "stateMutability": "view", "outputs": [{"name": "", "type": "uint256"}],
     "inputs": [{"name": "account", "type": "address"}]},
    {"type": "event", "name": "Claimed", "anonymous": False,
     "inputs": [{"name": "account", "type": "address", "indexed": True},
                {"name": "amount", "type": "uint256", "indexed": False},
                {"name": "cumulative", "type": "uint256", "indexed": False}]},
]
# Selectors of the reverts a claim can meet, to say why in words.
CLAIM_ERRORS = {
    "09bde339": "InvalidProof: the proof does not match the contract's latest root (a newer epoch may be out: fetch again)",
    "dd910b7b": "NoRootPublished: the contract has no root yet",
    "0cfa2bb0": "NothingToClaim: this amount was already claimed",
    "d93c0665": "EnforcedPause: the payout contract is paused",
}


class WalletError(Exception):
    """A claim could not be made; the message says why and never contains the key."""


@dataclass(frozen=True)
class PayoutProof:
    epoch: int
    account: str
    cumulative: int
    proof: list[bytes]
    contract: str
    chain_id: int | None


@dataclass(frozen=True)
class ClaimOutcome:
    tx_hash: str | None  # None when there was nothing to claim and nothing was sent
    account: str
    amount: int
    cumulative: int
    epoch: int
    gas_used: int = 0


# --- the key ----------------------------------------------------------------------------------------

def wallet_key_load(*, key_file: Path | None, environ: Mapping[str, str] | None = None) -> str:
    """The contributor's private key (0x + 64 hex) from `key_file`, else from IDLEGRID_WALLET_KEY."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    if key_file is not None:
        try:
            mode = key_file.stat().st_mode
            raw = key_file.read_text()
        except OSError as exc:
            raise WalletError(f"cannot read the key file {key_file}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the key file %s can be read by other users; chmod 600 it", key_file)
        where = f"the key file {key_file}"
    elif env.get(WALLET_KEY_ENV):
        raw, where = env[WALLET_KEY_ENV], f"${WALLET_KEY_ENV}"
    else:
        raise WalletError(f"no wallet key: give --key-file or set {WALLET_KEY_ENV}")
    key = raw.strip()
    if not _KEY.fullmatch(key):
        raise WalletError(f"{where} does not hold a private key (64 hex digits, optionally 0x-prefixed)")
    return key if key.startswith("0x") else "0x" + key


# --- signing a message (linking a payout address) -------------------------------------------------

MAX_MESSAGE_BYTES = 64 * 1024


@dataclass(frozen=True)
class SignedMessage:
    address: str
    signature: str  # 0x + 130 hex digits: r, s, v (personal_sign)


def message_text(raw: bytes) -> str:
    """The message to sign from a file or stdin: UTF-8, at most MAX_MESSAGE_BYTES, one trailing line break
    dropped (shells and editors add one; the marketplace's challenges end without)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise WalletError(f"the message is longer than {MAX_MESSAGE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WalletError("the message is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise WalletError("the message is empty")
    return text


def message_sign(*, message: str, key: str) -> SignedMessage:
    """EIP-191 personal_sign of `message` with `key`: what a browser wallet makes of the same text."""
    try:
        from eth_account import Account
        from eth_account.messages import encode_defunct
    except ImportError:
        raise WalletError("signing needs eth-account: pip install 'idlegrid[claim]'") from None
    signed = Account.sign_message(encode_defunct(text=message), private_key=key)
    return SignedMessage(address=str(Account.from_key(key).address), signature="0x" + bytes(signed.signature).hex())


# --- the proof --------------------------------------------------------------------------------------

def proof_parse(data: Any) -> PayoutProof:
    """Checks the marketplace's answer field by field before anything is signed."""
    if not isinstance(data, dict):
        raise WalletError("the marketplace's proof is not a JSON object")
    try:
        epoch, account, cumulative = data["epoch"], data["account"], data["cumulative"]
        proof, contract, chain_id = data["proof"], data["contract"], data.get("chain_id")
    except KeyError as exc:
        raise WalletError(f"the marketplace's proof lacks {exc.args[0]!r}") from None
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise WalletError(f"bad epoch in the proof: {epoch!r}")
    if not isinstance(account, str) or not _ADDRESS.fullmatch(account):
        raise WalletError(f"bad account in the proof: {account!r}")
    if not isinstance(contract, str) or not _ADDRESS.fullmatch(contract):
        raise WalletError("the marketplace named no payout contract (is its chain configured?)")
    if not isinstance(cumulative, str) or not cumulative.isdigit() or int(cumulative) >= 2**256:
        raise WalletError(f"bad cumulative amount in the proof: {cumulative!r}")
    if not isinstance(proof, list) or len(proof) > 64 or not all(isinstance(p, str) and _WORD.fullmatch(p) for p in proof):
        raise WalletError("bad proof: a list of at most 64 hashes, each 0x and 64 hex digits")
    if chain_id is not None and (isinstance(chain_id, bool) or not isinstance(chain_id, int) or chain_id < 1):
        raise WalletError(f"bad chain id in the proof: {chain_id!r}")
    return PayoutProof(epoch=epoch, account=account, cumulative=int(cumulative),
                       proof=[bytes.fromhex(p[2:]) for p in proof], contract=contract, chain_id=chain_id)


def proof_fetch(*, server: str, authorization: str, address: str | None = None, timeout: float = 30.0,
                transport: httpx.BaseTransport | None = None) -> PayoutProof:
    """GET /api/v1/payouts/proof/ with the given Authorization header (the device's or the person's)."""
    params = {"address": address} if address else {}
    try:
        with httpx.Client(base_url=server, timeout=timeout, transport=transport,
                          headers={"Authorization": authorization}) as http:
            response = http.get(PROOF_PATH, params=params)
    except httpx.HTTPError as exc:
        raise WalletError(f"GET {PROOF_PATH} on {server}: {exc}") from None
    if response.status_code in (401, 403) and authorization.startswith(DEVICE_AUTH_SCHEME):
        raise WalletError(f"GET {PROOF_PATH}: HTTP {response.status_code}: {_error_message(response)} "
                          f"(if the marketplace wants your own API token for this, set {API_TOKEN_ENV})")
    if response.status_code != 200:
        raise WalletError(f"GET {PROOF_PATH}: HTTP {response.status_code}: {_error_message(response)}")
    try:
        # Bounded like every server answer (worker_agent/safejson.py): this process goes on to import web3,
        # whose py_ecc raises the recursion limit to 100000.
        return proof_parse(answer_json(response.content))
    except ValueError as exc:
        raise WalletError(f"GET {PROOF_PATH}: the answer is not usable JSON: {exc}") from None


def _error_message(response: httpx.Response) -> str:
    try:
        body = answer_json(response.content)
        return str(body.get("error", {}).get("message") or body.get("detail") or body)[:500]
    except (ValueError, AttributeError):
        return response.text[:200]


def device_authorization(device_id: int, secret: str) -> str:
    return f"{DEVICE_AUTH_SCHEME} {device_id}:{secret}"


def token_authorization(token: str) -> str:
    return f"Token {token}"


# --- the claim --------------------------------------------------------------------------------------

def _web3() -> Any:
    try:
        import web3
    except ImportError:
        raise WalletError("claiming needs web3: pip install 'idlegrid[claim]'") from None
    return web3


def _revert_reason(exc: Exception) -> str | None:
    text = f"{getattr(exc, 'data', '') or ''} {exc}"
    for selector, reason in CLAIM_ERRORS.items():
        if selector in text or repr(bytes.fromhex(selector))[2:-1] in text:
            return reason
    return None


def claim_send(*, rpc_url: str, payout: PayoutProof, key: str,
               receipt_timeout: float = RECEIPT_TIMEOUT_SECONDS) -> ClaimOutcome:
    """Sends claim(account, cumulative, proof) signed by `key` and waits for its receipt. Nothing is sent
    when the account already claimed this much (the contract would refuse it and keep the gas)."""
    web3 = _web3()
    from eth_account import Account

    if not rpc_url.startswith(("http://", "https://")):
        raise WalletError(f"--rpc-url must be an http(s):// JSON-RPC URL, got {rpc_url!r}")
    w3 = web3.Web3(web3.Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    sender = Account.from_key(key)
    account = web3.Web3.to_checksum_address(payout.account)
    try:
        chain_id = int(w3.eth.chain_id)
        if payout.chain_id is not None and chain_id != payout.chain_id:
            raise WalletError(f"{rpc_url} is chain {chain_id}, but the payout is on chain {payout.chain_id}")
        ledger = w3.eth.contract(address=web3.Web3.to_checksum_address(payout.contract), abi=LEDGER_ABI)
        already = int(ledger.functions.claimed(account).call())
        if payout.cumulative <= already:
            return ClaimOutcome(tx_hash=None, account=account, amount=0, cumulative=payout.cumulative,
                                epoch=payout.epoch)
        call = ledger.functions.claim(account, payout.cumulative, payout.proof)
        transaction = call.build_transaction({
            "from": sender.address, "chainId": chain_id,
            "nonce": w3.eth.get_transaction_count(sender.address, "pending"),
        })
        tx_hash = w3.eth.send_raw_transaction(sender.sign_transaction(transaction).raw_transaction)
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=receipt_timeout)
    except WalletError:
        raise
    except Exception as exc:  # noqa: BLE001 - web3's many errors, told in words; the key is in none of them
        reason = _revert_reason(exc)
        raise WalletError(f"the claim was refused: {reason}" if reason else f"the claim failed: {type(exc).__name__}: {exc}") from None
    hex_hash = web3.Web3.to_hex(tx_hash)
    if receipt["status"] != 1:
        raise WalletError(f"the claim transaction {hex_hash} reverted")
    from web3.logs import DISCARD

    events = ledger.events.Claimed().process_receipt(receipt, errors=DISCARD)
    amount = sum(int(e.args.amount) for e in events if e.args.account == account)
    return ClaimOutcome(tx_hash=hex_hash, account=account, amount=amount, cumulative=payout.cumulative,
                        epoch=payout.epoch, gas_used=int(receipt["gasUsed"]))
