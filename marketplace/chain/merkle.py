"""Merkle trees of cumulative earnings in OpenZeppelin's StandardMerkleTree format, for PayoutLedger.

A leaf is keccak256(keccak256(abi.encode(address account, uint256 cumulativeAmount))); two nodes hash as
keccak256 of the smaller then the larger (sorted pairs, so a proof needs no left/right flags). The layout
is OpenZeppelin's: leaf hashes sorted ascending, placed at the end of one array of 2n-1 nodes, each inner
node i the hash of nodes 2i+1 and 2i+2. The same set of leaves therefore always gives the same root,
whatever order it comes in, and the root equals the one @openzeppelin/merkle-tree computes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

try:
    # safe-pysha3 (installed with web3[tester]) hashes about 7x faster than eth-hash's pycryptodome
    # backend, which matters at a million leaves (three million hashes).
    from sha3 import keccak_256 as _keccak_256

    def keccak(data: bytes) -> bytes:
        return _keccak_256(data).digest()

except ImportError:  # pragma: no cover - the slower backend gives the same hashes
    from eth_utils import keccak as _eth_keccak

    def keccak(data: bytes) -> bytes:
        return _eth_keccak(data)


UINT256_MAX = 2**256 - 1
_ZERO_PAD = bytes(12)


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_LOWER_A = ord("a")


def _checksums(lower_hexes: list[str]) -> list[str]:
    """EIP-55 forms of many lower-case addresses (40 hex digits, no 0x) at once: a hex letter is upper
    case where the matching nibble of keccak(address text) is 8 or more. Vectorised because
    eth-utils' to_checksum_address (~20 us each) would be most of a million-leaf build."""
    count = len(lower_hexes)
    chars = np.frombuffer("".join(lower_hexes).encode("ascii"), dtype=np.uint8).reshape(count, 40)
    digests = np.frombuffer(b"".join(keccak(h.encode("ascii"))[:20] for h in lower_hexes), dtype=np.uint8)
    nibbles = np.stack([digests >> 4, digests & 0x0F], axis=1).reshape(count, 40)
    upper = (nibbles >= 8) & (chars >= _LOWER_A)
    text = (chars - (upper.astype(np.uint8) << 5)).tobytes().decode("ascii")
    return ["0x" + text[i : i + 40] for i in range(0, 40 * count, 40)]


def _address_parse(account: object) -> tuple[str, bool]:
    """(lower-case hex without 0x, whether the caller gave a mixed-case checksum to verify)."""
    if not isinstance(account, str) or not _ADDRESS.fullmatch(account):
        raise ValueError(f"not an Ethereum address (0x and 40 hex digits): {account!r}")
    body = account[2:]
    lower = body.lower()
    return lower, body != lower and body != body.upper()


def account_normalize(account: str) -> str:
    """The EIP-55 checksum form of an address given in checksum, lower or upper case; ValueError for anything
    else, including a mixed-case address whose checksum is wrong (the typo EIP-55 exists to catch)."""
    lower, mixed = _address_parse(account)
    checksum = _checksums([lower])[0]
    if mixed and checksum != account:
        raise ValueError(f"bad EIP-55 checksum in address {account!r}")
    return checksum


def _amount_check(amount: int) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= UINT256_MAX:
        raise ValueError(f"a cumulative amount must be an integer in [0, 2**256), got {amount!r}")
    return amount


def _leaf_hash(lower_hex: str, amount: int) -> bytes:
    # abi.encode(address, uint256) written by hand: eth-abi's encoder is ~20x slower per leaf.
    encoded = _ZERO_PAD + bytes.fromhex(lower_hex) + amount.to_bytes(32, "big")
    return keccak(keccak(encoded))


def leaf_hash(*, account: str, amount: int) -> bytes:
    """The 32-byte leaf PayoutLedger.claim recomputes for (account, cumulativeAmount)."""
    return _leaf_hash(account_normalize(account)[2:].lower(), _amount_check(amount))


def _pair_hash(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


class MerkleTree:
    """A built tree: its root, its leaves and a proof for each account. Build it with `tree_build`."""

    __slots__ = ("_nodes", "_position", "_leaves", "total")

    def __init__(self, *, nodes: list[bytes], position: dict[str, int], leaves: list[tuple[str, int]]):
        self._nodes = nodes
        self._position = position
        self._leaves = leaves
        self.total = sum(amount for _, amount in leaves)

    @property
    def root(self) -> bytes:
        return self._nodes[0]

    @property
    def leaves(self) -> list[tuple[str, int]]:
        """(checksum address, cumulative amount) for every leaf, sorted by address."""
        return list(self._leaves)

    def __len__(self) -> int:
        return len(self._leaves)

    def proof(self, account: str) -> list[bytes]:
        """The sibling hashes from the account's leaf up to the root; KeyError if it has no leaf."""
        index = self._position.get(account_normalize(account))
        if index is None:
            raise KeyError(f"{account} has no leaf in this tree")
        proof = []
        while index > 0:
            proof.append(self._nodes[index + 1 if index % 2 else index - 1])
            index = (index - 1) // 2
        return proof


def tree_build(*, leaves: Iterable[tuple[str, int]]) -> MerkleTree:
    """The tree of (account, cumulative amount) pairs. Accounts are checksum, lower- or upper-case
    addresses, each at most once; amounts are integers in base units. ValueError on an empty or bad input."""
    lowers: list[str] = []
    amounts: list[int] = []
    mixed: list[tuple[int, str]] = []
    for pair in leaves:
        try:
            account, amount = pair
        except (TypeError, ValueError):
            raise ValueError(f"a leaf is an (account, amount) pair, got {pair!r}") from None
        lower, is_mixed = _address_parse(account)
        if is_mixed:
            mixed.append((len(lowers), account))
        lowers.append(lower)
        amounts.append(_amount_check(amount))
    if not lowers:
        raise ValueError("a Merkle tree needs at least one leaf")
    if len(set(lowers)) != len(lowers):
        duplicate = next(lower for lower, n in Counter(lowers).items() if n > 1)
        raise ValueError(f"0x{duplicate} appears twice: one leaf per account holds its cumulative amount")
    checksums = _checksums(lowers)
    for index, given in mixed:
        if checksums[index] != given:
            raise ValueError(f"bad EIP-55 checksum in address {given!r}")

    hashed = sorted((_leaf_hash(lower, amount), i) for i, (lower, amount) in enumerate(zip(lowers, amounts)))
    count = len(hashed)
    last = 2 * count - 2
    nodes: list[bytes] = [b""] * (count - 1)
    nodes.extend(h for h, _ in reversed(hashed))  # leaf k of the sorted order sits at index last - k
    for i in range(count - 2, -1, -1):
        nodes[i] = _pair_hash(nodes[2 * i + 1], nodes[2 * i + 2])
    position = {checksums[i]: last - k for k, (_, i) in enumerate(hashed)}
    ordered = sorted(zip(lowers, checksums, amounts))
    return MerkleTree(nodes=nodes, position=position, leaves=[(c, a) for _, c, a in ordered])


def proof_process(*, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root a proof leads to from a leaf (OpenZeppelin's MerkleProof.processProof)."""
    computed = leaf
    for sibling in proof:
        if not isinstance(sibling, bytes | bytearray) or len(sibling) != 32:
            raise ValueError(f"a proof element is 32 bytes, got {sibling!r}")
        computed = _pair_hash(computed, bytes(sibling))
    return computed


def proof_verify(*, root: bytes, account: str, amount: int, proof: Sequence[bytes]) -> bool:
    """Whether `proof` shows that (account, amount) is a leaf of the tree with `root`, as the contract checks it."""
    if not isinstance(root, bytes | bytearray) or len(root) != 32:
        raise ValueError(f"a root is 32 bytes, got {root!r}")
    return proof_process(leaf=leaf_hash(account=account, amount=amount), proof=proof) == bytes(root)
