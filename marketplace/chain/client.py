"""The marketplace's boundary with the chain: a small `ChainClient` protocol, its web3.py implementation
(any JSON-RPC node such as anvil, or py-evm in process for unit tests), contract deployment, and the
decoding of PayoutLedger's custom errors.

Every failure on the chain side (node down, timeout, revert, malformed answer) is raised as `ChainError`;
a revert whose data is known is the subclass `ChainRevert` with the custom error's name and values.
Input mistakes by the caller (a bad address, a 31-byte root) are ValueError, raised before any request.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from eth_abi import decode as abi_decode
from eth_account import Account
from eth_utils import function_abi_to_4byte_selector, to_checksum_address, to_hex
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound

from marketplace.chain.merkle import account_normalize

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"
UINT192_MAX = 2**192 - 1
UINT64_MAX = 2**64 - 1
# publishRoot measured at ~79,100 gas for the first epoch and ~44,900 after (bench/gas.py, over TestToken; the
# funds check's balanceOf costs more on a proxied token): a fixed limit, not an estimate, so re-signing one
# (epoch, nonce, fee) gives the very same transaction and hash.
PUBLISH_GAS_LIMIT = 150_000
DEFAULT_PRIORITY_FEE_WEI = 10**9
RPC_TIMEOUT_SECONDS = 10


# --- values crossing the boundary -----------------------------------------------------------------

@dataclass(frozen=True)
class DepositEvent:
    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str
    depositor: str
    amount: int


@dataclass(frozen=True)
class Receipt:
    status: int
    block_number: int
    gas_used: int


@dataclass(frozen=True)
class Deployment:
    token: str
    ledger: str
    block: int


class ChainError(Exception):
    """Anything that went wrong on the chain side."""


class ChainRevert(ChainError):
    """The chain refused a call or transaction; `name` and `values` say why when the error is known."""

    def __init__(self, message: str, *, name: str | None, values: tuple[Any, ...], data: bytes):
        super().__init__(message)
        self.name = name
        self.values = values
        self.data = data


@runtime_checkable
class ChainClient(Protocol):
    chain_id: int
    contract_address: str

    def block_number(self) -> int: ...
    def deposits(self, *, from_block: int, to_block: int) -> list[DepositEvent]: ...
    def block_hash(self, number: int) -> str: ...
    def publish_root_send(self, *, epoch: int, root: bytes, total: int, nonce: int,
                          gas_price_wei: int | None = None) -> str: ...
    def operator_nonce(self, *, pending: bool) -> int: ...
    def tx_receipt(self, tx_hash: str) -> Receipt | None: ...
    def published_epoch(self) -> int: ...
    def published_root(self) -> bytes: ...
    def published_total(self) -> int: ...
    def claimed(self, account: str) -> int: ...
    def total_claimed(self) -> int: ...
    def token_balance(self, account: str) -> int: ...


# --- compiled contracts and their errors ----------------------------------------------------------

@cache
def contract_artifact(name: str) -> dict[str, Any]:
    """ABI and bytecode of a contract compiled by contracts/build.mjs (committed; no node needed)."""
    if name not in {"PayoutLedger", "TestToken"}:
        raise ValueError(f"unknown contract {name!r}")
    return json.loads((COMPILED_DIR / f"{name}.json").read_text())


@cache
def _known_errors() -> dict[bytes, tuple[str, list[str]]]:
    errors: dict[bytes, tuple[str, list[str]]] = {
        bytes.fromhex("08c379a0"): ("Error", ["string"]),
        bytes.fromhex("4e487b71"): ("Panic", ["uint256"]),
    }
    for contract in ("PayoutLedger", "TestToken"):
        for entry in contract_artifact(contract)["abi"]:
            if entry["type"] == "error":
                errors[function_abi_to_4byte_selector(entry)] = (entry["name"], [i["type"] for i in entry["inputs"]])
    return errors


def revert_decode(data: bytes) -> tuple[str, tuple[Any, ...]] | None:
    """(error name, values) for revert data of PayoutLedger, TestToken or a require/panic; None if unknown."""
    known = _known_errors().get(bytes(data[:4]))
    if known is None:
        return None
    name, types = known
    try:
        values = abi_decode(types, bytes(data[4:]))
    except Exception:  # noqa: BLE001 - malformed data is simply an unknown error
        return None
    return name, tuple(to_checksum_address(v) if t == "address" else v for t, v in zip(types, values))


def _revert_data(exc: BaseException) -> bytes | None:
    # anvil (through web3): ContractLogicError whose .data is the hex revert data.
    if isinstance(exc, ContractLogicError):
        data = exc.data if isinstance(exc.data, str) else None
        return bytes.fromhex(data[2:]) if data and data.startswith("0x") else b""
    # py-evm (eth-tester): TransactionFailed("execution reverted: b'...'") carrying the bytes' repr.
    if type(exc).__name__ == "TransactionFailed" and exc.args and isinstance(exc.args[0], str):
        _, _, tail = exc.args[0].partition("execution reverted: ")
        try:
            raw = ast.literal_eval(tail) if tail else b""
        except (ValueError, SyntaxError):
            return b""
        return raw if isinstance(raw, bytes) else raw.encode() if isinstance(raw, str) else b""
    return None


def revert_from_exception(exc: BaseException) -> ChainRevert | None:
    """The revert behind an exception web3 raised, on anvil and on py-evm alike; None if it is no revert."""
    if isinstance(exc, ChainRevert):
        return exc
    data = _revert_data(exc)
    if data is None:
        return None
    decoded = revert_decode(data)
    name, values = decoded if decoded else (None, ())
    described = f"{name}{values}" if name else f"unknown revert data 0x{data.hex()}"
    return ChainRevert(f"reverted: {described}", name=name, values=values, data=data)


T = TypeVar("T")


@contextmanager
def chain_errors(operation: str) -> Iterator[None]:
    """Turns whatever web3 or the node raises inside the block into ChainError (ChainRevert for a revert)."""
    try:
        yield
    except ChainError:
        raise
    except Exception as exc:  # noqa: BLE001 - every chain-side failure leaves as ChainError
        revert = revert_from_exception(exc)
        if revert is not None:
            raise ChainRevert(f"{operation}: {revert}", name=revert.name, values=revert.values,
                              data=revert.data) from exc
        raise ChainError(f"{operation} failed: {type(exc).__name__}: {exc}") from exc


def _hex32(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value) != 66 or not value.startswith("0x"):
        raise ValueError(f"{what} must be 0x and 64 hex digits, got {value!r}")
    int(value[2:], 16)
    return value.lower()


def private_key_check(key: str) -> str:
    """A 0x-prefixed 32-byte hex private key; the message never repeats the key."""
    if not isinstance(key, str):
        raise ValueError("a private key must be a string of 64 hex digits")
    key = key.strip()
    body = key[2:] if key.startswith("0x") else key
    if len(body) != 64 or any(c not in "0123456789abcdefABCDEF" for c in body):
        raise ValueError("a private key must be 64 hex digits (optionally 0x-prefixed)")
    return "0x" + body


# --- the web3 implementation ----------------------------------------------------------------------

class Web3ChainClient:
    """ChainClient over web3.py for one PayoutLedger; the operator key signs publishRoot transactions."""

    def __init__(self, w3: Web3, contract_address: str, operator_key: str, *,
                 publish_gas_limit: int = PUBLISH_GAS_LIMIT):
        self._w3 = w3
        self.contract_address = account_normalize(contract_address)
        self._operator = Account.from_key(private_key_check(operator_key))
        self.operator_address: str = self._operator.address
        self._contract = w3.eth.contract(address=self.contract_address, abi=contract_artifact("PayoutLedger")["abi"])
        self._publish_gas_limit = publish_gas_limit
        self._chain_id: int | None = None
        self._token: Any = None

    def __repr__(self) -> str:  # never the key
        return f"Web3ChainClient(contract={self.contract_address}, operator={self.operator_address})"

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            with chain_errors("eth_chainId"):
                self._chain_id = int(self._w3.eth.chain_id)
        return self._chain_id

    def _read(self, operation: str, fn: Callable[[], T]) -> T:
        with chain_errors(operation):
            return fn()

    def _token_contract(self) -> Any:
        if self._token is None:
            address = self._read("token()", lambda: self._contract.functions.token().call())
            self._token = self._w3.eth.contract(address=address, abi=contract_artifact("TestToken")["abi"])
        return self._token

    def block_number(self) -> int:
        return int(self._read("eth_blockNumber", lambda: self._w3.eth.block_number))

    def block_hash(self, number: int) -> str:
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError(f"a block number is a non-negative integer, got {number!r}")
        block = self._read(f"eth_getBlockByNumber({number})", lambda: self._w3.eth.get_block(number))
        if block is None or block.get("hash") is None:
            raise ChainError(f"block {number} does not exist")
        return to_hex(block["hash"])

    def deposits(self, *, from_block: int, to_block: int) -> list[DepositEvent]:
        """Deposited events in [from_block, to_block], in chain order."""
        for value in (from_block, to_block):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"block numbers are non-negative integers, got {value!r}")
        if from_block > to_block:
            raise ValueError(f"from_block {from_block} is after to_block {to_block}")
        logs = self._read(
            f"Deposited logs {from_block}..{to_block}",
            lambda: self._contract.events.Deposited.get_logs(from_block=from_block, to_block=to_block),
        )
        try:
            events = [
                DepositEvent(
                    tx_hash=to_hex(log["transactionHash"]), log_index=int(log["logIndex"]),
                    block_number=int(log["blockNumber"]), block_hash=to_hex(log["blockHash"]),
                    depositor=to_checksum_address(log["args"]["from"]), amount=int(log["args"]["amount"]),
                )
                for log in logs
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ChainError(f"malformed Deposited log from the node: {exc}") from exc
        return sorted(events, key=lambda e: (e.block_number, e.log_index))

    def operator_nonce(self, *, pending: bool) -> int:
        tag = "pending" if pending else "latest"
        return int(self._read(
            "eth_getTransactionCount", lambda: self._w3.eth.get_transaction_count(self.operator_address, tag)
        ))

    def _fees(self, gas_price_wei: int | None) -> tuple[int, int]:
        """(maxFeePerGas, maxPriorityFeePerGas). A given price caps both, so the same price always
        signs the same transaction; without one, twice the latest base fee plus the node's tip."""
        if gas_price_wei is not None:
            return gas_price_wei, min(gas_price_wei, DEFAULT_PRIORITY_FEE_WEI)
        with chain_errors("fee lookup"):
            base_fee = int(self._w3.eth.get_block("latest").get("baseFeePerGas") or 0)
            try:
                tip = int(self._w3.eth.max_priority_fee)
            except Exception:  # noqa: BLE001 - nodes without eth_maxPriorityFeePerGas get the default tip
                tip = DEFAULT_PRIORITY_FEE_WEI
        return 2 * base_fee + tip, tip

    def publish_root_send(self, *, epoch: int, root: bytes, total: int, nonce: int,
                          gas_price_wei: int | None = None) -> str:
        """Signs publishRoot(epoch, root, total) with the operator key at `nonce` and sends it; returns the
        transaction hash without waiting. The gas limit is fixed, so with the same arguments and an explicit
        gas_price_wei the signed bytes and the hash are the same every time: sending again after a crash
        is harmless, and if that very transaction is already pending or mined its hash is returned."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= UINT64_MAX:
            raise ValueError(f"epoch must be an integer in [1, 2**64), got {epoch!r}")
        if not isinstance(root, bytes | bytearray) or len(root) != 32 or not any(root):
            raise ValueError(f"root must be 32 bytes, not all zero, got {root!r}")
        if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total <= UINT192_MAX:
            raise ValueError(f"total must be an integer in [0, 2**192), got {total!r}")
        if isinstance(nonce, bool) or not isinstance(nonce, int) or nonce < 0:
            raise ValueError(f"nonce must be a non-negative integer, got {nonce!r}")
        if gas_price_wei is not None and (isinstance(gas_price_wei, bool) or not isinstance(gas_price_wei, int)
                                          or gas_price_wei <= 0):
            raise ValueError(f"gas_price_wei must be a positive integer or None, got {gas_price_wei!r}")

        max_fee, tip = self._fees(gas_price_wei)
        transaction = {
            "type": 2, "chainId": self.chain_id, "nonce": nonce, "to": self.contract_address, "value": 0,
            "gas": self._publish_gas_limit, "maxFeePerGas": max_fee, "maxPriorityFeePerGas": tip,
            "data": self._contract.encode_abi("publishRoot", args=[epoch, bytes(root), total]),
        }
        signed = self._operator.sign_transaction(transaction)
        tx_hash = to_hex(signed.hash)
        try:
            self._w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as exc:  # noqa: BLE001 - "already known" / "nonce too low" for this very tx is success
            if self._transaction_known(tx_hash):
                return tx_hash
            with chain_errors(f"publishRoot(epoch={epoch}) send"):
                raise exc
        return tx_hash

    def _transaction_known(self, tx_hash: str) -> bool:
        try:
            return self._w3.eth.get_transaction(tx_hash) is not None
        except Exception:  # noqa: BLE001 - unknown, or the node is unreachable: either way not known
            return False

    def tx_receipt(self, tx_hash: str) -> Receipt | None:
        tx_hash = _hex32(tx_hash, "a transaction hash")
        with chain_errors(f"eth_getTransactionReceipt({tx_hash})"):
            try:
                receipt = self._w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                return None
        if receipt is None or receipt.get("blockNumber") is None:
            return None
        return Receipt(status=int(receipt["status"]), block_number=int(receipt["blockNumber"]),
                       gas_used=int(receipt["gasUsed"]))

    def published_epoch(self) -> int:
        return int(self._read("publishedEpoch()", lambda: self._contract.functions.publishedEpoch().call()))

    def published_root(self) -> bytes:
        return bytes(self._read("publishedRoot()", lambda: self._contract.functions.publishedRoot().call()))

    def published_total(self) -> int:
        return int(self._read("publishedTotal()", lambda: self._contract.functions.publishedTotal().call()))

    def claimed(self, account: str) -> int:
        account = account_normalize(account)
        return int(self._read("claimed()", lambda: self._contract.functions.claimed(account).call()))

    def total_claimed(self) -> int:
        """Everything claims have paid out: a root may commit at most this plus the contract's token balance."""
        return int(self._read("totalClaimed()", lambda: self._contract.functions.totalClaimed().call()))

    def token_balance(self, account: str) -> int:
        account = account_normalize(account)
        token = self._token_contract()
        return int(self._read("balanceOf()", lambda: token.functions.balanceOf(account).call()))


# --- construction ---------------------------------------------------------------------------------

def web3_connect(url: str, *, timeout: float = RPC_TIMEOUT_SECONDS) -> Web3:
    """A Web3 over HTTP JSON-RPC that fails fast (no silent retries): callers retry at the task level."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"a JSON-RPC URL is http(s)://..., got {url!r}")
    return Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None))


def chain_client() -> ChainClient:
    """The ChainClient the settings describe: IDLEGRID_CHAIN_RPC_URL, IDLEGRID_CHAIN_CONTRACT and
    IDLEGRID_CHAIN_OPERATOR_KEY (or IDLEGRID_CHAIN_OPERATOR_KEY_FILE)."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    missing = [name for name in ("IDLEGRID_CHAIN_RPC_URL", "IDLEGRID_CHAIN_CONTRACT", "IDLEGRID_CHAIN_OPERATOR_KEY")
               if not getattr(settings, name, None)]
    if missing:
        raise ImproperlyConfigured(
            f"the chain is not configured: set {', '.join(missing)} (the key may come from a *_FILE); "
            "`manage.py chain_deploy` prints these lines for a new deployment"
        )
    try:
        w3 = web3_connect(settings.IDLEGRID_CHAIN_RPC_URL)
        return Web3ChainClient(w3, settings.IDLEGRID_CHAIN_CONTRACT, settings.IDLEGRID_CHAIN_OPERATOR_KEY)
    except ValueError as exc:
        raise ImproperlyConfigured(f"chain settings: {exc}") from None


def _deploy_one(w3: Web3, deployer: Any, name: str, args: Sequence[Any], nonce: int) -> tuple[str, int]:
    artifact = contract_artifact(name)
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    with chain_errors(f"deploy {name}"):
        transaction = factory.constructor(*args).build_transaction({"from": deployer.address, "nonce": nonce,
                                                                      "chainId": w3.eth.chain_id})
        tx_hash = w3.eth.send_raw_transaction(deployer.sign_transaction(transaction).raw_transaction)
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
    if receipt["status"] != 1 or not receipt.get("contractAddress"):
        raise ChainError(f"deploying {name} failed in transaction {to_hex(tx_hash)}")
    return to_checksum_address(receipt["contractAddress"]), int(receipt["blockNumber"])


def deploy(*, w3: Web3, deployer_key: str, operator: str, token: str | None) -> Deployment:
    """Deploys PayoutLedger (admin and pauser: the deployer; operator: `operator`) over `token`, or over a
    new TestToken owned by the deployer when token is None (local chains). Waits for each receipt."""
    deployer = Account.from_key(private_key_check(deployer_key))
    operator = account_normalize(operator)
    with chain_errors("deployer nonce"):
        nonce = w3.eth.get_transaction_count(deployer.address, "pending")
    if token is None:
        token, _ = _deploy_one(w3, deployer, "TestToken", [deployer.address], nonce)
        nonce += 1
    else:
        token = account_normalize(token)
        with chain_errors("token code lookup"):
            if not w3.eth.get_code(token):
                raise ChainError(f"no contract at token address {token}")
    ledger, block = _deploy_one(w3, deployer, "PayoutLedger", [token, deployer.address, operator], nonce)
    return Deployment(token=token, ledger=ledger, block=block)
