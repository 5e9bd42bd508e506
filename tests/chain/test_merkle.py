"""Merkle trees of cumulative earnings: OpenZeppelin's format, determinism, validation, and the property
that the proofs of a tree pay out exactly its total."""

from __future__ import annotations

import pytest
from eth_abi import encode
from eth_utils import keccak, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from marketplace.chain.merkle import account_normalize, leaf_hash, proof_verify, tree_build

# Computed once by OpenZeppelin's own JavaScript library (@openzeppelin/merkle-tree,
# StandardMerkleTree.of(values, ["address", "uint256"])), so this checks compatibility, not self-consistency.
OZ_VALUES = [
    ("0x1111111111111111111111111111111111111111", 1),
    ("0x2222222222222222222222222222222222222222", 2 * 10**18),
    ("0x3333333333333333333333333333333333333333", 0),
    ("0x00000000000000000000000000000000000000ff", 2**256 - 1),
    ("0xabcdefabcdefabcdefabcdefabcdefabcdefabcd", 42),
]
OZ_ROOT = "75666679cfd03845af9592e5956e9269cb91913307652c640704fe7bf340576c"
OZ_PROOF_OF_THE_FIRST = [
    "1ab0fe69bbcd75aaadc701264fdf87402bfeeb190e9827298f18274cf7bc1135",
    "dd05ddd79adc5569806124d3c5d8151b75bc81032a0ea21d4cd74fd964947bf5",
    "6678728fb629cad18dd7cfe716c7fe643f03c2db468772dcad83f32bfe7bc306",
]

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
earnings = st.dictionaries(addresses, st.integers(min_value=0, max_value=2**128), min_size=1, max_size=60)


def test_the_root_and_proofs_are_those_of_openzeppelins_standard_merkle_tree():
    tree = tree_build(leaves=OZ_VALUES)
    assert tree.root.hex() == OZ_ROOT
    assert [p.hex() for p in tree.proof(OZ_VALUES[0][0])] == OZ_PROOF_OF_THE_FIRST


def test_a_leaf_is_the_double_hash_of_the_abi_encoded_account_and_amount():
    account = to_checksum_address("0x" + "ab" * 20)
    expected = keccak(keccak(encode(["address", "uint256"], [account, 123456789])))
    assert leaf_hash(account=account, amount=123456789) == expected


def test_one_leaf_is_its_own_root_with_an_empty_proof():
    tree = tree_build(leaves=[("0x" + "11" * 20, 5)])
    assert tree.root == leaf_hash(account="0x" + "11" * 20, amount=5)
    assert tree.proof("0x" + "11" * 20) == []
    assert proof_verify(root=tree.root, account="0x" + "11" * 20, amount=5, proof=[])


def test_no_leaves_is_refused():
    with pytest.raises(ValueError, match="at least one leaf"):
        tree_build(leaves=[])


@pytest.mark.parametrize("account", [
    "0x" + "1" * 39, "0x" + "1" * 41, "1" * 40, "0x" + "g" * 40, None, b"\x11" * 20,
    "0x" + to_checksum_address("0x" + "ab" * 20)[2:].swapcase(),  # mixed case with the wrong checksum
])
def test_anything_but_an_address_is_refused(account):
    with pytest.raises(ValueError):
        tree_build(leaves=[(account, 1)])


@pytest.mark.parametrize("amount", [-1, 2**256, 1.5, True, "3"])
def test_an_amount_outside_uint256_is_refused(amount):
    with pytest.raises(ValueError, match="cumulative amount"):
        tree_build(leaves=[("0x" + "11" * 20, amount)])


def test_an_account_given_twice_in_any_case_is_refused():
    lower = "0x" + "ab" * 20
    with pytest.raises(ValueError, match="appears twice"):
        tree_build(leaves=[(lower, 1), (to_checksum_address(lower), 2)])


def test_addresses_come_out_in_checksum_form_whatever_case_they_came_in():
    lower = "0x" + "ab" * 20
    assert account_normalize(lower) == account_normalize(lower.upper().replace("0X", "0x")) == to_checksum_address(lower)
    tree = tree_build(leaves=[(lower, 1)])
    assert tree.leaves == [(to_checksum_address(lower), 1)]
    assert tree.proof(to_checksum_address(lower)) == tree.proof(lower)


def test_an_account_without_a_leaf_has_no_proof():
    tree = tree_build(leaves=[("0x" + "11" * 20, 1)])
    with pytest.raises(KeyError):
        tree.proof("0x" + "22" * 20)


@settings(max_examples=80, deadline=None, database=None)
@given(earnings=earnings, data=st.data())
def test_the_same_earnings_in_any_order_give_the_same_root(earnings, data):
    pairs = list(earnings.items())
    shuffled = data.draw(st.permutations(pairs))
    checksummed = [(to_checksum_address(a), v) for a, v in shuffled]
    assert tree_build(leaves=pairs).root == tree_build(leaves=shuffled).root == tree_build(leaves=checksummed).root


@settings(max_examples=80, deadline=None, database=None)
@given(earnings=earnings)
def test_the_sum_claimable_through_the_proofs_equals_the_total(earnings):
    tree = tree_build(leaves=list(earnings.items()))

    claimable = sum(amount for account, amount in tree.leaves
                    if proof_verify(root=tree.root, account=account, amount=amount, proof=tree.proof(account)))

    assert claimable == tree.total == sum(earnings.values())
    assert len(tree) == len(earnings)


@settings(max_examples=60, deadline=None, database=None)
@given(earnings=earnings.filter(lambda e: len(e) >= 2), data=st.data())
def test_no_proof_pays_a_different_amount_or_a_different_account(earnings, data):
    tree = tree_build(leaves=list(earnings.items()))
    account, amount = data.draw(st.sampled_from(tree.leaves))
    other = data.draw(st.sampled_from([a for a, _ in tree.leaves if a != account]))
    proof = tree.proof(account)

    assert not proof_verify(root=tree.root, account=account, amount=amount + 1, proof=proof)
    assert not proof_verify(root=tree.root, account=other, amount=amount, proof=proof)


def test_a_proof_is_as_deep_as_the_tree():
    tree = tree_build(leaves=[("0x" + i.to_bytes(20, "big").hex(), i) for i in range(1, 1025)])
    assert {len(tree.proof(account)) for account, _ in tree.leaves} == {10}
