"""PayoutLedger on py-evm and on anvil: deposits, one root per epoch and never more than it can pay, claims of
cumulative earnings, pause."""

from __future__ import annotations

import os
import random

from chainkit import TOKENS, Ledger, ledger_deploy, pyevm_chain_make, reverted
from eth_utils import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3.logs import DISCARD

from marketplace.chain.client import revert_from_exception
from marketplace.chain.merkle import proof_verify, tree_build


def random_account(rng: random.Random) -> str:
    return "0x" + rng.randbytes(20).hex()


# --- deposits -------------------------------------------------------------------------------------

def test_a_deposit_moves_tokens_in_and_emits_one_event_the_client_reads(ledger: Ledger):
    ledger.fund(500 * TOKENS)

    events = ledger.client.deposits(from_block=0, to_block=ledger.client.block_number())
    assert [(e.depositor, e.amount) for e in events] == [(ledger.submitter, 500 * TOKENS)]
    event = events[0]
    assert event.block_hash == ledger.client.block_hash(event.block_number)
    receipt = ledger.client.tx_receipt(event.tx_hash)
    assert receipt is not None and receipt.status == 1 and receipt.block_number == event.block_number
    assert ledger.client.token_balance(ledger.contract.address) == 500 * TOKENS
    assert ledger.client.token_balance(ledger.submitter) == 0
    assert ledger.client.chain_id == {"pyevm": 131277322940537, "anvil": 31337}[ledger.chain.name]


def test_a_deposit_of_nothing_or_without_allowance_is_refused(ledger: Ledger):
    assert reverted(lambda: ledger.contract.functions.deposit(0).transact({"from": ledger.submitter})).name == "ZeroAmount"
    ledger.send(ledger.token.functions.mint(ledger.submitter, 10), ledger.admin)
    refusal = reverted(lambda: ledger.contract.functions.deposit(10).transact({"from": ledger.submitter}))
    assert refusal.name == "ERC20InsufficientAllowance"
    assert ledger.client.deposits(from_block=0, to_block=ledger.client.block_number()) == []


# --- publishing roots -----------------------------------------------------------------------------

def test_the_operator_publishes_epochs_one_after_the_other(ledger: Ledger):
    first = tree_build(leaves=[(ledger.contributors[0], 5)])
    second = tree_build(leaves=[(ledger.contributors[0], 5), (ledger.contributors[1], 7)])
    ledger.fund(12)
    assert ledger.client.published_epoch() == 0

    ledger.publish(1, first)
    ledger.publish(2, second)

    assert ledger.client.published_epoch() == 2
    assert ledger.client.published_root() == second.root
    assert ledger.client.published_total() == 12
    logs = ledger.contract.events.RootPublished.get_logs(from_block=0)
    assert [(log.args.epoch, log.args.root, log.args.total) for log in logs] == [(1, first.root, 5), (2, second.root, 12)]


def test_only_the_operator_may_publish_a_root(ledger: Ledger):
    tree = tree_build(leaves=[(ledger.contributors[0], 5)])
    for outsider in (ledger.admin, ledger.contributors[0]):
        refusal = reverted(lambda o=outsider: ledger.contract.functions.publishRoot(1, tree.root, 5).transact({"from": o}))
        assert refusal.name == "AccessControlUnauthorizedAccount"
        assert refusal.values[0] == outsider
    assert ledger.client.published_epoch() == 0


def test_a_second_root_for_one_epoch_and_a_skipped_epoch_are_refused(ledger: Ledger):
    ledger.fund(6)
    tree = tree_build(leaves=[(ledger.contributors[0], 5)])
    ledger.publish(1, tree)
    other = tree_build(leaves=[(ledger.contributors[0], 6)])
    publish = ledger.contract.functions.publishRoot

    again = reverted(lambda: publish(1, other.root, 6).transact({"from": ledger.operator}))
    skipped = reverted(lambda: publish(3, other.root, 6).transact({"from": ledger.operator}))

    assert (again.name, again.values) == ("EpochOutOfOrder", (2, 1))
    assert (skipped.name, skipped.values) == ("EpochOutOfOrder", (2, 3))
    assert ledger.client.published_root() == tree.root


def test_a_root_whose_total_shrinks_or_that_is_empty_is_refused(ledger: Ledger):
    ledger.fund(5)
    ledger.publish(1, tree_build(leaves=[(ledger.contributors[0], 5)]))
    smaller = tree_build(leaves=[(ledger.contributors[0], 4)])
    publish = ledger.contract.functions.publishRoot

    shrinking = reverted(lambda: publish(2, smaller.root, 4).transact({"from": ledger.operator}))
    empty = reverted(lambda: publish(2, b"\0" * 32, 5).transact({"from": ledger.operator}))

    assert (shrinking.name, shrinking.values) == ("TotalDecreased", (5, 4))
    assert empty.name == "EmptyRoot"


def test_a_root_may_commit_at_most_the_tokens_held_plus_those_already_claimed(ledger: Ledger):
    alice, bob = ledger.contributors[:2]
    publish = ledger.contract.functions.publishRoot
    ledger.fund(100)
    over = tree_build(leaves=[(alice, 61), (bob, 40)])

    refusal = reverted(lambda: publish(1, over.root, over.total).transact({"from": ledger.operator}))

    assert (refusal.name, refusal.values) == ("RootExceedsFunds", (101, 100))
    assert refusal.data[:4] == keccak(text="RootExceedsFunds(uint256,uint256)")[:4]
    assert ledger.client.published_epoch() == 0
    ledger.publish(1, first := tree_build(leaves=[(alice, 60), (bob, 40)]))  # exactly what it holds
    ledger.claim(first, alice)
    ledger.fund(5)  # 45 held + 60 claimed
    grown = tree_build(leaves=[(alice, 60), (bob, 46)])

    too_much = reverted(lambda: publish(2, grown.root, grown.total).transact({"from": ledger.operator}))

    assert (too_much.name, too_much.values) == ("RootExceedsFunds", (106, 105))
    ledger.publish(2, tree_build(leaves=[(alice, 60), (bob, 45)]))
    assert (ledger.client.published_epoch(), ledger.client.published_total()) == (2, 105)


def test_the_client_sends_a_root_once_even_when_the_same_transaction_is_sent_again(ledger: Ledger):
    tree = tree_build(leaves=[(ledger.contributors[0], 5)])
    ledger.fund(5)
    nonce = ledger.client.operator_nonce(pending=True)

    first = ledger.client.publish_root_send(epoch=1, root=tree.root, total=5, nonce=nonce, gas_price_wei=10**10)
    ledger.w3.eth.wait_for_transaction_receipt(first)
    again = ledger.client.publish_root_send(epoch=1, root=tree.root, total=5, nonce=nonce, gas_price_wei=10**10)

    assert again == first
    receipt = ledger.client.tx_receipt(first)
    assert receipt is not None and receipt.status == 1 and 0 < receipt.gas_used <= 80_000
    assert ledger.client.operator_nonce(pending=False) == nonce + 1
    assert len(ledger.contract.events.RootPublished.get_logs(from_block=0)) == 1
    assert ledger.client.tx_receipt("0x" + os.urandom(32).hex()) is None


# --- claims ---------------------------------------------------------------------------------------

def test_a_contributor_claims_its_cumulative_earnings_less_what_it_already_claimed(ledger: Ledger):
    alice, bob = ledger.contributors[:2]
    ledger.fund(100)
    ledger.publish(1, first := tree_build(leaves=[(alice, 30), (bob, 10)]))
    ledger.claim(first, alice)
    ledger.publish(2, second := tree_build(leaves=[(alice, 45), (bob, 10)]))

    receipt = ledger.claim(second, alice)

    assert ledger.balance(alice) == 45
    assert ledger.client.claimed(alice) == 45
    (event,) = ledger.contract.events.Claimed().process_receipt(receipt, errors=DISCARD)
    assert (event.args.account, event.args.amount, event.args.cumulative) == (alice, 15, 45)
    assert ledger.balance(ledger.contract.address) == 100 - 45


def test_total_claimed_grows_by_exactly_what_each_claim_pays(ledger: Ledger):
    alice, bob = ledger.contributors[:2]
    ledger.fund(100)
    ledger.publish(1, first := tree_build(leaves=[(alice, 30), (bob, 10)]))
    assert ledger.client.total_claimed() == 0

    ledger.claim(first, alice)
    assert ledger.client.total_claimed() == 30
    ledger.claim(first, bob, sender=ledger.relayer)
    assert ledger.client.total_claimed() == 40
    ledger.publish(2, second := tree_build(leaves=[(alice, 45), (bob, 10)]))
    ledger.claim(second, alice)

    assert ledger.client.total_claimed() == 55 == ledger.balance(alice) + ledger.balance(bob)
    assert ledger.balance(ledger.contract.address) == 100 - 55


def test_total_claimed_shares_the_storage_slot_the_pause_check_reads(ledger: Ledger):
    # Slot 1 is Pausable's `bool _paused` (byte 0) with totalClaimed + 1 above it: the packing that keeps a
    # claim's update a warm SSTORE (see the contract). A reordered declaration would move it and fail here.
    def slot1() -> int:
        return int.from_bytes(ledger.w3.eth.get_storage_at(ledger.contract.address, 1), "big")

    alice = ledger.contributors[0]
    assert slot1() == 1 << 8
    ledger.fund(100)
    ledger.publish(1, tree := tree_build(leaves=[(alice, 30), (ledger.contributors[1], 10)]))
    ledger.claim(tree, alice)
    assert slot1() == 31 << 8
    ledger.send(ledger.contract.functions.pause(), ledger.admin)
    assert slot1() == 31 << 8 | 1


def test_a_double_claim_pays_nothing_more(ledger: Ledger):
    alice = ledger.contributors[0]
    ledger.fund(100)
    ledger.publish(1, tree := tree_build(leaves=[(alice, 30), (ledger.contributors[1], 10)]))
    ledger.claim(tree, alice)

    refusal = reverted(lambda: ledger.claim(tree, alice))

    assert (refusal.name, refusal.values) == ("NothingToClaim", (alice, 30, 30))
    assert ledger.balance(alice) == 30


def test_a_wrong_proof_or_a_wrong_amount_is_refused(ledger: Ledger):
    alice, bob = ledger.contributors[:2]
    ledger.fund(100)
    ledger.publish(1, tree := tree_build(leaves=[(alice, 30), (bob, 10), (ledger.contributors[2], 1)]))
    claim = ledger.contract.functions.claim
    proof = tree.proof(alice)
    tampered = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]

    for amount, path in [(31, proof), (30, tampered), (30, proof[:-1]), (30, [])]:
        refusal = reverted(lambda a=amount, p=path: claim(alice, a, p).transact({"from": alice}))
        assert refusal.name == "InvalidProof"
    assert ledger.balance(alice) == 0


def test_one_accounts_proof_cannot_pay_another_account(ledger: Ledger):
    alice, bob = ledger.contributors[:2]
    ledger.fund(100)
    ledger.publish(1, tree := tree_build(leaves=[(alice, 30), (bob, 10)]))

    refusal = reverted(lambda: ledger.contract.functions.claim(bob, 30, tree.proof(alice)).transact({"from": bob}))

    assert refusal.name == "InvalidProof"
    assert ledger.balance(bob) == 0


def test_anyone_may_send_a_claim_but_the_tokens_go_to_the_account(ledger: Ledger):
    alice = ledger.contributors[0]
    ledger.fund(100)
    ledger.publish(1, tree := tree_build(leaves=[(alice, 30), (ledger.contributors[1], 10)]))

    ledger.claim(tree, alice, sender=ledger.relayer)

    assert (ledger.balance(alice), ledger.balance(ledger.relayer)) == (30, 0)


def test_a_claim_before_any_root_is_refused(ledger: Ledger):
    alice = ledger.contributors[0]
    refusal = reverted(lambda: ledger.contract.functions.claim(alice, 1, []).transact({"from": alice}))
    assert refusal.name == "NoRootPublished"


# --- pause ----------------------------------------------------------------------------------------

def test_a_paused_ledger_takes_no_deposit_and_pays_no_claim_but_accepts_a_corrected_root(ledger: Ledger):
    alice = ledger.contributors[0]
    ledger.fund(100)
    ledger.publish(1, tree_build(leaves=[(alice, 30), (ledger.contributors[1], 10)]))
    ledger.send(ledger.contract.functions.pause(), ledger.admin)
    ledger.send(ledger.token.functions.mint(ledger.submitter, 5), ledger.admin)
    ledger.send(ledger.token.functions.approve(ledger.contract.address, 5), ledger.submitter)

    corrected = tree_build(leaves=[(alice, 25), (ledger.contributors[1], 15)])
    ledger.publish(2, corrected)
    claim_refusal = reverted(lambda: ledger.claim(corrected, alice))
    deposit_refusal = reverted(lambda: ledger.contract.functions.deposit(5).transact({"from": ledger.submitter}))
    assert claim_refusal.name == deposit_refusal.name == "EnforcedPause"

    ledger.send(ledger.contract.functions.unpause(), ledger.admin)
    ledger.claim(corrected, alice)
    assert ledger.balance(alice) == 25


def test_only_the_pauser_pauses_and_only_the_admin_unpauses(ledger: Ledger):
    outsider = ledger.contributors[0]
    assert reverted(lambda: ledger.contract.functions.pause().transact({"from": outsider})).name == (
        "AccessControlUnauthorizedAccount")
    pauser_role = ledger.contract.functions.PAUSER_ROLE().call()
    ledger.send(ledger.contract.functions.grantRole(pauser_role, ledger.relayer), ledger.admin)
    ledger.send(ledger.contract.functions.pause(), ledger.relayer)

    refusal = reverted(lambda: ledger.contract.functions.unpause().transact({"from": ledger.relayer}))

    assert refusal.name == "AccessControlUnauthorizedAccount"
    assert ledger.contract.functions.paused().call() is True


# --- the tree and the contract agree --------------------------------------------------------------

def test_every_leaf_of_a_random_tree_claims_exactly_its_amount_and_the_sum_is_the_total(ledger: Ledger):
    rng = random.Random(4)
    earnings = [(random_account(rng), rng.randrange(1, 10**24)) for _ in range(37)]
    tree = tree_build(leaves=earnings)
    ledger.fund(tree.total + 1)
    ledger.publish(1, tree)

    for account, amount in tree.leaves:
        ledger.claim(tree, account, sender=ledger.relayer)
        assert ledger.balance(account) == amount

    assert sum(ledger.balance(account) for account, _ in tree.leaves) == tree.total == ledger.client.published_total()
    assert ledger.balance(ledger.contract.address) == 1


def test_python_proof_verification_agrees_with_the_contract(ledger: Ledger):
    rng = random.Random(7)
    tree = tree_build(leaves=[(random_account(rng), rng.randrange(1, 10**20)) for _ in range(21)])
    ledger.fund(tree.total)
    ledger.publish(1, tree)
    claim = ledger.contract.functions.claim
    cases = []
    for account, amount in tree.leaves[:6]:
        proof = tree.proof(account)
        other = rng.choice([a for a, _ in tree.leaves if a != account])
        cases += [(account, amount, proof), (account, amount + 1, proof), (other, amount, proof),
                  (account, amount, proof[::-1]), (account, amount, proof[1:])]

    for account, amount, proof in cases:
        in_python = proof_verify(root=tree.root, account=account, amount=amount, proof=proof)
        try:
            claim(account, amount, proof).call({"from": ledger.relayer})
            on_chain = True
        except Exception as exc:  # noqa: BLE001 - decoded: only InvalidProof means "the proof is wrong"
            revert = revert_from_exception(exc)
            assert revert is not None and revert.name == "InvalidProof", exc
            on_chain = False
        assert in_python == on_chain, (account, amount)
    assert sum(1 for a, m, p in cases if proof_verify(root=tree.root, account=a, amount=m, proof=p)) == 6


@settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.lists(st.integers(min_value=0, max_value=10**24), min_size=1, max_size=24), data=st.data())
def test_over_random_earnings_and_two_epochs_the_ledger_pays_out_exactly_the_total(first, data):
    ledger = ledger_deploy(pyevm_chain_make())
    rng = random.Random(data.draw(st.integers(min_value=0, max_value=2**32)))
    accounts = [random_account(rng) for _ in first]
    raises = data.draw(st.lists(st.integers(min_value=0, max_value=10**24), min_size=len(first), max_size=len(first)))
    epoch1 = tree_build(leaves=zip(accounts, first))
    epoch2 = tree_build(leaves=zip(accounts, [a + b for a, b in zip(first, raises)]))
    ledger.fund(epoch2.total + 1)
    ledger.publish(1, epoch1)
    early = data.draw(st.sets(st.sampled_from(range(len(accounts)))))
    for account, amount in epoch1.leaves:
        if amount and accounts.index(account.lower()) in early:
            ledger.claim(epoch1, account, sender=ledger.relayer)
    ledger.publish(2, epoch2)

    for account, amount in epoch2.leaves:
        if amount > ledger.client.claimed(account):
            ledger.claim(epoch2, account, sender=ledger.relayer)

    paid = {account: ledger.balance(account) for account, _ in epoch2.leaves}
    assert paid == dict(epoch2.leaves)
    assert sum(paid.values()) == epoch2.total == ledger.client.published_total()
    assert ledger.balance(ledger.contract.address) == 1
