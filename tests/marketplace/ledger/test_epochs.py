"""Epochs: settled earnings to payout addresses, a Merkle tree of cumulative amounts that the ledger alone
determines, and a root published exactly once, whatever crashed (here on a fake chain; on py-evm in
test_chain_pyevm.py)."""

import itertools
from datetime import timedelta

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from ledgerkit import link_wallet, settled_earnings

from marketplace.chain.merkle import proof_verify
from marketplace.ledger.epochs import (
    epoch_close,
    epoch_confirm,
    epoch_leaves,
    epoch_publish,
    epoch_settle,
    epoch_verify,
)
from marketplace.ledger.exceptions import EpochOutOfOrder, EpochUnderfunded
from marketplace.ledger.fields import AmountSum
from marketplace.ledger.models import Account, AuditEntry, Epoch, EpochLeaf, Line
from marketplace.ledger.postings import account_get, balance
from marketplace.ledger.selectors import ledger_check
from marketplace.workunits.models import WorkUnit

K = Account.Kind
_names = itertools.count()
DEPOSITOR = "0x" + "22" * 20  # a submitter's address on the fake chain


def payout_total() -> int:
    return Line.objects.filter(account__kind=K.PAYOUT_ADDRESS).aggregate(t=AmountSum("amount"))["t"] or 0


@pytest.fixture
def earner(django_user_model):
    def make(amount: int, *, linked: bool = True):
        user = django_user_model.objects.create_user(f"earner{next(_names)}")
        key = link_wallet(user) if linked else None
        settled_earnings(user, amount, key=f"earn:{user.pk}:{amount}")
        return user, key

    return make


def test_an_epoch_holds_every_linked_contributors_cumulative_settled_earnings(earner):
    (_, alice), (_, bob) = earner(5 * 10**20), earner(7)

    epoch = epoch_close()

    assert epoch.number == 1
    assert dict(EpochLeaf.objects.filter(epoch=epoch).values_list("address", "cumulative")) == {
        alice.address: 5 * 10**20, bob.address: 7}
    assert epoch.total == 5 * 10**20 + 7 == payout_total()
    for leaf in epoch.leaves.all():
        assert proof_verify(root=bytes.fromhex(epoch.root[2:]), account=leaf.address, amount=leaf.cumulative,
                            proof=[bytes.fromhex(p[2:]) for p in leaf.proof])


def test_an_epoch_is_a_pure_function_of_the_ledger(earner):
    earner(11)
    first = epoch_close()
    earner(13)
    second = epoch_close()

    assert epoch_verify(epoch_id=first.pk) and epoch_verify(epoch_id=second.pk)
    assert epoch_leaves(number=1) == [(leaf.address, leaf.cumulative) for leaf in first.leaves.order_by("address")]
    assert epoch_close() is None  # nothing new: no epoch


def test_leaves_are_cumulative_across_epochs(earner, django_user_model):
    user, key = earner(10)
    epoch_close()
    settled_earnings(user, 5, key="more")

    second = epoch_close()

    assert second.leaves.get(address=key.address).cumulative == 15


def test_earnings_without_a_payout_address_wait_for_one(earner):
    user, _ = earner(9, linked=False)
    assert epoch_close() is None

    key = link_wallet(user)
    epoch = epoch_close()

    assert epoch.leaves.get().address == key.address
    assert balance(account_get(K.CONTRIBUTOR_SETTLED, user_id=user.pk)) == 0


def test_results_settle_into_the_epoch_after_the_audit_window(submit_job, compute_unit, settings):
    (first, _), (second, _) = compute_unit(WorkUnit.objects.get(job=submit_job(rows=4, rows_per_unit=4)))
    keys = [link_wallet(device.owner) for device in (first, second)]
    assert epoch_close() is None  # still held

    epoch = epoch_close(now=timezone.now() + timedelta(seconds=settings.IDLEGRID_AUDIT_WINDOW_SECONDS + 1))

    net = 10**15 - 10**15 * 500 // 10_000
    assert sorted(epoch.leaves.values_list("address", "cumulative")) == sorted((k.address, net) for k in keys)
    assert ledger_check() == []


@given(rounds=st.lists(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 2**200)), min_size=1, max_size=6),
                       min_size=1, max_size=3))
@hypothesis_settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_trees_leaves_always_sum_to_the_ledgers_settled_total(db, django_user_model, rounds):
    """Random earnings over a few epochs: what the tree lets people claim is exactly what the ledger settled."""
    people = [django_user_model.objects.create_user(f"p{next(_names)}") for _ in range(5)]
    keys = {user.pk: link_wallet(user) for user in people}
    expected = dict.fromkeys(people, 0)
    for earnings in rounds:
        for index, amount in earnings:
            settled_earnings(people[index], amount, key=f"prop:{next(_names)}")
            expected[people[index]] += amount
        epoch = epoch_close()

        leaves = dict(epoch.leaves.values_list("address", "cumulative"))
        assert sum(leaves.values()) == epoch.total == payout_total()
        for user, amount in expected.items():
            assert leaves.get(keys[user.pk].address, 0) == amount
        assert epoch_verify(epoch_id=epoch.pk)


# --- publishing -----------------------------------------------------------------------------------

class Killed(BaseException):
    """The process dies: nothing after this point runs (not even `except Exception`)."""


class KilledAfterSend:
    """The chain client of a process that dies right after the node accepted its transaction."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def publish_root_send(self, **kwargs):
        self._client.publish_root_send(**kwargs)
        raise Killed()


@pytest.fixture
def closed_epoch(earner, chain):
    earner(10**18)
    chain.deposit(DEPOSITOR, 10**18)  # the contract refuses a root its tokens do not cover
    return epoch_close()


def test_an_epoch_is_published_and_becomes_final_after_the_confirmations(closed_epoch, chain, settings):
    settings.IDLEGRID_CHAIN_CONFIRMATIONS = 3

    tx_hash = epoch_publish(epoch_id=closed_epoch.pk, client=chain)

    closed_epoch.refresh_from_db()
    assert closed_epoch.state == Epoch.State.PUBLISHED and closed_epoch.tx_hash == tx_hash
    assert chain.roots_accepted == [(1, bytes.fromhex(closed_epoch.root[2:]))]
    assert not epoch_confirm(epoch_id=closed_epoch.pk, client=chain)
    chain.mine(3)
    assert epoch_confirm(epoch_id=closed_epoch.pk, client=chain)
    assert Epoch.objects.get(pk=closed_epoch.pk).state == Epoch.State.FINAL


def test_killed_between_send_and_receipt_then_rerun_publishes_exactly_one_root(closed_epoch, chain):
    with pytest.raises(Killed):
        epoch_publish(epoch_id=closed_epoch.pk, client=KilledAfterSend(chain))
    closed_epoch.refresh_from_db()
    assert closed_epoch.state == Epoch.State.SENDING and closed_epoch.nonce == 0 and closed_epoch.tx_hash == ""

    epoch_publish(epoch_id=closed_epoch.pk, client=chain)
    epoch_publish(epoch_id=closed_epoch.pk, client=chain)

    assert len(chain.roots_accepted) == 1
    assert Epoch.objects.get(pk=closed_epoch.pk).state == Epoch.State.PUBLISHED


def test_a_transaction_still_pending_after_a_crash_is_sent_again_with_the_same_nonce(closed_epoch, chain):
    chain.automine = False
    with pytest.raises(Killed):
        epoch_publish(epoch_id=closed_epoch.pk, client=KilledAfterSend(chain))

    epoch_publish(epoch_id=closed_epoch.pk, client=chain)  # not mined yet: re-sent with nonce 0
    assert {nonce for nonce, *_ in chain.pending.values()} == {0}
    chain.mine()
    epoch_publish(epoch_id=closed_epoch.pk, client=chain)

    assert len(chain.roots_accepted) == 1
    assert Epoch.objects.get(pk=closed_epoch.pk).state == Epoch.State.PUBLISHED


def test_a_reverted_publication_is_sent_again_with_a_new_nonce(closed_epoch, chain):
    chain.published = (0, bytes(32), 2**100)  # the contract refuses a total that decreases
    epoch_publish(epoch_id=closed_epoch.pk, client=chain)
    assert chain.roots_accepted == []

    chain.published = (0, bytes(32), 0)
    epoch_publish(epoch_id=closed_epoch.pk, client=chain)

    epoch = Epoch.objects.get(pk=closed_epoch.pk)
    assert epoch.state == Epoch.State.PUBLISHED and epoch.nonce == 1
    assert [a["nonce"] for a in epoch.attempts] == [0, 1]
    assert len(chain.roots_accepted) == 1


def test_epochs_reach_the_chain_in_order(earner, chain):
    earner(1)
    epoch_close()
    earner(2)
    second = epoch_close()
    chain.deposit(DEPOSITOR, 3)

    with pytest.raises(EpochOutOfOrder):
        epoch_publish(epoch_id=second.pk, client=chain)
    epoch_settle(client=chain)  # publishes the first one waiting
    epoch_settle(client=chain)

    assert [epoch for epoch, _ in chain.roots_accepted] == [1, 2]


# --- funds ----------------------------------------------------------------------------------------

def test_an_underfunded_epoch_is_refused_before_a_nonce_is_reserved_and_published_once_funds_arrive(
        earner, chain, caplog):
    earner(10**18)
    epoch = epoch_close()
    chain.deposit(DEPOSITOR, 10**18 - 1)

    with pytest.raises(EpochUnderfunded, match="short by 1$"):
        epoch_publish(epoch_id=epoch.pk, client=chain)

    assert chain.pending == {} and chain.receipts == {} and chain.operator_nonce(pending=True) == 0
    epoch.refresh_from_db()
    assert (epoch.state, epoch.nonce, epoch.tx_hash, epoch.attempts) == (Epoch.State.CLOSED, None, "", [])
    refusal = AuditEntry.objects.get(action="epoch.underfunded")
    assert refusal.data == {"epoch": 1, "total": str(10**18), "held": str(10**18 - 1), "claimed": "0", "shortfall": "1"}
    assert not AuditEntry.objects.filter(action="epoch.nonce_reserved").exists()
    assert [r.levelname for r in caplog.records if "short by 1" in r.getMessage()] == ["ERROR"]

    chain.deposit(DEPOSITOR, 1)
    epoch_publish(epoch_id=epoch.pk, client=chain)

    epoch.refresh_from_db()
    assert epoch.state == Epoch.State.PUBLISHED and epoch.nonce == 0
    assert chain.roots_accepted == [(1, bytes.fromhex(epoch.root[2:]))]


def test_tokens_already_claimed_count_towards_what_the_next_epoch_may_commit(earner, chain):
    user, key = earner(60)
    first = epoch_close()
    chain.deposit(DEPOSITOR, 60)
    epoch_publish(epoch_id=first.pk, client=chain)
    chain.claims[key.address] = 60  # claimed: the contract now holds none of its tokens
    settled_earnings(user, 40, key="more")
    second = epoch_close()
    chain.deposit(DEPOSITOR, 39)

    with pytest.raises(EpochUnderfunded, match=r"can pay 99 \(holds 39, claims paid 60\): short by 1$"):
        epoch_publish(epoch_id=second.pk, client=chain)
    chain.deposit(DEPOSITOR, 1)
    epoch_publish(epoch_id=second.pk, client=chain)

    assert Epoch.objects.get(pk=second.pk).state == Epoch.State.PUBLISHED
    assert [epoch for epoch, _ in chain.roots_accepted] == [1, 2] and chain.published_total() == 100


def test_the_periodic_settlement_waits_for_funds_without_failing_and_publishes_on_a_later_run(earner, chain):
    earner(5)

    waiting = epoch_settle(client=chain)
    assert epoch_settle(client=chain) == waiting  # the same epoch waits; no new one is closed meanwhile

    assert Epoch.objects.get().state == Epoch.State.CLOSED and chain.roots_accepted == []
    assert AuditEntry.objects.filter(action="epoch.underfunded").count() == 2
    chain.deposit(DEPOSITOR, 5)
    assert epoch_settle(client=chain) == waiting
    assert Epoch.objects.get().state == Epoch.State.PUBLISHED
    assert [epoch for epoch, _ in chain.roots_accepted] == [1]
